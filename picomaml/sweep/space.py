"""Search spaces written in Hydra's override grammar, turned into optuna distributions and back.

A search space is a set of Hydra overrides. Sweep overrides become optuna distributions:

==============================  ==============================================
``interval(a,b)``                ``FloatDistribution(a, b)`` (bounds inclusive)
``tag(log, interval(a,b))``      ``FloatDistribution(a, b, log=True)``
``tag(int, interval(a,b))``      ``IntDistribution(a, b)`` (``log`` combines)
``range(a,b[,s])``               ``IntDistribution``/``FloatDistribution`` stepping by ``s``
                                 over Python's ``range`` values (``b`` excluded)
``choice(x,y,...)``              ``CategoricalDistribution`` (config groups too)
==============================  ==============================================

Every other override (``seed=1``, ``model=11m``, ``+foo=bar``, ``~baz``) is fixed for all trials.
A sampled value goes back into an override string (``key=value``) that Hydra parses to the same value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

_PARSER = OverridesParser.create()


@dataclass
class SearchSpace:
    """The optuna distributions of the swept keys and the overrides fixed for every trial.

    ``key_elements`` keeps how each swept key was written (``+foo`` adds a key, ``foo`` sets one) so
    that sampled values go back as the same kind of override.
    """

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    key_elements: dict[str, str] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    # how each swept key was written (``meta.inner_lr=tag(log, interval(0.003, 1.0))``), for messages
    sources: dict[str, str] = field(default_factory=dict)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """Fixed overrides followed by one ``key=value`` override per sampled parameter."""
        return self.fixed + [f"{self.key_elements[k]}={encode_value(params[k])}" for k in self.distributions]


def encode_value(value: Any) -> str:
    """Writes ``value`` as an override value that Hydra parses back to the same Python value.

    Strings stay bare when Hydra reads them back unchanged (``tiny``, ``11m``) and are quoted when
    they would parse as something else (``'1'``, ``'true'``, URLs with ``:`` and ``/``).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as an override value")
    if _reads_back(value):
        return value
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot quote {value!r} for a Hydra override: it contains both quote characters")


def _reads_back(text: str) -> bool:
    try:
        return _PARSER.parse_override(f"k={text}").value() == text
    except Exception:  # anything Hydra rejects bare gets quoted
        return False


def _distribution(override: Override) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or not low < high:
            raise ValueError(f"{key}: interval needs two bounds with low < high, got {override.input_line}")
        log = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(low, high, log=log)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{key}: empty range in {override.input_line}")
        step = abs(value.step)
        if len(values) == 1:
            return CategoricalDistribution(values)
        low, high = min(values), max(values)
        if all(isinstance(v, int) for v in values):
            return IntDistribution(low, high, step=step)
        return FloatDistribution(low, high, step=step)
    if isinstance(value, ChoiceSweep):
        values = list(override.sweep_iterator())
        bad = [v for v in values if not isinstance(v, str | int | float | bool)]
        if bad:
            raise ValueError(f"{key}: choice values must be scalars (optuna categoricals), got {bad}")
        return CategoricalDistribution(values)
    raise ValueError(f"{key}: unsupported sweep {override.input_line}")


def parse_search_space(params: dict[str, Any], arguments: list[str]) -> SearchSpace:
    """Builds the search space from ``hydra.sweeper.params`` and the command-line overrides.

    Command-line overrides come first, so ``python app.py -m seed=3 x='interval(0,2)'`` fixes the seed
    and replaces the configured search space of ``x``. A key may appear once on the command line.
    """
    space = SearchSpace()
    by_key: dict[str, Override] = {}
    for key, spec in params.items():
        # a bare YAML number or bool is a fixed value; write it as Hydra reads it
        text = spec if isinstance(spec, str) else encode_value(spec)
        override = _PARSER.parse_override(f"{key}={text}")
        by_key[override.key_or_group] = override
    for override in _PARSER.parse_overrides(arguments):
        by_key.pop(override.key_or_group, None)
        by_key[override.key_or_group] = override
    for name, override in by_key.items():
        if override.is_sweep_override():
            space.distributions[name] = _distribution(override)
            space.key_elements[name] = override.get_key_element()
            space.sources[name] = override.input_line
        else:
            space.fixed.append(override.input_line)
    return space


def describe(dist: BaseDistribution) -> str:
    """The values ``dist`` allows, in words: ``a float in [0.003, 1.0] (log scale)``."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"one of {list(dist.choices)}"
    kind = "an int" if isinstance(dist, IntDistribution) else "a float"
    text = f"{kind} in [{dist.low}, {dist.high}]"  # type: ignore[attr-defined]
    if dist.log:  # type: ignore[attr-defined]
        text += " (log scale)"
    if dist.step is not None and dist.step != 1:  # type: ignore[attr-defined]
        text += f" in steps of {dist.step}"  # type: ignore[attr-defined]
    return text


def check_value(dist: BaseDistribution, value: Any) -> tuple[str | None, bool]:
    """Whether a given (enqueued) value can be used as a sample of ``dist``.

    Returns ``(error, in_range)``: ``error`` says why optuna cannot store the value (wrong type, not
    a choice, not positive on a log scale, not an integer for an int param), else ``None``;
    ``in_range`` is False for a usable number outside ``[low, high]``, which optuna accepts with a
    warning (a deliberate setting outside the searched range is allowed).
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution

    try:
        dist.to_internal_repr(value)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}", False
    if isinstance(dist, CategoricalDistribution):
        return None, True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number", False
    if isinstance(dist, IntDistribution) and value != int(value):
        return f"{value!r} is not an integer", False
    return None, dist.low <= value <= dist.high  # type: ignore[attr-defined]


def suggest(trial: Any, name: str, dist: BaseDistribution) -> Any:
    """``trial.suggest_*`` for ``dist``: samples the param, or takes the trial's enqueued value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"{name}: unsupported distribution {dist!r}")


def probe_overrides(space: SearchSpace) -> list[list[str]]:
    """Override lists that together exercise every choice once, to check that they compose.

    The first list takes the low end or first choice of everything; each further list changes one
    choice, so a missing config group option or a misspelt key fails before any trial is launched.
    """
    from optuna.distributions import CategoricalDistribution

    base = {name: _first_value(dist) for name, dist in space.distributions.items()}
    probes = [space.overrides(base)]
    for name, dist in space.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            for choice in dist.choices[1:]:
                probes.append(space.overrides({**base, name: choice}))
    return probes


def _first_value(dist: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # type: ignore[attr-defined]


def grid_of(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid of every swept value, for optuna's GridSampler; intervals have no grid."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for name, dist in space.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution | FloatDistribution) and dist.step is not None and not dist.log:
            n = round((dist.high - dist.low) / dist.step) + 1
            grid[name] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise ValueError(
                f"the grid sampler needs choice() or range() for every param; {name} is continuous"
            )
    return grid
