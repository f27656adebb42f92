"""sensitivity: per-layer low-rank sensitivity sweep and a rank choice under a global budget (seed 001).

Seed 001 Part II measures how much each layer alone tolerates low-rank compression (section 13.2:
compress one layer of a copy to the rank that keeps a given fraction of its spectral energy, evaluate,
optionally fine-tune briefly) and then compresses layer by layer, the most aggressive energy per layer
that keeps the accuracy within `max_accuracy_drop` (section 15.2.2, "adaptive iterative compression").
This pass makes that strategy declarative::

    - sensitivity:
        targets: [{type: Linear}]
        energies: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
        budget: {max_drop: 0.01}     # or {params: 0.5} / {macs: 0.5}: fraction of the whole model's
        finetune_steps: 0            # optimizer steps (Adam) after compressing the layer, before measuring
    - low_rank: {rank: {from: sensitivity}}

For each target layer and energy it factorises that one layer (`low_rank.factorize`, all others
untouched) at the smallest rank keeping that energy (`rank_for_energy`), measures the metric on the
eval data, and restores the layer.  The metric is top-1 accuracy when the eval data is labelled,
else the relative squared output error against the unchanged model (`metric: output_error`); the drop
is how much worse it is than the unchanged model's.

Rank choice (one option per layer: dense, or one of its measured ranks that saves parameters):
drops of different layers are assumed additive, and a negative drop (an improvement, seed section
14.2) counts as zero.  Starting from all layers dense, a greedy loop repeatedly takes the move of one
layer to a more compressed option with the most saving per unit of added drop (moves that add no drop
first, then the larger saving):

* `max_drop: d` takes moves while the predicted total drop stays <= d, and stops when none fits;
* `params: f` / `macs: f` take moves until the model's predicted parameter / MAC count is <= f times
  its current one (an error before the sweep if even the smallest energies cannot reach it).

A rank r factorisation of an m x n weight (n = in_channels x kernel size for convolutions) stores
r (m + n) numbers instead of m n and, with both factors evaluated at the layer's output resolution,
costs that fraction of its MACs.  The choice goes to `ctx.state["sensitivity"]` (`ranks`: {layer:
rank} of the layers to compress, `curves`, `metric`, `baseline`, `predicted_drop`), the curves to the
report as a table.  The graph is returned unchanged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from fxcompress import FxCompressError, TargetedConfig, register_pass
from fxcompress.context import split_batch
from fxcompress.graph.spectrum import FACTORISABLE, weight_matrices
from fxcompress.rewrite import replace_module
from fxcompress.solvers.randomized_svd import rank_for_energy
from fxcompress.training import accuracy, is_labelled, train

from .low_rank import factorize

DEFAULT_ENERGIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


class Budget(BaseModel):
    """Exactly one of: the largest predicted metric drop, or the fraction of params / MACs to keep."""
    model_config = ConfigDict(extra="forbid")
    max_drop: float | None = Field(None, ge=0, description="largest predicted total metric drop")
    params: float | None = Field(None, gt=0, le=1, description="fraction of the model's parameters to keep")
    macs: float | None = Field(None, gt=0, le=1, description="fraction of the model's MACs to keep")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("max_drop", "params", "macs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of max_drop, params, macs; got {', '.join(given) or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("max_drop", "params", "macs") if getattr(self, k) is not None)


class SensitivityConfig(TargetedConfig):
    energies: list[float] = Field(default_factory=lambda: list(DEFAULT_ENERGIES), min_length=1,
                                  description="fractions of each layer's spectral energy to keep, in (0, 1]")
    method: Literal["svd", "randomized"] = Field("svd", description="factorisation of low_rank.factorize")
    metric: Literal["auto", "accuracy", "output_error"] = Field(
        "auto", description="auto: accuracy when the eval data is labelled, else output_error")
    budget: Budget = Field(default_factory=lambda: Budget(max_drop=0.01))
    finetune_steps: int = Field(0, ge=0, description="Adam steps on the train data before each measurement")
    finetune_lr: float = Field(5e-4, gt=0)

    @field_validator("energies")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [e for e in value if not 0 < e <= 1]
        if bad:
            raise ValueError(f"energies must lie in (0, 1], got {bad}")
        return sorted(set(value))


@dataclass
class Level:
    """One point of a layer's curve: the layer compressed alone at `energy`."""
    energy: float
    rank: int
    params_saved: int
    macs_saved: int
    metric: float
    drop: float

    @property
    def eligible(self) -> bool:
        return self.params_saved > 0

    @property
    def cost(self) -> float:
        return max(self.drop, 0.0)


