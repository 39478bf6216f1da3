"""`python -m picomaml.inspect`: module tree, parameter counts and the shapes flowing through it."""

from __future__ import annotations

import pytest

from picomaml.inspect import main


def test_prints_the_shapes_of_the_tiny_model(capsys: pytest.CaptureFixture) -> None:
    records = {r.name: r for r in main(["model=tiny", "seq_len=8", "batch_size=2"])}
    # tiny: d_model 48, 6 heads / 2 kv heads of head_dim 8, ffn 192
    assert records[""].inputs == [(2, 8)] and records[""].output == (2, 8, 50304)
    assert records["layers.1.attention.v_proj"].output == (2, 8, 16)
    assert records["layers.1.swiglu.w_2"].inputs == [(2, 8, 192)]
    assert records["layers.1.attention"].inputs == [(2, 8, 48), (8, 4)]  # hidden states and RoPE rotations
    assert records["layers.0.swiglu.w_0"].own_params == 48 * 192
    out = capsys.readouterr().out
    assert "v_proj (Linear) params 768  [2, 8, 48] -> [2, 8, 16]" in out
    assert "parameters: 4,897,008 total" in out


def test_unknown_model_lists_the_names() -> None:
    with pytest.raises(SystemExit, match="unknown model preset 'huge'; valid names: 11m, .*tiny"):
        main(["model=huge"])
    with pytest.raises(SystemExit, match="unknown key 'layers'"):
        main(["model=tiny", "layers=3"])
