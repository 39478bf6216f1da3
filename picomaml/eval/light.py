"""A cheap evaluation the training loop can run every few hundred steps (``callbacks.periodic_eval``)."""

from __future__ import annotations

import weakref
from typing import Any

from picomaml.eval.downstream import DownstreamConfig, evaluate_downstream, scalar_metrics
from picomaml.eval.lm import evaluate_lm
from picomaml.eval.meta import eval_meta_config, evaluate_meta
from picomaml.meta import MetaConfig
from picomaml.model import PicoDecoder

_META_DATASETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate_light(
    module: Any,
    datamodule: Any,
    meta_config: MetaConfig | None = None,
    episodes: int = 20,
    max_val_batches: int | None = None,
    seed: int = 0,
    downstream: DownstreamConfig | None = None,
) -> dict[str, float]:
    """A cheap evaluation the training loop can run every few hundred steps (on one rank).

    Perplexities and accuracies (:func:`evaluate_lm`) on the datamodule's fixed validation micro-batches
    (the first ``max_val_batches``, default all), plus meta-test accuracy over ``episodes`` episodes. The
    meta config is ``meta_config`` if given, else ``module.hparams["meta_config"]``; with neither, no
    meta-test keys are returned. The head is ``module.meta_head`` when the module has one, else a fresh
    seeded init (see the module docstring). The meta-test index is built once per datamodule and config.

    It leaves the training state alone: no optimizer, RNG or ``.grad`` is touched (the inner loop takes
    gradients of the head with ``torch.autograd.grad`` only), and the model's train/eval mode is restored.
    Call it outside ``torch.inference_mode`` (e.g. from a training-batch hook; picomaml's Trainer runs
    with ``inference_mode=False``), since the inner loop needs autograd.
    """
    model: PicoDecoder = module.model
    was_training = model.training
    model.eval()
    try:
        batches = datamodule.val_batches_list()[:max_val_batches]
        results = evaluate_lm(model, batches) if batches else {}
        if meta_config is None and "meta_config" in getattr(module, "hparams", {}):
            meta_config = MetaConfig(**dict(module.hparams["meta_config"]))
        if meta_config is not None and episodes > 0:
            head = getattr(module, "meta_head", None)
            cfg = eval_meta_config(meta_config, meta_config if head is not None else None)
            per_module = _META_DATASETS.setdefault(datamodule, {})
            key = (repr(cfg), seed)  # the dataclass repr lists every field
            if key not in per_module:
                per_module[key] = datamodule.meta_test_dataset(cfg, seed)
            was_head_training = head.training if head is not None else False
            if head is not None:
                head.eval()
            try:
                results.update(evaluate_meta(model, head, per_module[key], cfg, episodes, seed))
            finally:
                if head is not None:
                    head.train(was_head_training)
        if downstream is not None:
            # few-shot accuracy on real labelled tasks, head-only (the light form: no fine-tuning copy)
            head = getattr(module, "meta_head", None)
            scored = evaluate_downstream(model, head, datamodule.tokenizer, downstream, meta_config)
            results.update(scalar_metrics(scored))
        return results
    finally:
        model.train(was_training)
