"""Deployable layers for quantized weights: a K-value codebook plus small integer indices.

A quantized weight (seed 002 section 3.2: w_i = c_{theta_i}) is stored as a float `codebook`
buffer of K values and an `indices` buffer of the weight's shape, uint8 when K <= 256 (int16 up to
32768, else int32).  The forward rebuilds the weight as `codebook[indices.long()]`, so an ONNX
export keeps the indices as a small integer initializer followed by Cast and Gather instead of a
float weight, and the .onnx file shrinks by about 4x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CodebookLinear", "CodebookConv2d", "from_module", "index_dtype"]


def index_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype that holds indices into a codebook of k entries."""
    if k <= 256:
        return torch.uint8
    if k <= 2 ** 15:
        return torch.int16
    return torch.int32


class _CodebookWeight(nn.Module):
    """Holds `codebook` (K,) and `indices` buffers and an optional bias; `weight` decodes them."""

    def __init__(self, codebook: Tensor, indices: Tensor, bias: Tensor | None, weight_shape: torch.Size):
        super().__init__()
        codebook = torch.as_tensor(codebook).detach().reshape(-1)
        if codebook.numel() < 1 or not codebook.is_floating_point():
            raise ValueError("codebook must be a non-empty floating-point tensor")
        indices = torch.as_tensor(indices).detach()
        if tuple(indices.shape) != tuple(weight_shape):
            raise ValueError(f"indices have shape {tuple(indices.shape)}, the weight has {tuple(weight_shape)}")
        if indices.is_floating_point() or (indices.numel() and (int(indices.min()) < 0
                                                                or int(indices.max()) >= codebook.numel())):
            raise ValueError(f"indices must be integers in [0, {codebook.numel()})")
        self.register_buffer("codebook", codebook.clone())
        self.register_buffer("indices", indices.to(index_dtype(codebook.numel())))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def weight(self) -> Tensor:
        return self.codebook[self.indices.long()]


class CodebookLinear(_CodebookWeight):
    """`nn.Linear` whose weight is `codebook[indices]`."""

    def __init__(self, codebook: Tensor, indices: Tensor, bias: Tensor | None = None):
        super().__init__(codebook, indices, bias, torch.as_tensor(indices).shape)
        if self.indices.dim() != 2:
            raise ValueError("CodebookLinear indices must be a (out_features, in_features) matrix")
        self.out_features, self.in_features = self.indices.shape

    @classmethod
    def from_module(cls, linear: nn.Linear, codebook: Tensor, indices: Tensor) -> "CodebookLinear":
        """Replace `linear`'s weight by codebook[indices] (indices shaped like the weight)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        layer = cls(codebook.to(linear.weight.dtype), indices.reshape(linear.weight.shape), linear.bias)
        return layer.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.codebook.numel()}, bias={self.bias is not None}")


class CodebookConv2d(_CodebookWeight):
    """`nn.Conv2d` (zero padding) whose weight is `codebook[indices]`."""

    def __init__(self, codebook: Tensor, indices: Tensor, bias: Tensor | None = None, *, stride=1, padding=0,
                 dilation=1, groups: int = 1):
        super().__init__(codebook, indices, bias, torch.as_tensor(indices).shape)
        if self.indices.dim() != 4:
            raise ValueError("CodebookConv2d indices must be (out, in/groups, kh, kw)")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_module(cls, conv: nn.Conv2d, codebook: Tensor, indices: Tensor) -> "CodebookConv2d":
        """Replace `conv`'s weight by codebook[indices]; only padding_mode='zeros' is supported."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"CodebookConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        layer = cls(codebook.to(conv.weight.dtype), indices.reshape(conv.weight.shape), conv.bias,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        return layer.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        out, inp, kh, kw = self.indices.shape
        return (f"{inp * self.groups}, {out}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, k={self.codebook.numel()}")


def from_module(module: nn.Module, codebook: Tensor, indices: Tensor) -> nn.Module:
    """`CodebookLinear` or `CodebookConv2d` replacing an nn.Linear or nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return CodebookLinear.from_module(module, codebook, indices)
    if isinstance(module, nn.Conv2d):
        return CodebookConv2d.from_module(module, codebook, indices)
    raise TypeError(f"no codebook module for {type(module).__name__}; supported: Linear, Conv2d")
