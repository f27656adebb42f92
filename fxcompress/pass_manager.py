"""The pass manager: runs a recipe's passes in order, reports each, and verifies exact passes."""
from __future__ import annotations

import copy
import time

import torch
from torch import fx

from .context import PassContext
from .errors import FxCompressError, VerificationError
from .recipe import PassStep
from .report import PassRecord

EXACT_RTOL = 1e-9


def _outputs(gm: fx.GraphModule, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def max_deviation(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _double(inputs: tuple) -> tuple:
    return tuple(t.double() if torch.is_floating_point(t) else t for t in inputs)


def verify_exact(step: PassStep, gm: fx.GraphModule, ctx: PassContext, inputs: tuple) -> float:
    """Run the pass on a float64 copy (with float64 example inputs) and compare outputs; raise if they
    differ beyond round-off. What that run writes to the report (notes, layer rows, metrics) is dropped:
    the real run writes it again."""
    before = copy.deepcopy(gm).double()
    reference = _outputs(before, _double(inputs))
    example_inputs = ctx.example_inputs
    ctx.example_inputs = _double(example_inputs)
    record = ctx.current
    saved = (list(record.notes), list(record.layers), dict(record.metrics)) if record is not None else None
    try:
        after = step.info.run(copy.deepcopy(before), ctx, step.config)
    finally:
        ctx.example_inputs = example_inputs
        ctx.invalidate()
        if saved is not None:
            record.notes, record.layers, record.metrics = saved
    deviation = max_deviation(reference, _outputs(after, _double(inputs)))
    scale = max((float(t.abs().max()) for t in reference if t.numel()), default=1.0)
    if not deviation <= EXACT_RTOL * max(scale, 1.0):
        raise VerificationError(f"pass '{step.name}' is declared exact but changed the outputs by {deviation:.3g} "
                                f"in float64 (tolerance {EXACT_RTOL:g} x {max(scale, 1.0):.3g}); this is a bug "
                                "in the pass: please report it with the recipe")
    return deviation


def run_passes(gm: fx.GraphModule, steps: list[PassStep], ctx: PassContext) -> fx.GraphModule:
    """Apply `steps` to `gm` in order, recording one report entry per pass."""
    inputs = ctx.held_out_inputs()
    previous = _outputs(gm, inputs)
    for step in steps:
        size = ctx.analysis("size", gm)
        cost = ctx.analysis("cost", gm)
        rec = PassRecord(index=step.index, name=step.name, exact=step.info.exact, params_before=size["params"],
                         macs_before=sum(c.macs for c in cost), bytes_before=size["bytes"])
        ctx.report.passes.append(rec)
        ctx.current = rec
        if step.info.exact and ctx.verify and not step.info.output_only:
            verify_exact(step, gm, ctx, inputs)
            rec.verified = True
        start = time.perf_counter()
        result = step.info.run(gm, ctx, step.config)
        rec.seconds = time.perf_counter() - start
        if not isinstance(result, fx.GraphModule):
            raise FxCompressError(f"pass '{step.name}' returned {type(result).__name__}, not a GraphModule")
        result.graph.lint()
        gm = result
        size = ctx.analysis("size", gm)
        rec.params_after, rec.bytes_after = size["params"], size["bytes"]
        rec.macs_after = sum(c.macs for c in ctx.analysis("cost", gm))
        current = _outputs(gm, inputs)
        rec.max_deviation = max_deviation(previous, current)
        previous = current
    ctx.current = None
    return gm
