"""Post-training: supervised fine-tuning (SFT) and Direct Preference Optimization (DPO).

``python -m picomaml.align stage=sft|dpo ckpt_path=<run>`` (:mod:`picomaml.align.run`): a Hydra app
composed like ``picomaml.train`` from the same data, optim, trainer, logger and launcher groups.
"""
