"""Parameters, MACs and bytes per module call.

MACs count multiply-accumulates per example (the batch dimension divided out) of Linear, ConvNd and
MultiheadAttention projections; elementwise ops and normalisations count zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx, nn


@dataclass
class LayerCost:
    name: str
    type: str
    output_shape: tuple | None
    params: int
    macs: int


def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def module_macs(module: nn.Module, out_shape, batch: int) -> int:
    """Multiply-accumulates of one call of `module` per example."""
    if not out_shape or not isinstance(out_shape[0], int):
        return 0
    per_example = _numel(out_shape) // max(batch, 1)
    if isinstance(module, nn.Linear):
        return per_example * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return per_example * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.MultiheadAttention):
        tokens = per_example // module.embed_dim
        return 4 * tokens * module.embed_dim ** 2 + 2 * tokens ** 2 * module.embed_dim
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() >= 2:
        return per_example * weight.numel() // weight.shape[0]
    return 0


def layer_costs(gm: fx.GraphModule, shapes: dict, batch: int) -> list[LayerCost]:
    """One row per call_module node with parameters: its own parameter count and MACs."""
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        params = sum(p.numel() for p in module.parameters())
        macs = module_macs(module, shapes.get(node.name), batch)
        if params or macs:
            rows.append(LayerCost(node.target, type(module).__name__, shapes.get(node.name), params, macs))
    return rows


def model_size(gm: nn.Module) -> dict[str, int]:
    """Parameter count and bytes of the state (parameters and buffers, as stored)."""
    state = gm.state_dict()
    return {"params": sum(p.numel() for p in gm.parameters()),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}
