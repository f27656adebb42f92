"""The Python API: compress(), save(), load(); validation of a whole plan before any work starts."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .context import PassContext
from .data import check_source, load_source
from .errors import FxCompressError, RecipeError
from .pass_manager import run_passes
from .registry import needs_of
from .recipe import Recipe, load_recipe
from .report import Report
from .targets import select_modules
from .training import accuracy, is_labelled
from .trace import trace

STREAMS = ("calibration", "train", "eval")


@dataclass
class CompressionResult:
    model: fx.GraphModule
    report: Report
    recipe: Recipe
    example_inputs: tuple


def example_inputs_for(recipe: Recipe, seed: int = 0) -> tuple:
    if recipe.input_shape is None:
        raise recipe.error("missing `input_shape` (e.g. [1, 3, 224, 224]): needed to build example inputs",
                           "input_shape")
    return (torch.randn(recipe.input_shape, generator=torch.Generator().manual_seed(seed)),)


def check_plan(gm: fx.GraphModule, recipe: Recipe, provided: set[str]) -> None:
    """Everything that can be checked without running a pass: targets, data needs, pass-specific checks."""
    for name in STREAMS:
        spec = getattr(recipe.data, name)
        if spec is not None:
            try:
                check_source(spec, f"data.{name}")
            except RecipeError as exc:
                raise recipe.error(exc.message, "data", name, *exc.field.split(".")[2:]) from None
    available = provided | {n for n in STREAMS if getattr(recipe.data, n) is not None}
    for step in recipe.passes:
        where = ("passes", step.index, step.name)
        for need in needs_of(step.info, step.config):
            if need.startswith("pass:"):
                earlier = need.removeprefix("pass:")
                if earlier not in {s.name for s in recipe.passes[:step.index]}:
                    raise recipe.error(f"pass '{step.name}' uses the results of pass '{earlier}': add "
                                       f"`- {earlier}` before it in the recipe", *where)
            elif need not in available:
                raise recipe.error(f"pass '{step.name}' needs {need} data: add `data: {{{need}: {{source: ...}}}}` "
                                   f"to the recipe or pass `{need}=` to fxcompress.compress", *where)
        if getattr(step.config, "targets", None) is not None:
            try:
                select_modules(gm, step.config.targets, step.config.exclude, step.info.target_types)
            except RecipeError as exc:
                raise recipe.error(exc.message, *where, *exc.path) from None
        if step.info.check is not None:
            try:
                step.info.check(gm, step.config)
            except ValueError as exc:
                raise recipe.error(str(exc), *where) from None


def _layer_table(gm, ctx) -> list[dict]:
    return [vars(c) for c in ctx.analysis("cost", gm)]


def compress(model: nn.Module, recipe, example_inputs: tuple | None = None, *, calibration=None, train=None,
             eval=None, seed: int | None = None, verify: bool | None = None, progress: bool = True,
             device=None, output_dir=None, checkpoint_dir=None, resume: bool = False) -> CompressionResult:
    """Trace `model`, validate the whole recipe against it, then run the passes.

    `calibration`, `train` and `eval` are iterables of batches (a tensor, or `(inputs, target)`) that
    override the recipe's `data` section. The user's model is never mutated. Long passes (`lc`) checkpoint
    into `checkpoint_dir`; with `resume` they continue from the checkpoints found there.
    """
    recipe = load_recipe(recipe)
    seed = recipe.seed if seed is None else seed
    torch.manual_seed(seed)
    example_inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_for(recipe, seed)
    gm = trace(model, recipe.leaf_modules)
    provided = {n for n, v in zip(STREAMS, (calibration, train, eval)) if v is not None}
    check_plan(gm, recipe, provided)
    streams = {}
    for name, given in zip(STREAMS, (calibration, train, eval)):
        spec = getattr(recipe.data, name)
        streams[name] = given if given is not None else (
            load_source(spec, recipe.input_shape, seed) if spec is not None else None)
    ctx = PassContext(example_inputs=example_inputs, seed=seed, device=device, progress=progress,
                      verify=recipe.verify if verify is None else verify, output_dir=output_dir,
                      checkpoint_dir=checkpoint_dir, resume=resume, **streams)
    ctx.report.model = recipe.model or type(model).__name__
    ctx.report.layers_before = _layer_table(gm, ctx)
    ctx.original = lambda: trace(model, recipe.leaf_modules)
    measure = is_labelled(ctx.eval)
    if measure:
        ctx.report.metrics["accuracy_before"] = round(accuracy(gm, ctx.eval), 4)
    gm = run_passes(gm, recipe.passes, ctx)
    ctx.report.layers_after = _layer_table(gm, ctx)
    if measure:
        ctx.report.metrics["accuracy_after"] = round(accuracy(gm, ctx.eval), 4)
    return CompressionResult(model=gm, report=ctx.report, recipe=recipe, example_inputs=example_inputs)


def save(result: CompressionResult, directory: str | os.PathLike) -> Path:
    """Write the compressed GraphModule, its recipe and report to `directory` (atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        torch.save({"model": result.model, "example_inputs": result.example_inputs}, tmp / "model.pt")
        (tmp / "recipe.yaml").write_text(result.recipe.to_yaml())
        (tmp / "report.json").write_text(json.dumps(result.report.to_dict(), indent=2, default=str))
        (tmp / "report.md").write_text(result.report.to_markdown())
        directory.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load(directory: str | os.PathLike) -> CompressionResult:
    """Load what `save` wrote; the original model class is not needed."""
    directory = Path(directory)
    if not (directory / "model.pt").is_file():
        raise FxCompressError(f"'{directory}' holds no model.pt: is it a folder written by fxcompress.save?")
    saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
    report = Report.from_dict(json.loads((directory / "report.json").read_text()))
    recipe = load_recipe((directory / "recipe.yaml").read_text())
    return CompressionResult(model=saved["model"], report=report, recipe=recipe,
                             example_inputs=saved["example_inputs"])
