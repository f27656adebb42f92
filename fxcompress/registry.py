"""The pass registry: `@register_pass("name")`, built-in discovery and the `fxcompress.passes` entry points."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable

from pydantic import BaseModel, ConfigDict
from torch import nn

from .errors import RecipeError
from .targets import Target

ENTRY_POINT_GROUP = "fxcompress.passes"


class PassConfig(BaseModel):
    """Base class of pass configurations: unknown fields are errors, values are type-checked."""
    model_config = ConfigDict(extra="forbid")


class TargetedConfig(PassConfig):
    """A configuration whose pass acts on selected modules (see `fxcompress.targets`)."""
    targets: list[Target] | None = None
    exclude: list[Target] = []


@dataclass
class PassInfo:
    """What the registry knows of a pass."""
    name: str
    run: Callable
    config: type[PassConfig]
    exact: bool
    target_types: tuple[type[nn.Module], ...] = ()
    needs: tuple[str, ...] | Callable = ()
    check: Callable | None = None
    output_only: bool = False
    doc: str = ""
    origin: str = field(default="")


_REGISTRY: dict[str, PassInfo] = {}
_discovered = False


def register_pass(name: str, *, config: type[PassConfig] = PassConfig, exact: bool = False,
                  target_types: tuple[type[nn.Module], ...] = (), needs: tuple[str, ...] | Callable = (),
                  check: Callable | None = None, output_only: bool = False):
    """Register `run(gm, ctx, config) -> gm` as the pass `name`.

    `exact` declares the pass function-preserving: `verify` mode then checks it in float64.
    `target_types` are the module types its `targets` may select, and `needs` what must be there before it
    runs: data streams (`"calibration"`, `"train"`, `"eval"`) and earlier passes (`"pass:sensitivity"`), or a
    function of the config returning them: both are checked before any work starts. `check(gm, config)`,
    if given, validates the configuration against the traced model before any pass runs (raise ValueError
    with a message saying what to change). `output_only` marks a pass that writes something and returns the
    graph unchanged (e.g. export_onnx): verify mode does not re-run it on a float64 copy.
    """
    if not isinstance(config, type) or not issubclass(config, PassConfig):
        raise TypeError(f"config of pass {name!r} must subclass fxcompress.PassConfig")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY[name] = PassInfo(name=name, run=fn, config=config, exact=exact, target_types=target_types,
                                   needs=needs if callable(needs) else tuple(needs), check=check,
                                   output_only=output_only,
                                   doc=(fn.__doc__ or "").strip(), origin=fn.__module__)
        return fn
    return decorate


def needs_of(info: PassInfo, config: PassConfig) -> tuple[str, ...]:
    """What the pass `info`, configured by `config`, needs (see `register_pass`)."""
    return tuple(info.needs(config)) if callable(info.needs) else info.needs


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("fxcompress.passes")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def available_passes() -> dict[str, PassInfo]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    passes = available_passes()
    if name in passes:
        return passes[name]
    close = difflib.get_close_matches(name, passes, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "run `fxcompress passes` to list them"
    raise RecipeError(f"unknown pass '{name}': {hint}")
