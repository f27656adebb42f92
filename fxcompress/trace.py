"""Model -> torch.fx GraphModule, with configurable leaf modules and errors that say what to do."""
from __future__ import annotations

import copy
import fnmatch
import os
import traceback
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from .errors import TraceError
from .selector import Selector

_TORCH_DIR = os.path.dirname(torch.__file__)
_FX_HINT = ("declare it (or the submodule that contains the failing code) a leaf with the recipe's "
            "`leaf_modules: [\"{name}\"]` option (or `leaf_modules=` in fxcompress.trace), so it is kept "
            "as one opaque call instead of being traced through")


def _matches(module: nn.Module, qualname: str, patterns: Sequence) -> bool:
    for pattern in patterns:
        if isinstance(pattern, type):
            if isinstance(module, pattern):
                return True
        elif fnmatch.fnmatchcase(qualname, pattern) or type(module).__name__ == pattern:
            return True
    return False


class _Tracer(fx.Tracer):
    """A tracer that honours extra leaf modules and remembers which module it is inside."""

    def __init__(self, leaf_modules: Sequence = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        self.scope_stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, Selector) or _matches(m, module_qualified_name, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.scope_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.scope_stack[-1]
            raise
        finally:
            self.scope_stack.pop()


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the user's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.endswith("fxcompress/trace.py")]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _leaf_check(model: nn.Module, leaf_modules: Iterable) -> None:
    names = [(name, m) for name, m in model.named_modules()]
    for pattern in leaf_modules:
        if isinstance(pattern, type):
            continue
        if not isinstance(pattern, str):
            raise TraceError(f"leaf_modules entries must be module classes, class names or qualified-name "
                             f"globs, got {pattern!r}")
        if not any(_matches(m, n, [pattern]) for n, m in names):
            raise TraceError(f"leaf_modules entry {pattern!r} matches no submodule of "
                             f"{type(model).__name__}: give a class name (e.g. 'Bottleneck') or a qualified "
                             f"name glob (e.g. 'layer1.*'); `fxcompress inspect --model ...` lists them")


def trace(model: nn.Module, leaf_modules: Sequence = (), *, concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule that owns a deep copy of its parameters.

    The user's model is never mutated, and the result shares no tensor with it. `leaf_modules` entries are
    module classes, class names, or glob patterns over qualified submodule names.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _leaf_check(model, leaf_modules)
    model = copy.deepcopy(model)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many kinds; each becomes one actionable TraceError
        where = tracer.failed_in or ""
        owner = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else \
            f"the top-level forward of {type(model).__name__}"
        line = _user_frame(exc)
        hint = _FX_HINT.format(name=where or type(model).__name__)
        message = (f"cannot trace {type(model).__name__}: failed in {owner}"
                   + (f" at {line}" if line else "") + f": {type(exc).__name__}: {exc}. To fix: {hint}")
        raise TraceError(message) from exc
    name = model.__class__.__name__ if not isinstance(model, fx.GraphModule) else "GraphModule"
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.eval()
    return gm
