"""FSDP wrapping: one FSDP unit per decoder block, so a block's parameters gather only while it runs."""

from __future__ import annotations

from torch import nn

from picomaml.model.pico_decoder import PicoDecoderBlock


def block_wrap_policy() -> set[type[nn.Module]]:
    """The module classes Lightning's `FSDPStrategy(auto_wrap_policy=...)` wraps one by one."""
    return {PicoDecoderBlock}
