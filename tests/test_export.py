"""Hugging Face export: a plain LlamaForCausalLM with the native model's logits, and an exact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from picomaml.export import main
from picomaml.model import PicoDecoder, load_model_config
from picomaml.model.hf import export_to_hf, load_from_hf
from picomaml.runs import load_model


@pytest.fixture(scope="module")
def model() -> PicoDecoder:
    torch.manual_seed(0)
    model = PicoDecoder(load_model_config("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a swapped or dropped norm would show
                p.uniform_(0.5, 1.5)
            elif name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                p.mul_(5)  # sharper attention, so a RoPE layout mistake cannot hide in flat softmaxes
    return model


@pytest.fixture(scope="module")
def hf_dir(model: PicoDecoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_to_hf(model, tmp_path_factory.mktemp("hf"))


def test_exported_llama_logits_match_native(model: PicoDecoder, hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"

    x = torch.randint(0, 50304, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native = model(x)
        exported = hf(x).logits.float()
    assert (native - exported).abs().max().item() < 1e-4


def test_round_trip_is_exact(model: PicoDecoder, hf_dir: Path) -> None:
    back = load_from_hf(hf_dir)
    assert back.config == model.config
    original = model.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_cli_exports_lightning_checkpoint(model: PicoDecoder, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model_config": model.config.to_dict()},
        },
        ckpt,
    )
    main([f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}"])
    assert torch.equal(load_from_hf(tmp_path / "hf").de_embedding_proj.weight, model.de_embedding_proj.weight)

    plain = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match="preset="):
        load_model(plain)
    assert load_model(plain, preset="tiny").config == model.config


def test_export_saves_the_tokenizer(model: PicoDecoder, tmp_path: Path) -> None:
    words = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="<unk>")
    export_to_hf(model, tmp_path, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == [2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize("kind", ["missing", "yaml", "directory"])
def test_cli_bad_input_is_one_line_and_exit_code_2(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "missing":
        args = [f"ckpt_path={tmp_path / 'nope.ckpt'}"]
    elif kind == "yaml":  # a config file is not a checkpoint: refused, never unpickled
        (tmp_path / "config.yaml").write_text("model: tiny\n")
        args = [f"ckpt_path={tmp_path / 'config.yaml'}", "preset=tiny"]
    else:
        args = [f"ckpt_path={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"out={tmp_path / 'hf'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
