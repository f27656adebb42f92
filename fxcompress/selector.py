"""The Selector: an index set on one channel dimension of a tensor.

A layer whose reconstruction ``M = P C^T`` (seed 003 §2.7) uses only some of its
inputs reads them through ``Selector(dim, keep)``, i.e. ``x.index_select(dim, keep)``.
The selector keeps the graph valid and runnable after every pass; ``collapse`` then
moves it towards the producer of ``x`` and absorbs it there (seed 003 §2.3: a
selector commutes with every elementwise or per-channel op).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from .rewrite import insert_module_before, module_of, replace_module


class Selector(nn.Module):
    """``x.index_select(dim, keep)``; exports to ONNX as ``Gather``.

    `dim` is the channel dimension counted from the front (1 for ``N, C, ...`` tensors,
    -1 for the feature dimension of a Linear's input); `keep` holds strictly increasing indices.
    """

    def __init__(self, dim: int, keep, size: int):
        super().__init__()
        keep = torch.as_tensor(keep, dtype=torch.long).flatten()
        if keep.numel() == 0:
            raise ValueError("a Selector must keep at least one channel")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise ValueError("Selector indices must be strictly increasing")
        if int(keep[0]) < 0 or int(keep[-1]) >= size:
            raise ValueError(f"Selector indices must lie in [0, {size}), got {keep[0]}..{keep[-1]}")
        self.dim = int(dim)
        self.size = int(size)
        self.register_buffer("keep", keep)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, self.keep)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keep={self.keep.numel()}/{self.size}"


def _input_dim(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return -1
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    raise TypeError(f"select_inputs handles nn.Linear and nn.ConvNd, got {type(layer).__name__}")


def narrowed_layer(layer: nn.Module, keep: Tensor, weight: Tensor | None = None,
                   bias: Tensor | None = None) -> nn.Module:
    """A copy of a Linear/ConvNd that reads only the inputs `keep`.

    Its weight is `weight` (the reconstruction P of seed 003 §2.7, shape ``out x len(keep) [x kernel]``)
    or, by default, the original weight's columns at `keep`; its bias is `bias` or the original bias.
    """
    dim = _input_dim(layer)
    if dim == 1 and layer.groups != 1:
        raise ValueError(f"cannot select inputs of a grouped convolution (groups={layer.groups}): "
                         "remove its input channels by selecting the outputs of the layer that feeds it")
    new = copy.deepcopy(layer)
    w = layer.weight.detach().index_select(1, keep.to(layer.weight.device)) if weight is None else weight
    expected = (layer.weight.shape[0], keep.numel(), *layer.weight.shape[2:])
    if tuple(w.shape) != expected:
        raise ValueError(f"weight for the narrowed layer must have shape {expected}, got {tuple(w.shape)}")
    new.weight = nn.Parameter(w.to(layer.weight).clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(layer.weight).clone(), requires_grad=layer.weight.requires_grad)
    if dim == -1:
        new.in_features = keep.numel()
    else:
        new.in_channels = keep.numel()
    return new


def select_inputs(gm: fx.GraphModule, node: fx.Node, keep, weight: Tensor | None = None,
                  bias: Tensor | None = None) -> fx.Node:
    """Make the Linear/ConvNd called by `node` read only its inputs `keep` through a new Selector.

    The layer is replaced by :func:`narrowed_layer` and a ``Selector`` is inserted on the edge from its
    input to it, so the graph stays runnable; other readers of that input are unchanged.  Returns the
    Selector's node.  The caller recompiles (``fxcompress.rewrite.finish``).
    """
    layer = module_of(gm, node)
    if layer is None:
        raise TypeError(f"node {node.name} does not call a module")
    size = layer.in_features if isinstance(layer, nn.Linear) else getattr(layer, "in_channels", None)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    selector = Selector(_input_dim(layer), keep, size).to(layer.weight.device)
    replace_module(gm, node.target, narrowed_layer(layer, keep, weight, bias))
    return insert_module_before(gm, node, node.args[0], selector, f"{node.target}.select")
