"""Target selection: which modules of a graph a pass acts on.

A target is a qualified-name glob (`"layer*.conv1"`), or a mapping `{type: Linear}` (module class name,
subclasses included), `{regex: "features\\.\\d+"}` (full match on the qualified name) or `{name: fc1}`.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Union

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from .errors import RecipeError


class TypeTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str


class RegexTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class NameTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


Target = Union[str, TypeTarget, RegexTarget, NameTarget]


def describe(target: Target) -> str:
    if isinstance(target, str):
        return repr(target)
    return repr(target.model_dump())


def matches(target: Target, qualname: str, module: nn.Module) -> bool:
    if isinstance(target, str):
        return fnmatch.fnmatchcase(qualname, target)
    if isinstance(target, TypeTarget):
        return any(cls.__name__ == target.type or f"{cls.__module__}.{cls.__qualname__}" == target.type
                   for cls in type(module).__mro__)
    if isinstance(target, RegexTarget):
        return re.fullmatch(target.regex, qualname) is not None
    return qualname == target.name


def candidate_modules(root: nn.Module, types: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The named submodules a pass may act on: those of `types` (all leaves when empty)."""
    out = []
    for name, module in root.named_modules():
        if not name:
            continue
        if types and not isinstance(module, types):
            continue
        if not types and next(module.children(), None) is not None:
            continue
        out.append((name, module))
    return out


def select_modules(root: nn.Module, targets: Iterable[Target] | None, exclude: Iterable[Target] = (),
                   types: tuple[type, ...] = (), *, field: str = "targets", strict: bool = True) -> list[str]:
    """Qualified names of the modules selected by `targets` minus `exclude`, in graph order.

    `targets=None` selects every candidate. With `strict`, a target that matches no candidate raises a
    RecipeError naming it and listing what exists.
    """
    candidates = candidate_modules(root, types)
    exclude = list(exclude)
    if targets is None:
        chosen = [n for n, _ in candidates]
    else:
        chosen = []
        for i, target in enumerate(targets):
            hits = [n for n, m in candidates if matches(target, n, m)]
            if not hits and strict:
                kinds = "/".join(t.__name__ for t in types) or "leaf"
                known = ", ".join(n for n, _ in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
                raise RecipeError(f"target {describe(target)} matches no {kinds} module; candidates are: "
                                  f"{known or '(none)'} (see `fxcompress inspect --model ...`)",
                                  field=f"{field}[{i}]", path=(field, i))
            chosen.extend(h for h in hits if h not in chosen)
    modules = dict(candidates)
    return [n for n in chosen if not any(matches(t, n, modules[n]) for t in exclude)]
