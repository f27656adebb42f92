"""Streaming activation statistics for layer-input reconstruction.

Reconstructing a layer ``y ≈ M x`` by least squares with a group-lasso penalty
(seed 003 §2.4, problem (6) of §2.7) only needs the second moments

    R_xx = E[x x^T]  (d × d),   R_yx = E[y x^T]  (h × d),   r_yy = E[||y||^2],

because ``E||y - M x||^2 = r_yy - 2 Tr(M R_yx^T) + Tr(M R_xx M^T)``.  They are
accumulated here as float64 *sums* plus a row count in one pass over calibration
data, so memory is O(d^2) per layer whatever the number of samples, and partial
statistics from several processes combine by plain addition.

Rows ``x``:

* ``nn.Linear``: one row per input vector, leading dimensions flattened.
* ``nn.Conv1d`` / ``nn.Conv2d``: one row per (sample, output position), the
  unfolded receptive field ``vec(X^{(u,v)})`` of seed 003 §2.5, in the column
  order of ``weight.reshape(out_channels, -1)`` so that ``y = rows @ W_flat^T``.
* Bias: a constant 1 is appended as last column (seed 000, "handle bias"), so
  that ``y = W_aug x_aug`` with ``W_aug = [W, b]``; that column is never
  penalised by the group lasso (:meth:`LayerStats.column_groups` gives it -1).

Targets ``y`` (seed 003 §2.7):

* ``target="self"``: the layer's own output on its input in ``model``
  (``parallel`` chaining when ``model`` is the original network).
* ``target="reference"``: ``x`` from ``model`` (e.g. the partially compressed
  network) and ``y`` from the same-named layer of ``reference_model`` (the
  original) on the same batch (``top-down`` chaining).

Without a bias column (``append_bias=False`` or a layer without bias) the layer's
bias ``b`` is kept fixed, so ``y`` is the target output minus ``b``: the
reconstruction error ``||Y - (M x + b)||^2`` equals ``||(Y - b) - M x||^2``.

Grouped convolutions (``groups = g > 1``) are ``g`` independent layers, each
mapping its ``d_g = (C_in / g) * kernel_numel`` (+1 with bias) input columns to
its ``h_g = C_out / g`` output channels.  Their statistics are kept per conv
group: ``sum_xx`` has shape ``(g, d_g, d_g)`` and ``sum_yx`` ``(g, h_g, d_g)``;
group ``j`` covers input channels ``[j C_in/g, (j+1) C_in/g)`` and output
channels ``[j h_g, (j+1) h_g)``, i.e. rows ``j h_g : (j+1) h_g`` of the weight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["LayerStats", "collect_stats", "layer_inputs_to_rows"]

SUPPORTED_LAYERS = "nn.Linear, nn.Conv1d, nn.Conv2d"

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@dataclass(eq=False)
class LayerStats:
    """Float64 sums of second moments of one layer's (input, target) rows.

    Attributes:
        sum_xx: ``Σ x x^T``, shape ``(d, d)``, or ``(g, d_g, d_g)`` for a conv
            with ``groups = g > 1`` (see the module docstring).
        sum_yx: ``Σ y x^T``, shape ``(h, d)`` or ``(g, h_g, d_g)``.
        sum_yy: ``Σ ||y||^2`` over all rows and outputs (all groups), 0-dim.
        count: number of rows accumulated (samples × spatial positions).
        kind: ``"linear"`` or ``"conv"``.
        groups: number of conv groups (1 for linear layers).
        kernel_numel: unfolded columns per input channel (``k*k`` for Conv2d,
            ``k`` for Conv1d, 1 for linear layers).
        has_bias_column: whether the last column of ``x`` is the constant 1.
    """

    sum_xx: Tensor
    sum_yx: Tensor
    sum_yy: Tensor
    count: int
    kind: str
    groups: int = 1
    kernel_numel: int = 1
    has_bias_column: bool = False

    @classmethod
    def zeros(
        cls,
        d: int,
        h: int,
        *,
        kind: str,
        groups: int = 1,
        kernel_numel: int = 1,
        has_bias_column: bool = False,
        device: torch.device | str | None = None,
    ) -> LayerStats:
        """Empty statistics for ``d`` input columns and ``h`` outputs per group."""
        lead = (groups,) if groups > 1 else ()
        opts = dict(dtype=torch.float64, device=device)
        return cls(
            sum_xx=torch.zeros(*lead, d, d, **opts),
            sum_yx=torch.zeros(*lead, h, d, **opts),
            sum_yy=torch.zeros((), **opts),
            count=0,
            kind=kind,
            groups=groups,
            kernel_numel=kernel_numel,
            has_bias_column=has_bias_column,
        )

    def _mean(self, total: Tensor) -> Tensor:
        if self.count == 0:
            raise ValueError("LayerStats holds no rows (count == 0); cannot take means")
        return total / self.count

    @property
    def Rxx(self) -> Tensor:
        """Empirical auto-correlation ``E[x x^T] = sum_xx / count`` (seed 003 §2.4)."""
        return self._mean(self.sum_xx)

    @property
    def Ryx(self) -> Tensor:
        """Empirical cross-correlation ``E[y x^T] = sum_yx / count`` (seed 003 §2.7)."""
        return self._mean(self.sum_yx)

    @property
    def ryy(self) -> Tensor:
        """Mean squared target norm ``E[||y||^2] = sum_yy / count``."""
        return self._mean(self.sum_yy)

    def column_groups(self) -> Tensor:
        """Group-lasso group id of every column of ``x`` (seed 003 §2.5).

        Linear: column ``i`` is input feature ``i``.  Conv: the ``kernel_numel``
        unfolded columns of an input channel share that channel's id, the
        *global* input-channel index.  The appended bias column gets -1
        (unpenalised, seed 000).  Shape ``(d,)``, or ``(g, d_g)`` for grouped
        convs (row ``j`` for conv group ``j``), i.e. ``sum_xx.shape[:-1]``.
        """
        d = self.sum_xx.shape[-1]
        channels = (d - int(self.has_bias_column)) // self.kernel_numel
        ids = torch.arange(channels, device=self.sum_xx.device).repeat_interleave(self.kernel_numel)
        if self.groups > 1:
            offsets = channels * torch.arange(self.groups, device=ids.device)
            ids = ids.unsqueeze(0) + offsets.unsqueeze(1)
        if self.has_bias_column:
            ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], 1), -1)], dim=-1)
        return ids

    def _check_compatible(self, other: LayerStats) -> None:
        mine = (self.kind, self.groups, self.kernel_numel, self.has_bias_column)
        theirs = (other.kind, other.groups, other.kernel_numel, other.has_bias_column)
        if mine != theirs or self.sum_xx.shape != other.sum_xx.shape or self.sum_yx.shape != other.sum_yx.shape:
            raise ValueError(
                "cannot merge incompatible LayerStats: "
                f"(kind, groups, kernel_numel, has_bias_column, sum_xx, sum_yx) = "
                f"{(*mine, tuple(self.sum_xx.shape), tuple(self.sum_yx.shape))} vs "
                f"{(*theirs, tuple(other.sum_xx.shape), tuple(other.sum_yx.shape))}"
            )

    def __add__(self, other: LayerStats) -> LayerStats:
        """Statistics of the union of both row sets: sums and counts add."""
        if not isinstance(other, LayerStats):
            return NotImplemented
        self._check_compatible(other)
        return LayerStats(
            sum_xx=self.sum_xx + other.sum_xx,
            sum_yx=self.sum_yx + other.sum_yx,
            sum_yy=self.sum_yy + other.sum_yy,
            count=self.count + other.count,
            kind=self.kind,
            groups=self.groups,
            kernel_numel=self.kernel_numel,
            has_bias_column=self.has_bias_column,
        )

    def __radd__(self, other: object) -> LayerStats:
        """Allow ``sum(list_of_stats)`` (which starts from 0)."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def merge(self, other: LayerStats) -> LayerStats:
        """Add ``other``'s sums and count into ``self`` in place; returns ``self``."""
        self._check_compatible(other)
        self.sum_xx += other.sum_xx
        self.sum_yx += other.sum_yx
        self.sum_yy += other.sum_yy
        self.count += other.count
        return self

    def _accumulate(self, x_rows: Tensor, y_rows: Tensor) -> None:
        """Add rows ``(N, d)``/``(N, h)``, or ``(g, N, d_g)``/``(g, N, h_g)`` per conv group."""
        if self.groups > 1:
            self.sum_xx.baddbmm_(x_rows.transpose(1, 2), x_rows)
            self.sum_yx.baddbmm_(y_rows.transpose(1, 2), x_rows)
        else:
            self.sum_xx.addmm_(x_rows.T, x_rows)
            self.sum_yx.addmm_(y_rows.T, x_rows)
        self.sum_yy += y_rows.square().sum()
        self.count += x_rows.shape[-2]