@dataclass
class Metric:
    """`measure(model)` and whether higher is better; `drop` is how much worse than the baseline."""
    name: str
    measure: Callable[[nn.Module], float]
    higher_is_better: bool
    baseline: float = 0.0

    def drop(self, value: float) -> float:
        return self.baseline - value if self.higher_is_better else value - self.baseline


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The tensors of a model's output, flattened out of tuples, lists and dicts."""
    flat, _ = torch.utils._pytree.tree_flatten(model(*inputs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _output_error(gm, batches) -> Callable[[nn.Module], float]:
    """Relative squared error sum ||y - y0||^2 / sum ||y0||^2 of a model's outputs y against gm's y0."""
    inputs = [split_batch(batch)[0] for batch in batches]
    with torch.no_grad():
        gm.eval()
        reference = [_outputs(gm, x) for x in inputs]
    scale = sum(float(t.double().square().sum()) for ys in reference for t in ys) or 1.0

    @torch.no_grad()
    def measure(model: nn.Module) -> float:
        model.eval()
        error = sum(float((y.double() - y0.double()).square().sum())
                    for x, ys in zip(inputs, reference) for y, y0 in zip(_outputs(model, x), ys))
        return error / scale
    return measure


def _metric(gm, ctx, config: SensitivityConfig) -> Metric:
    """The configured metric on the eval data, with its baseline measured on the unchanged gm."""
    labelled = is_labelled(ctx.eval)
    name = ("accuracy" if labelled else "output_error") if config.metric == "auto" else config.metric
    if name == "accuracy":
        if not labelled:
            raise FxCompressError("sensitivity metric 'accuracy' needs labelled eval batches (inputs, target); "
                                  "use `metric: output_error` or a labelled eval source")
        metric = Metric(name, lambda model: accuracy(model, ctx.eval), higher_is_better=True)
    else:
        metric = Metric(name, _output_error(gm, ctx.eval), higher_is_better=False)
    metric.baseline = metric.measure(gm)
    return metric


def _ranks(layer: nn.Module, energies: list[float]) -> list[int]:
    """Smallest rank keeping each energy of the weight's spectrum (seed section 13.2), as low_rank's
    `{energy: f}` rule computes it: the largest rank any group of a grouped convolution needs."""
    spectra = [torch.linalg.svdvals(block.double()) for block in weight_matrices(layer)]
    return [max(rank_for_energy(S, e) for S in spectra) for e in energies]


def _savings(layer: nn.Module, rank: int, macs: int) -> tuple[int, int]:
    """Params and MACs a rank-`rank` factorisation of the layer saves (negative: it costs).

    Per group, an m x n weight block keeps r (m + n) of its m n numbers, and MACs in proportion.
    """
    blocks = weight_matrices(layer)
    m, n = blocks[0].shape
    dense, kept = len(blocks) * m * n, len(blocks) * rank * (m + n)
    return dense - kept, macs - math.ceil(macs * kept / dense)


def _layer_macs(gm, ctx) -> dict[str, int]:
    """MACs per example of each module, summed over its calls (the `cost` analysis)."""
    macs: dict[str, int] = {}
    for row in ctx.analysis("cost", gm):
        macs[row.name] = macs.get(row.name, 0) + row.macs
    return macs


def _score(gm, name: str, replacement: nn.Module, ctx, config, metric: Metric) -> float:
    """The metric with layer `name` swapped for `replacement` (fine-tuned first if asked); gm is restored."""
    if config.finetune_steps:
        trial = copy.deepcopy(gm)
        replace_module(trial, name, replacement)
        train(trial, ctx.train, steps=config.finetune_steps, lr=config.finetune_lr, optimizer="adam",
              shuffle=True, progress=False, seed=ctx.seed)
        return metric.measure(trial)
    original = gm.get_submodule(name)
    replace_module(gm, name, replacement)
    try:
        return metric.measure(gm)
    finally:
        replace_module(gm, name, original)


def _sweep(gm, ctx, config, plan: dict[str, list[int]], metric: Metric, bar) -> dict[str, list[Level]]:
    """Each layer alone at each energy's rank (`plan`); energies that give the same rank are measured once."""
    macs = _layer_macs(gm, ctx)
    curves = {}
    for name, ranks in plan.items():
        layer = gm.get_submodule(name)
        measured: dict[int, float] = {}
        curves[name] = []
        for energy, rank in zip(config.energies, ranks):
            if rank not in measured:
                replacement = factorize(layer, rank, method=config.method, seed=ctx.seed)
                measured[rank] = _score(gm, name, replacement, ctx, config, metric)
            params_saved, macs_saved = _savings(layer, rank, macs.get(name, 0))
            curves[name].append(Level(energy, rank, params_saved, macs_saved, measured[rank],
                                      metric.drop(measured[rank])))
            bar.update()
    return curves


def _saved(level: Level | None, kind: str) -> int:
    """What `level` saves of the budget's quantity (MACs for a `macs` budget, else parameters); dense: 0."""
    if level is None:
        return 0
    return level.macs_saved if kind == "macs" else level.params_saved


def _best_move(curves: dict[str, list[Level]], chosen: dict[str, Level], kind: str, room: float):
    """The move of one layer to a more compressed eligible level with the most saving per added drop.

    Only moves that add at most `room` to the predicted total drop are considered; returns
    (layer, level, added drop) or None.
    """
    best, best_key = None, None
    for name, levels in curves.items():
        current = chosen.get(name)
        for level in levels:
            gained = _saved(level, kind) - _saved(current, kind)
            added = level.cost - (current.cost if current else 0.0)
            if not level.eligible or gained <= 0 or added > room:
                continue
            key = (gained / added if added > 0 else math.inf, gained)
            if best_key is None or key > best_key:
                best, best_key = (name, level, added), key
    return best


def choose_levels(curves: dict[str, list[Level]], budget: Budget, totals: dict[str, int]) -> dict[str, Level]:
    """Greedy per-layer choice under `budget` (rule in the module docstring); absent layers stay dense.

    `totals` holds the model's current `params` and `macs`.
    """
    kind = budget.kind
    size_budget = kind != "max_drop"
    needed = totals[kind] * (1 - getattr(budget, kind)) if size_budget else 0
    chosen: dict[str, Level] = {}
    drop = saved = 0.0
    while not (size_budget and saved >= needed):
        room = math.inf if size_budget else budget.max_drop - drop
        move = _best_move(curves, chosen, kind, room)
        if move is None:
            break
        name, level, added = move
        saved += _saved(level, kind) - _saved(chosen.get(name), kind)
        drop += added
        chosen[name] = level
    return {name: chosen[name] for name in curves if name in chosen}


def _check_reachable(gm, ctx, budget: Budget, plan: dict[str, list[int]], totals: dict[str, int]) -> None:
    """Fail before the sweep when even every layer at its smallest energy cannot meet a size budget."""
    if budget.kind == "max_drop":
        return
    macs = _layer_macs(gm, ctx)
    index = 1 if budget.kind == "macs" else 0
    most = sum(max(_savings(gm.get_submodule(name), ranks[0], macs.get(name, 0))[index], 0)
               for name, ranks in plan.items())
    fraction, total = getattr(budget, budget.kind), totals[budget.kind]
    if total - most > fraction * total:
        raise FxCompressError(
            f"sensitivity budget {{{budget.kind}: {fraction:g}}} is out of reach: every target layer at its "
            f"smallest energy still leaves {(total - most) / total:.3f} of the model's {budget.kind}; "
            "add a smaller energy, target more layers, or raise the budget")


def _report(ctx, curves: dict[str, list[Level]], chosen: dict[str, Level], metric: Metric) -> None:
    """One row per (layer, energy) in the pass's layer records and, as a table, in the report's metrics."""
    rows = []
    for name, levels in curves.items():
        for level in levels:
            row = {"layer": name, "energy": level.energy, "rank": level.rank, "params_saved": level.params_saved,
                   "macs_saved": level.macs_saved, metric.name: round(level.metric, 4), "drop": round(level.drop, 4),
                   "chosen": chosen.get(name) is level}
            ctx.record_layer(**row)
            rows.append(row)
    key = "sensitivity curves" + (f" (pass {ctx.current.index})" if ctx.current is not None else "")
    ctx.report.metrics[key] = rows


def _summary(config, chosen: dict[str, Level], names: list[str], metric: Metric, totals) -> str:
    kept = [n for n in names if n not in chosen]
    ranks = ", ".join(f"{n} {chosen[n].rank}" for n in chosen) or "none"
    kind = config.budget.kind
    return (f"{metric.name} {metric.baseline:.4f}; budget {kind} {getattr(config.budget, kind):g}: ranks {ranks}"
            + (f" (dense: {', '.join(kept)})" if kept else "")
            + f"; predicted drop {sum(level.cost for level in chosen.values()):.4f}, params "
              f"{totals['params']:,} -> {totals['params'] - sum(v.params_saved for v in chosen.values()):,}")


@register_pass("sensitivity", config=SensitivityConfig, target_types=FACTORISABLE, needs=("eval",))
def sensitivity(gm, ctx, config):
    """Per-layer energy sweep of low-rank compression, and per-layer ranks under a budget (seed 001 §13, §15.2.2).

    Declared approximate only so that `verify` does not re-run the sweep in float64: it never changes gm.
    """
    names = ctx.select(gm, config, FACTORISABLE)
    if config.finetune_steps:
        ctx.train_batches("pass 'sensitivity' with finetune_steps > 0")
    totals = {"params": ctx.analysis("size", gm)["params"], "macs": sum(c.macs for c in ctx.analysis("cost", gm))}
    plan = {name: _ranks(gm.get_submodule(name), config.energies) for name in names}
    _check_reachable(gm, ctx, config.budget, plan, totals)
    metric = _metric(gm, ctx, config)
    bar = ctx.progress(None, desc="sensitivity", total=len(names) * len(config.energies))
    try:
        curves = _sweep(gm, ctx, config, plan, metric, bar)
    finally:
        bar.close()
    chosen = choose_levels(curves, config.budget, totals)
    _report(ctx, curves, chosen, metric)
    ctx.state["sensitivity"] = {"ranks": {name: level.rank for name, level in chosen.items()},
                                "curves": {name: [asdict(lv) for lv in levels] for name, levels in curves.items()},
                                "metric": metric.name, "baseline": metric.baseline,
                                "predicted_drop": sum(level.cost for level in chosen.values())}
    ctx.note(_summary(config, chosen, names, metric, totals))
    return gm
