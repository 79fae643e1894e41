"""Search spaces: dotted config fields set in a run config, and the same space for Ray Tune.

A trial's config is the base run config with the trial's values set at their dotted paths
(`reward.lr`, `annotators.annotators[0].noise`), validated as any run config is, so a bad
value fails with its field's name. Before the search starts every listed value (or both ends
of a range) is tried this way: a misspelt field or an impossible value stops the command
before any trial runs.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from actors.tune.config import Param, TuneSpec

_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def set_field(data: dict, path: str, value: Any) -> None:
    """Set `path` (dots between keys, [i] for list items) in nested `data`; a key that does
    not exist yet is added (the config model then says whether it may)."""
    node: Any = data
    steps = _steps(path)
    for step in steps[:-1]:
        node = _child(node, step, path)
    last = steps[-1]
    if isinstance(last, int):
        _index(node, last, path)
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"{path}: {last!r} is not a field of a section")


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in path.split("."):
        match = _PART.match(part)
        if not match:
            raise ValueError(f"{path}: {part!r} is not a field name (letters, digits, _, and [i] for list items)")
        steps.append(match.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return steps


def _child(node: Any, step: str | int, path: str) -> Any:
    if isinstance(step, int):
        _index(node, step, path)
        return node[step]
    if not isinstance(node, dict):
        raise ValueError(f"{path}: {step!r} is not a field of a section")
    return node.setdefault(step, {})


def _index(node: Any, i: int, path: str) -> None:
    if not isinstance(node, list) or i >= len(node):
        raise ValueError(f"{path}: item [{i}] does not exist in the config")


def with_values(base: dict, values: dict[str, Any]) -> dict:
    """A copy of `base` with every (path, value) of `values` set."""
    data = copy.deepcopy(base)
    for path, value in values.items():
        set_field(data, path, value)
    return data


def check_space(base: dict, spec: TuneSpec) -> list[str]:
    """Problems of the space against the base config, each naming `space.<field>`: every
    listed value and both ends of every range, one field at a time."""
    from actors.config import RunConfig
    from rlhf.config import ConfigError, parse_config

    problems = []
    for name, param in spec.space.items():
        for value in param.sample_values():
            try:
                parse_config(with_values(base, {name: value}), RunConfig, source=f"space.{name}={value!r}")
            except ConfigError as err:
                problems.extend(f"space.{name} = {value!r}: {issue}" for issue in err.issues)
                break
            except ValueError as err:
                problems.append(f"space.{err}")
                break
    return problems


def tune_space(spec: TuneSpec) -> dict[str, Any]:
    """The space in Ray Tune's terms (keys are the dotted fields)."""
    from ray import tune

    return {name: _domain(tune, p) for name, p in spec.space.items()}


def _domain(tune, p: Param):
    if p.grid is not None:
        return tune.grid_search(list(p.grid))
    if p.choice is not None:
        return tune.choice(list(p.choice))
    if p.uniform is not None:
        return tune.uniform(*p.uniform)
    if p.loguniform is not None:
        return tune.loguniform(*p.loguniform)
    assert p.randint is not None
    return tune.randint(p.randint[0], p.randint[1] + 1)  # Tune's upper end is exclusive