def _layer_kind(module: nn.Module, name: str | None = None) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    label = f"layer {name!r} ({type(module).__name__})" if name is not None else type(module).__name__
    raise ValueError(f"unsupported module type for activation statistics: {label}; supported: {SUPPORTED_LAYERS}")


def _append_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


def _padding_pairs(conv: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as ``nn.Conv*`` applies it ('same' may be asymmetric)."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def _conv_rows(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    spatial = len(conv.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if x.dim() != spatial + 2 or x.shape[1] != conv.in_channels:
        raise ValueError(
            f"{type(conv).__name__} expects input (N, {conv.in_channels}, *{spatial} spatial dims), "
            f"got {tuple(x.shape)}"
        )
    if conv.padding_mode not in _PAD_MODES:
        raise ValueError(f"unsupported padding_mode {conv.padding_mode!r}; supported: {sorted(_PAD_MODES)}")
    pad = [p for pair in reversed(_padding_pairs(conv)) for p in pair]
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[conv.padding_mode])
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)
    batch, cols, positions = patches.shape
    if conv.groups == 1:
        return patches.transpose(1, 2).reshape(batch * positions, cols)
    d_g = cols // conv.groups
    return patches.view(batch, conv.groups, d_g, positions).permute(1, 0, 3, 2).reshape(conv.groups, -1, d_g)


