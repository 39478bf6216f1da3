"""The one command-line convention of picomaml's tools: ``python -m picomaml.<tool> key=value ...``.

Every entry point takes Hydra-style ``key=value`` arguments (``train`` is a Hydra app, so it also takes
``group=option`` and ``-m``); the others parse them here into a dataclass whose docstring is their
``--help``. Values convert to the field's type, an unknown key or a bad value is one line naming it and
the valid keys, and a missing or unreadable input ends the process with one line on stderr and exit
code 2 (:func:`usage_error`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, TypeVar

Args = TypeVar("Args")


def parse_cli_args(cls: type[Args], argv: list[str], prog: str) -> Args:
    """Parse Hydra-style ``key=value`` arguments into the dataclass ``cls``.

    Values convert to the field's type (``int``, ``float``, ``bool`` as true/false, ``str`` taken
    verbatim so a prompt may hold spaces or ``=``, and ``null`` for optional fields). An unknown key,
    a missing required key or a bad value exits with one line naming it and the valid keys.
    ``-h``/``--help`` prints the class docstring.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    usage = f"usage: python -m {prog} " + " ".join(
        f"{name}=..." if _required(f) else f"[{name}=...]" for name, f in fields.items()
    )
    if any(a in ("-h", "--help") for a in argv):
        print(f"{usage}\n\n{cls.__doc__}")
        raise SystemExit(0)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise usage_error(f"{prog}: expected key=value, got {arg!r}\n{usage}")
        if key not in fields:
            raise usage_error(f"{prog}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        try:
            values[key] = _convert(raw, hints[key])
        except ValueError as err:
            raise usage_error(f"{prog}: {key}={raw!r}: {err}") from err
    missing = [name for name, f in fields.items() if _required(f) and name not in values]
    if missing:
        raise usage_error(f"{prog}: missing required key(s) {', '.join(missing)}\n{usage}")
    return cls(**values)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _convert(raw: str, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options:
        if raw.lower() in ("null", "none", "~"):
            return None
        options = tuple(o for o in options if o is not type(None))
    target = options[0]
    if target is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if target is int:
        return int(raw)
    if target is float:
        return float(raw)
    return raw


def main_guard(fn: typing.Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a CLI body, turning a bad path or value (ValueError, e.g. :class:`~picomaml.runs.RunError`,
    or OSError such as FileNotFoundError) into one line ``error: ...`` and exit code 2."""
    try:
        return fn(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as err:
        raise usage_error(f"error: {err}") from err


def pick_device(name: str) -> Any:
    """The ``device=`` argument of the tools as a ``torch.device``: ``auto`` is CUDA when available."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def usage_error(message: str) -> SystemExit:
    """A SystemExit that ends the process with ``message`` on stderr and exit code 2 (bad input, as
    argparse), while ``str()`` of it stays the message for callers that catch it."""
    print(message, file=sys.stderr)
    error = SystemExit(message)
    error.code = 2
    return error
