"""Shape propagation: the output shape of every node on the example inputs."""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp


def _shape_of(meta):
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    if isinstance(meta, (list, tuple)):
        return tuple(_shape_of(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _shape_of(v) for k, v in meta.items()}
    return None


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> dict[str, tuple]:
    """Run `gm` once on `example_inputs`; return node name -> output shape (nested for tuple outputs)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return {node.name: _shape_of(node.meta.get("tensor_meta")) for node in gm.graph.nodes}