def layer_inputs_to_rows(module: nn.Module, x: Tensor, *, bias: bool = False) -> Tensor:
    """Rewrite a layer's input as the rows ``x`` of the linear map ``y = W_flat x``.

    * ``nn.Linear``: ``x`` of any leading shape ``(..., in_features)`` becomes
      ``(N, in_features)``.
    * ``nn.Conv1d``/``nn.Conv2d`` (batched or unbatched input): one row per
      (sample, output position) holding its receptive field (seed 003 §2.5),
      honouring stride, padding (ints, ``'valid'``, ``'same'``), every
      ``padding_mode``, dilation and groups.  Columns follow
      ``module.weight.reshape(out_channels, -1)`` (channel-major, then kernel
      offsets) and rows follow ``(sample, output positions row-major)``, so
      ``module(x)`` equals ``rows @ W_flat.T + b`` reshaped.  For
      ``groups = g > 1`` the result is ``(g, N, d_g)``: conv group ``j`` is
      ``rows[j] @ W_flat[j*h_g:(j+1)*h_g].T``.

    With ``bias=True`` a constant 1 column is appended (last), so that
    ``y = rows @ [W_flat, b].T`` (seed 000).  The dtype and device of ``x``
    are kept.

    Raises:
        ValueError: unsupported module type or input shape.
    """
    if _layer_kind(module) == "linear":
        if x.dim() == 0 or x.shape[-1] != module.in_features:
            raise ValueError(f"Linear expects input (..., {module.in_features}), got {tuple(x.shape)}")
        rows = x.reshape(-1, module.in_features)
    else:
        rows = _conv_rows(module, x)
    return _append_ones(rows) if bias else rows


def _output_rows(kind: str, out_features: int, spatial: int, y: Tensor) -> Tensor:
    """Layer output as rows ``(N, h)`` aligned with :func:`layer_inputs_to_rows`."""
    if kind == "linear":
        return y.reshape(-1, out_features)
    if y.dim() == spatial + 1:
        y = y.unsqueeze(0)
    return y.reshape(y.shape[0], out_features, -1).transpose(1, 2).reshape(-1, out_features)


def _split_groups(y_rows: Tensor, groups: int) -> Tensor:
    return y_rows.reshape(y_rows.shape[0], groups, -1).transpose(0, 1) if groups > 1 else y_rows


