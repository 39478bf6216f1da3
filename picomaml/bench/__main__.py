"""``python -m picomaml.bench``: see :mod:`picomaml.bench`."""

from picomaml.bench import main

if __name__ == "__main__":
    main()
