"""``python -m picomaml.align``: see :mod:`picomaml.align.run`."""

from picomaml.align.run import main

if __name__ == "__main__":
    main()
