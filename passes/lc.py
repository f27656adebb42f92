"""lc: compress the weights of selected layers with the learning-compression algorithm (seed 002).

A recipe entry names the layers (`targets`), the C step (`cstep` + `options`, see
`fxcompress.lc.csteps.available_csteps()`), the algorithm (`mode`: lc, dc or idc) and its schedule,
and optionally `deploy: true`, which swaps quantized Linear/Conv2d layers for `CodebookLinear` /
`CodebookConv2d` (uint8 indices + a K-value codebook), so the exported ONNX file shrinks too, and
low-rank layers for two factor layers (the `low_rank` pass's rewrite) where that saves parameters::

    - lc:
        targets: [{type: Linear}]
        cstep: quantize
        options: {k: 4}
        schedule: {mu0: 0.01, factor: 1.5, steps: 20}
        steps_per_mu: 30
        lr: 0.05
        deploy: true

Biases are never compressed; they keep training in the L steps.  The loss is the cross-entropy of
the model's output on the recipe's `train` batches.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fxcompress import TargetedConfig, register_pass
from fxcompress.lc.algorithm import geometric_schedule, run_lc
from fxcompress.lc.csteps import make_cstep
from fxcompress.lc.modules import from_module
from fxcompress.passes.low_rank import Factors, factors_to_module, replace_with_factors
from fxcompress.solvers.randomized_svd import breaks_even
from fxcompress.rewrite import finish, replace_module
from fxcompress.training import batch_loss, shuffled_epoch

LAYER_TYPES = (nn.Linear, nn.Conv2d)


class GeometricSchedule(BaseModel):
    """mu_k = mu0 * factor^k for k = 0..steps-1 (seed 002 section 4.1)."""
    model_config = ConfigDict(extra="forbid")
    mu0: float = Field(gt=0)
    factor: float = Field(1.1, ge=1)
    steps: int = Field(30, ge=1)


class LCConfig(TargetedConfig):
    cstep: str = Field(description="C step name: quantize, binarize, prune_l0, low_rank, ...")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the C step")
    joint: bool = Field(False, description="one C step over all targeted weights together (one codebook, "
                                           "one kappa) instead of one per layer")
    mode: Literal["lc", "dc", "idc"] = "lc"
    penalty: Literal["al", "quadratic"] = "al"
    schedule: GeometricSchedule | list[float] = Field(
        default_factory=lambda: GeometricSchedule(mu0=1e-3), description="{mu0, factor, steps} or a list of mu")
    steps_per_mu: int = Field(100, ge=1, description="SGD steps of each L step (iDC: of each training phase)")
    lr: float = Field(0.01, gt=0, description="SGD learning rate; L steps clip it to 1/mu")
    momentum: float = Field(0.9, ge=0, lt=1)
    tol: float = Field(1e-3, ge=0, description="stop once ||w - Delta(Theta)|| < tol")
    checkpoint: str | None = Field(None, description="checkpoint file (relative: in the output folder, or the "
                                                     "checkpoint folder of `fxcompress run`)")
    resume: bool = Field(False, description="continue from `checkpoint` if it exists")
    deploy: bool = Field(False, description="replace quantized layers by Codebook modules and low-rank ones by "
                                                   "two factor layers")

    def mus(self) -> list[float]:
        if isinstance(self.schedule, GeometricSchedule):
            return geometric_schedule(self.schedule.mu0, self.schedule.factor, self.schedule.steps)
        return list(self.schedule)


def _check(gm, config: LCConfig) -> None:
    """Build the C step (ValueError on a bad name or option), check the schedule and that `deploy` applies."""
    step = make_cstep(config.cstep, **config.options)
    mus = config.mus()
    if not mus or any(m <= 0 for m in mus) or any(b < a for a, b in zip(mus, mus[1:])):
        raise ValueError(f"schedule must be a non-empty, non-decreasing list of positive mu values, got {mus}")
    if config.resume and config.checkpoint is None:
        raise ValueError("resume: true needs `checkpoint:` (the file to resume from); `fxcompress run --resume` "
                         "checkpoints on its own")
    if config.deploy and not (step.codebook_form or step.factor_form):
        raise ValueError(f"deploy: true needs a codebook C step (quantize, fixed_codebook, binarize, ternarize) "
                         f"or a low-rank one (low_rank, low_rank_auto); '{config.cstep}' is neither: remove `deploy`")


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    return batch_loss(model, batch, who="pass 'lc'")


@register_pass("lc", config=LCConfig, target_types=LAYER_TYPES, needs=("train",), check=_check)
def lc(gm, ctx, config):
    """LC compression (quantize, prune, low rank, ...) of the targeted Linear/Conv2d weights."""
    names = ctx.select(gm, config, LAYER_TYPES)
    if not names:
        ctx.note("no layer selected")
        return gm
    weights = [f"{name}.weight" for name in names]
    groups = [weights] if config.joint else [[w] for w in weights]
    tasks = [(group, make_cstep(config.cstep, **config.options)) for group in groups]
    batches = ctx.train_batches("lc")
    checkpoint = ctx.checkpoint_path(config.checkpoint, f"lc_pass{ctx.current.index if ctx.current else 0}.pt")
    mus = config.mus()
    bar = ctx.progress(None, desc=f"lc {config.cstep}", total=len(mus) if config.mode != "dc" else 0)
    try:
        result = run_lc(gm, tasks, _cross_entropy, lambda: shuffled_epoch(batches), mode=config.mode,
                        penalty=config.penalty, mu_schedule=mus, steps_per_mu=config.steps_per_mu, lr=config.lr,
                        momentum=config.momentum, tol=config.tol, checkpoint_path=checkpoint,
                        resume=config.resume or (ctx.resume and checkpoint is not None),
                        progress=lambda record: bar.update(), seed=ctx.seed)
    finally:
        bar.close()
    ctx.state["lc"] = result
    final = result.history[-1] if result.history else result.initial
    ctx.note(f"{config.mode} {config.cstep} on {len(names)} layer(s): {len(result.history)} step(s), "
             f"||w - Delta(Theta)|| {final['violation']:.3g}, train loss {final['loss_compressed']:.4g}, "
             f"{result.storage_bits:,} bits for {result.reference_bits:,} float32 bits "
             f"(x{result.compression_ratio:.1f})")
    for (group, step), theta in zip(tasks, result.thetas):
        ctx.record_layer(name=",".join(g.removesuffix(".weight") for g in group), cstep=config.cstep,
                         storage_bits=step.storage_bits(theta))
    if not config.deploy:
        return gm
    for (group, step), theta in zip(tasks, result.thetas):
        for i, weight in enumerate(group):
            name = weight.removesuffix(".weight")
            if step.codebook_form:
                _deploy_codebook(gm, name, theta["codebook"], theta["indices"][i])
            else:
                _deploy_factors(gm, ctx, name, *theta["factors"][i])
    return finish(gm)


def _deploy_codebook(gm, name: str, codebook, indices) -> None:
    module = gm.get_submodule(name)
    replace_module(gm, name, from_module(module, codebook.to(module.weight.dtype), indices))


def _deploy_factors(gm, ctx, name: str, u, v) -> None:
    """Swap a layer whose weight is U V^T for the two factor layers, unless that stores more values."""
    layer = gm.get_submodule(name)
    m, n = u.shape[0], v.shape[0]
    rank = u.shape[1]
    if rank == 0 or breaks_even(m, n, rank) or getattr(layer, "groups", 1) != 1:
        ctx.note(f"{name}: rank {rank} kept as a dense {m}x{n} weight (two factors would not be smaller)")
        return
    bias = None if layer.bias is None else layer.bias.detach()
    factors = Factors([u.to(layer.weight.dtype)], [v.T.to(layer.weight.dtype)], bias)
    replace_with_factors(gm, name, factors_to_module(layer, factors))
