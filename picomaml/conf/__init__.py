"""picomaml's Hydra configs, shipped inside the package (``conf/train.yaml`` is the root)."""
