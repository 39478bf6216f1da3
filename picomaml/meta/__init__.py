"""Meta-learning over SMLMT episodes: config, word index, episode sampler, head and MAML inner loop.

Nothing here knows about Lightning. A training step calls :func:`meta_forward` on a meta-batch from
:class:`MetaBatchDataset` (built over a :class:`WordIndex`) and steps its optimizer on the returned loss;
:func:`evaluate_episodes` scores meta-test episodes with confidence intervals.
"""

from picomaml.meta.config import MetaConfig
from picomaml.meta.head import MetaHead
from picomaml.meta.maml import (
    InnerLoop,
    adapt_tasks,
    ci95,
    evaluate_episodes,
    maml_outer_loss,
    meta_forward,
    meta_test_tasks,
    representations,
    window_features,
)
from picomaml.meta.smlmt import BATCH_KEYS, EpisodeSampler, MetaBatchDataset
from picomaml.meta.words import WordIndex

__all__ = [
    "BATCH_KEYS",
    "EpisodeSampler",
    "InnerLoop",
    "MetaBatchDataset",
    "MetaConfig",
    "MetaHead",
    "WordIndex",
    "adapt_tasks",
    "ci95",
    "evaluate_episodes",
    "maml_outer_loss",
    "meta_forward",
    "meta_test_tasks",
    "representations",
    "window_features",
]
