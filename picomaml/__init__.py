"""picomaml: meta-learning during pretraining of pico-decoder language models."""