class _Collector:
    """Per-layer hook state: converts one call's input (and target) into rows and accumulates."""

    def __init__(self, name: str, module: nn.Module, *, append_bias: bool, device: torch.device, self_target: bool):
        self.name = name
        self.module = module
        self.kind = _layer_kind(module, name)
        self.groups = module.groups if self.kind == "conv" else 1
        self.out_features = module.out_features if self.kind == "linear" else module.out_channels
        self.append = append_bias and module.bias is not None
        self.device = device
        self.pending: deque[Tensor] = deque()
        self.spatial = len(module.kernel_size) if self.kind == "conv" else 0
        h_g = self.out_features // self.groups
        weight = module.weight.detach().to(device=device, dtype=torch.float64).reshape(self.out_features, -1)
        bias = module.bias.detach().to(device=device, dtype=torch.float64) if module.bias is not None else None
        self.fixed_bias = None if self.append else bias
        self.target_weight = None
        if self_target:
            if self.append:
                weight = torch.cat([weight, bias.unsqueeze(1)], dim=1)
            self.target_weight = weight.reshape(self.groups, h_g, -1) if self.groups > 1 else weight
        self.stats = LayerStats.zeros(
            module.weight[0].numel() + int(self.append),
            h_g,
            kind=self.kind,
            groups=self.groups,
            kernel_numel=math.prod(module.kernel_size) if self.kind == "conv" else 1,
            has_bias_column=self.append,
            device=device,
        )

    def _targets(self, x_rows: Tensor) -> Tensor:
        if self.target_weight is not None:
            return x_rows @ self.target_weight.transpose(-1, -2)
        if not self.pending:
            raise RuntimeError(
                f"layer {self.name!r} ran more often in model than in reference_model on the same batch"
            )
        y = _output_rows(self.kind, self.out_features, self.spatial, self.pending.popleft())
        y = y.to(device=self.device, dtype=torch.float64)
        if self.fixed_bias is not None:
            y = y - self.fixed_bias
        return _split_groups(y, self.groups)

    def input_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        x = args[0] if args else kwargs["input"]
        x = x.detach().to(device=self.device, dtype=torch.float64)
        x_rows = layer_inputs_to_rows(module, x, bias=self.append)
        self.stats._accumulate(x_rows, self._targets(x_rows))

    def reference_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.pending.append(output.detach())


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to_device(obj: object, device: torch.device) -> object:
    """Move the tensors of a (nested) batch to ``device``; tuples and lists come back as lists."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_device(v, device) for v in obj]
    return obj


def _run(model: nn.Module, inputs: object) -> None:
    inputs = _to_device(inputs, _model_device(model))
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, list):
        model(*inputs)
    else:
        model(inputs)


def _resolve(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"unknown layer name {name!r} in {what}") from None


def collect_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable,
    *,
    target: str = "self",
    reference_model: nn.Module | None = None,
    append_bias: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Accumulate :class:`LayerStats` for the named layers in one pass over ``batches``.

    Args:
        model: ``nn.Module`` or ``torch.fx.GraphModule``; ``x`` is each named
            layer's input in this model.  Put it in ``eval()`` mode first.
        layer_names: qualified submodule names (``model.get_submodule``) of
            ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers.
        batches: iterable of tensors or ``(inputs, target)`` tuples; ``inputs``
            may be a tensor, a tuple of positional inputs or a dict of keyword
            inputs.  Each batch is moved to the model's device.
        target: ``"self"``: ``y`` is the layer's own output ``W x (+ b)``
            computed in float64 from the rows (parallel, seed 003 §2.7);
            ``"reference"``: ``y`` is the output of the same-named layer of
            ``reference_model`` on the same batch (top-down, seed 003 §2.7).
        reference_model: required for ``target="reference"``; its named layers
            must have the same type and number of outputs as ``model``'s.
        append_bias: append the constant-1 column to ``x`` of layers that have
            a bias (seed 000); otherwise the bias is treated as fixed and
            subtracted from ``y`` (see the module docstring).
        device: where the float64 sums live (default: the model's device).
        progress: show a tqdm progress bar.

    Returns:
        ``{name: LayerStats}`` in the order of ``layer_names``.  Memory is
        O(d^2) per layer; activations are never kept beyond the current batch.

    Raises:
        ValueError: unknown layer name, unsupported module type, invalid
            ``target``/``reference_model`` combination.
    """
    if target not in ("self", "reference"):
        raise ValueError(f"target must be 'self' or 'reference', got {target!r}")
    if (target == "reference") != (reference_model is not None):
        raise ValueError("reference_model must be given exactly when target='reference'")
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(f"duplicate layer names in {list(layer_names)}")
    device = torch.device(device) if device is not None else _model_device(model)
    collectors = {
        name: _Collector(
            name,
            _resolve(model, name, "model"),
            append_bias=append_bias,
            device=device,
            self_target=target == "self",
        )
        for name in layer_names
    }
    references = {}
    if reference_model is not None:
        for name, collector in collectors.items():
            ref = _resolve(reference_model, name, "reference_model")
            if type(ref) is not type(collector.module) or ref.weight.shape[0] != collector.out_features:
                raise ValueError(
                    f"reference layer {name!r} ({type(ref).__name__}, {ref.weight.shape[0]} outputs) does not match "
                    f"model layer ({type(collector.module).__name__}, {collector.out_features} outputs)"
                )
            references[name] = ref

    handles = []
    try:
        for name, collector in collectors.items():
            handles.append(collector.module.register_forward_hook(collector.input_hook, with_kwargs=True))
            if name in references:
                handles.append(references[name].register_forward_hook(collector.reference_hook))
        with torch.no_grad():
            for batch in tqdm(batches, desc="collect_stats", disable=not progress):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                if reference_model is not None:
                    _run(reference_model, inputs)
                _run(model, inputs)
                for name, collector in collectors.items():
                    if collector.pending:
                        raise RuntimeError(
                            f"layer {name!r} ran more often in reference_model than in model on the same batch"
                        )
    finally:
        for handle in handles:
            handle.remove()
        for collector in collectors.values():
            collector.pending.clear()
    return {name: collector.stats for name, collector in collectors.items()}
