"""The pico-decoder model, its named sizes and its FLOPs accounting."""

from picomaml.model.flops import matmul_params, model_flops_per_token
from picomaml.model.pico_decoder import KVCache, ModelConfig, PicoDecoder
from picomaml.model.presets import load_model_config, preset_names

__all__ = [
    "KVCache",
    "ModelConfig",
    "PicoDecoder",
    "load_model_config",
    "matmul_params",
    "model_flops_per_token",
    "preset_names",
]
