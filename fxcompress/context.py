"""PassContext: what every pass receives besides the graph: data, analyses, report, seed, progress."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from .errors import FxCompressError
from .graph.cost import layer_costs, model_size
from .graph.shapes import propagate_shapes
from .registry import PassConfig
from .report import PassRecord, Report
from .targets import select_modules

ANALYSES: dict[str, Callable[[fx.GraphModule, "PassContext"], Any]] = {}


def register_analysis(name: str):
    """Register `fn(gm, ctx)` as a cached analysis available as `ctx.analysis(name, gm)`."""
    def decorate(fn):
        ANALYSES[name] = fn
        return fn
    return decorate


@register_analysis("shapes")
def _shapes(gm, ctx):
    return propagate_shapes(gm, ctx.example_inputs)


@register_analysis("cost")
def _cost(gm, ctx):
    batch = ctx.example_inputs[0].shape[0] if ctx.example_inputs and ctx.example_inputs[0].dim() else 1
    return layer_costs(gm, ctx.analysis("shapes", gm), batch)


@register_analysis("size")
def _size(gm, ctx):
    return model_size(gm)


def fingerprint(gm: fx.GraphModule) -> str:
    """Changes whenever the graph's code or any parameter/buffer shape changes."""
    h = hashlib.sha1(gm.code.encode())
    for name, t in gm.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
    return h.hexdigest()


def split_batch(batch) -> tuple[tuple, Any]:
    """A batch is a tensor, or `(inputs, target)` where inputs is a tensor or a tuple of tensors."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target
    raise TypeError("a batch must be a tensor or an (inputs, target) pair, got "
                    f"{type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, '__len__') else ""))


def reiterable(batches: Iterable | None):
    """Keep lists and DataLoaders as they are; materialise one-shot iterators so passes can re-read them."""
    if batches is None:
        return None
    if iter(batches) is batches:
        return list(batches)
    return batches


class PassContext:
    """Shared state of one compression run.

    `calibration`, `train` and `eval` are re-iterable collections of batches (see `split_batch`).
    `state` is free-form storage for passes that hand results to later passes (e.g. sensitivity -> low_rank).
    `original`, set by `fxcompress.compress`, returns a fresh trace of the user's unchanged model (traced only when a
    pass asks, e.g. export_onnx timing the original against the compressed model).
    """

    def __init__(self, *, example_inputs: tuple, calibration=None, train=None, eval=None, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = True, verify: bool = False,
                 output_dir=None, checkpoint_dir=None, resume: bool = False):
        self.example_inputs = tuple(example_inputs)
        self.calibration = reiterable(calibration)
        self.train = reiterable(train)
        self.eval = reiterable(eval)
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.show_progress = progress
        self.verify = verify
        self.output_dir = output_dir
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.report = Report()
        self.state: dict[str, Any] = {}
        self.original: Callable[[], fx.GraphModule] | None = None
        self.current: PassRecord | None = None
        self._cache: dict[str, Any] = {}
        self._cache_key: tuple | None = None

    def analysis(self, name: str, gm: fx.GraphModule):
        """A cached analysis of `gm`; recomputed once the graph (code or tensor shapes) has changed."""
        key = (id(gm), fingerprint(gm))
        if key != self._cache_key:
            self._cache = {}
            self._cache_key = key
        if name not in self._cache:
            if name not in ANALYSES:
                raise KeyError(f"unknown analysis '{name}'; registered: {', '.join(ANALYSES)}")
            self._cache[name] = ANALYSES[name](gm, self)
        return self._cache[name]

    def invalidate(self) -> None:
        self._cache, self._cache_key = {}, None

    def progress(self, iterable, desc: str, total: int | None = None, **kw):
        return tqdm(iterable, desc=desc, total=total, disable=not self.show_progress, leave=False, **kw)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def note(self, message: str) -> None:
        """Add a line to the current pass's report entry."""
        if self.current is not None:
            self.current.notes.append(message)

    def record_layer(self, **row) -> None:
        if self.current is not None:
            self.current.layers.append(row)

    def select(self, gm: fx.GraphModule, config: PassConfig, types: tuple = ()) -> list[str]:
        """Names of the modules of `gm` selected by `config.targets` / `config.exclude`."""
        return select_modules(gm, getattr(config, "targets", None), getattr(config, "exclude", ()), types)

    def held_out_inputs(self) -> tuple:
        """Inputs used to measure each pass's output deviation: the first eval batch, else the example."""
        for source in (self.eval, self.calibration):
            if source is not None:
                for batch in source:
                    return split_batch(batch)[0]
        return self.example_inputs

    def checkpoint_path(self, name: str | None, default: str) -> str | None:
        """Where a long pass keeps its checkpoint: `name` (relative to `checkpoint_dir`, else the output
        folder), or `default` inside `checkpoint_dir` when the run has one (CLI `run`); None: no checkpoint."""
        from pathlib import Path
        folder = self.checkpoint_dir if self.checkpoint_dir is not None else self.output_dir
        if name is None:
            return None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / default)
        return name if Path(name).is_absolute() or folder is None else str(Path(folder) / name)

    def calibration_batches(self, who: str):
        if self.calibration is None:
            raise FxCompressError(f"{who} needs calibration data: add `data: {{calibration: {{source: ...}}}}` "
                                  "to the recipe, or pass `calibration=` to fxcompress.compress")
        return self.calibration

    def train_batches(self, who: str):
        if self.train is None:
            raise FxCompressError(f"{who} needs training data: add `data: {{train: {{source: ...}}}}` "
                                  "to the recipe, or pass `train=` to fxcompress.compress")
        return self.train
