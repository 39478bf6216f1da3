"""Data for picomaml: tokenizers, corpora, packing with an Arrow cache, Dolma streaming, the datamodule.

Entry points: :class:`PicoDataModule` (what Hydra instantiates from ``conf/data/*.yaml``) and
:func:`load_tokenizer`. Names resolve lazily (PEP 562) so that ``picomaml.data.tokenizer`` can be
used without importing Lightning and ``datasets``.
"""

import importlib
from typing import Any

_EXPORTS = {
    "CORPUS_NAMES": "picomaml.data.datamodule",
    "PicoDataModule": "picomaml.data.datamodule",
    "PackedCorpus": "picomaml.data.packing",
    "PackedSplit": "picomaml.data.packing",
    "TokenStream": "picomaml.data.packing",
    "MODEL_VOCAB_SIZE": "picomaml.data.tokenizer",
    "TOKENIZER_NAMES": "picomaml.data.tokenizer",
    "load_tokenizer": "picomaml.data.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'picomaml.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
