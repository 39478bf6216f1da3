"""One command-line convention: every tool takes key=value, answers --help, and names a bad key."""

from __future__ import annotations

import importlib

import pytest

TOOLS = ["evaluate", "generate", "inspect", "analyze", "export", "report"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help_with_its_keys(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(f"picomaml.{tool}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m picomaml.{tool} ") and "=..." in out


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_rejects_an_unknown_key_by_name(tool: str) -> None:
    main = importlib.import_module(f"picomaml.{tool}").main
    with pytest.raises(SystemExit, match="unknown key 'no_such_key'; valid keys: "):
        main(["no_such_key=1"])


@pytest.mark.parametrize("bench", ["train", "meta", "sweep", "downstream"])
def test_benchmarks_answer_help(bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    from picomaml.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main([bench, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m picomaml.bench {bench} [")
