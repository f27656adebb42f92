r"""select_neurons: drop the inputs (neurons, channels) a layer can do without, and refit it.

Method (seed 003 §2.2-2.7, seed 000).  For every targeted layer ``y = W x + b`` (``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d`` with ``groups == 1``) solve, on calibration statistics,

    min_M  1/2 E||y - M x||^2 + lam * sum_j ||M[:, cols(j)]||_2

with one group per input: a feature of a Linear, the ``k*k`` unfolded columns of one input channel of
a convolution (seed 003 §2.5), or the ``H*W`` features of one channel of a flattened feature map for
a Linear that reads ``flatten(conv output)`` (seed 003 §3: channel pruning for layers following a
convolution).  ``x`` carries a constant 1 as last column whose coefficient, the new bias, is never
penalised (seed 000, "handle bias").  Only ``R_xx = E[x x^T]`` and ``R_yx = E[y x^T]`` are needed
(seed 003 §2.4; ``fxcompress.stats.collect_stats``).  The groups left non-zero are the inputs kept
(``M = P C^T``, seed 003 §2.2): the layer's weight becomes ``P`` on those inputs, its bias the bias
column, and a ``Selector`` is inserted in front of it (``fxcompress.selector.select_inputs``), so the
graph stays runnable; ``collapse`` then pushes the Selector upstream and absorbs it.

Configuration (``SelectNeuronsConfig``)::

    - select_neurons:
        targets: [{type: Linear}]   # default: every Linear/Conv1d/Conv2d (grouped convs are skipped)
        keep: 0.5                   # ratio in (0, 1] of each layer's inputs, or an integer count ...
        # lam: 0.05                 # ... XOR a penalty, relative to each layer's lambda_max (0..1)
        solver: auto                # auto | newton | bcd | fista | pgd | altmin
        tol: 1.0e-4                 # relative duality gap of every solve (tighter with debias: false)
        debias: true                # least-squares refit on the kept inputs (seed 003 §2.4)
        chaining: parallel          # parallel | top_down | bottom_up (seed 003 §2.7)
        residual: joint             # joint | dynamic
        min_keep: 1                 # never keep fewer inputs than this (capped at the layer's inputs)
        select_graph_inputs: false  # also select among raw model inputs (a dynamic input sampler)
        max_columns: 16384          # skip a (joint) group whose statistics have more columns than this

``keep`` gives each layer (each joint group) exactly ``round(keep * inputs)`` (or ``keep``) inputs
by bisection on ``lam`` (``search_lambda``).  ``lam`` solves once per layer at
``lam * lambda_max``, where ``lambda_max`` is the smallest penalty that removes every input: 0 keeps
everything (least squares: ``W`` itself when ``R_xx`` is full rank), 1 removes everything.  Either
way at least ``min_keep`` inputs survive (a solve that keeps fewer is redone with exactly
``min_keep``).

``tol`` defaults to 1e-4: the selection reads only which inputs survive, and with ``debias`` their
weights are refit by least squares, so solving each group lasso to a relative gap of 1e-6 buys
nothing.  On the zoo's statistics (vgg11, resnet101 and convnext_small layers of 385 to 4609 columns)
1e-4 keeps the same inputs as 1e-6 and takes 1.2-2x less time.  Weights taken straight from the
solver (``debias: false``) are as accurate as the solve: tighten ``tol`` there.

Chaining (seed 003 §2.7; ``Z_k`` the input of layer k in the original network, ``A_k`` in the
compressed one, ``C_k`` the selector chosen for layer k):

* ``parallel``: ``X = Z_k``, ``Y = W_k Z_k``; all statistics from the original network in one pass
  over the calibration data, every layer independent.
* ``top_down`` (top = input side): layers from input to output; ``X = A_k`` (the input the layer
  receives once every earlier layer is compressed) and ``Y = W_k Z_k`` (the original output).  One
  pass over the calibration data per layer (per joint group).
* ``bottom_up``: layers from output to input; ``X = Z_k`` and ``Y = C_{k+1}^T W_k Z_k``: only the
  outputs that the already-compressed layers downstream still read are reconstructed, the others
  get zero weights (they are dropped by the downstream Selectors, and by ``collapse``).  Which
  outputs are read is found by following the graph through Selectors, elementwise and per-channel
  ops, ties (``add``/``mul``/``sub``) and ``flatten``; any other reader counts as reading everything.

Layers are ordered by the graph position of their first (top_down, parallel) or last (bottom_up)
consumer; with joint groups spanning several blocks this order is a heuristic: a group is solved
with whatever has been decided before it.

Residual streams (seed 003 §2.6).  A Selector is absorbed statically only where every reader of a
tensor selects the same inputs.  ``residual: joint`` solves all targeted consumers whose inputs share
channels -- the same tensor, or tensors tied by elementwise/per-channel ops and by ``add``/``mul`` of
same-shaped tensors (a residual stream) -- as ONE group lasso: ``R_xx`` block-diagonal over the
consumers, ``R_yx`` block-diagonal over their outputs, and group j holding every consumer's columns
of channel j, so all of them keep the same channels and the stream shrinks after ``collapse``.  Each
consumer's target is scaled to unit energy ``E||y_i||^2`` so that large outputs do not dominate.
``residual: dynamic`` selects each consumer on its own (the seed's behaviour); Selectors on a shared
tensor then stay (partly) dynamic.

Graph inputs.  Selecting among a model's raw inputs is valid (seed 003 §2.2's input sampler
``C_0^T``) but only shrinks the first layer and stays a dynamic Gather on the input (nothing
upstream absorbs it), and for images it would drop colour planes.  So layers whose input channels
are those of a graph input (e.g. LeNet's fc1, ResNet's stem conv) are skipped unless
``select_graph_inputs: true``; the report notes them.

Report: one row per layer with the inputs kept/total, ``lam`` (absolute, and relative to
``lambda_max``), the reconstruction relative error ``E||y - M x||^2 / E||y||^2`` on the calibration
data, the solver time of its group and the group's other members.
"""
from __future__ import annotations

import copy
import math
import operator
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt, field_validator, model_validator
from torch import Tensor, fx, nn

from fxcompress import FxCompressError, TargetedConfig, register_pass
from fxcompress.graph.channels import ChannelAnalysis
from fxcompress.rewrite import finish, module_of, replace_module
from fxcompress.selector import Selector, narrowed_layer, select_inputs
from fxcompress.solvers.group_lasso import (
    SOLVERS, debias, group_lasso, lambda_max, search_lambda, support_columns)
from fxcompress.stats import LayerStats, collect_stats
from fxcompress.targets import select_modules

__all__ = ["SelectNeuronsConfig", "Consumer", "SelectionGroup", "plan_groups", "needed_channels"]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
TIE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, torch.add, torch.mul,
                 torch.sub}
TIE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


class SelectNeuronsConfig(TargetedConfig):
    keep: StrictInt | float | None = Field(
        None, description="inputs kept per layer: a ratio in (0, 1] or an integer count (exclusive with lam)")
    lam: float | None = Field(None, ge=0, le=1, description="group-lasso penalty relative to each layer's "
                                                            "lambda_max: 0 keeps every input, 1 none (exclusive "
                                                            "with keep)")
    solver: Literal[SOLVERS] = Field("auto", description="group-lasso solver: auto | newton | bcd | fista | pgd "
                                                         "| altmin")
    tol: float = Field(1e-4, gt=0, lt=1, description="relative duality gap at which a solve stops; the "
                                                     "selection reads only the support of the solution "
                                                     "(debias refits the weights): use 1e-6 or below for "
                                                     "weights straight from the solver (debias: false)")
    debias: bool = Field(True, description="least-squares refit on the kept inputs (seed 003 §2.4)")
    chaining: Literal["parallel", "top_down", "bottom_up"] = Field(
        "parallel", description="where X and Y come from when several layers are selected (seed 003 §2.7)")
    residual: Literal["joint", "dynamic"] = Field(
        "joint", description="joint: consumers of one tensor/residual stream keep the same channels; "
                             "dynamic: each layer on its own")
    min_keep: int = Field(1, ge=1, description="safety floor on the inputs kept per layer")
    select_graph_inputs: bool = Field(False, description="also select among the raw inputs of the model")
    max_columns: int = Field(16384, ge=1, description="skip a layer (joint group) whose statistics have more "
                                                      "columns than this: R_xx takes 8 columns^2 bytes")

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, value):
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"keep: a ratio must lie in (0, 1], got {value}; write an integer (e.g. 64) "
                             "for a count of inputs")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"keep: a count of inputs must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _keep_xor_lam(self):
        if (self.keep is None) == (self.lam is None):
            given = "both" if self.keep is not None else "neither"
            raise ValueError(f"give exactly one of `keep` (ratio in (0, 1] or count of inputs per layer) and "
                             f"`lam` (penalty relative to lambda_max, 0..1); got {given}")
        return self


# ------------------------------------------------------------------------------------ graph analysis


def _tensor_arg(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return arg if isinstance(arg, fx.Node) else None


def channelwise_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of `node` if it acts elementwise or per channel (ReLU, BatchNorm, pooling, ...), else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), CHANNELWISE_MODULES):
        return _tensor_arg(node)
    if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
        return _tensor_arg(node)
    if node.op == "call_method" and node.target in CHANNELWISE_METHODS:
        return _tensor_arg(node)
    return None


def flatten_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of `node` if it is ``flatten(x, 1)`` (channels then positions -> features), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        ok = isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    elif (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        ok = start == 1 and end == -1
    else:
        ok = False
    return _tensor_arg(node) if ok else None


def tied_operands(node: fx.Node, sizes: dict[fx.Node, tuple]) -> list[fx.Node]:
    """Operands of an elementwise add/mul/sub that share the output's channels (same rank and dim-1 size)."""
    is_tie = (node.op == "call_function" and node.target in TIE_FUNCTIONS) or \
             (node.op == "call_method" and node.target in TIE_METHODS)
    if not is_tie or sizes.get(node) is None:
        return []
    out = sizes[node]
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(out) < 2 or any(sizes.get(a) is None or len(sizes[a]) != len(out) or sizes[a][1] != out[1]
                           for a in operands):
        return []
    return operands


@dataclass
class Consumer:
    """A targeted layer, and how its input columns map onto the channels of the tensor it reads.

    `source` is the tensor whose dim-1 channels the groups are: the layer's input, or the feature map
    before a ``flatten`` for a Linear reading ``flatten(x, 1)``; `per_channel` is the number of input
    features per source channel (``H*W`` of that map; 1 otherwise; a conv's ``k*k`` columns are
    grouped by the statistics already).  `stream` is the class of the channel axis it reads in the
    channel analysis (`ChannelAnalysis.same_channels`), None when the analysis has no such axis.
    """
    name: str
    node: fx.Node
    source: fx.Node
    per_channel: int
    channels: int
    stream: int | None

    def input_indices(self, kept_channels: Tensor) -> Tensor:
        """The layer's input indices (features or channels) for the kept source channels."""
        offsets = torch.arange(self.per_channel)
        return (kept_channels[:, None] * self.per_channel + offsets).flatten()


@dataclass
class SelectionGroup:
    """Consumers solved as one group lasso: they keep the same `channels`-sized channel set."""
    consumers: list[Consumer]
    channels: int
    first: int = 0   # graph position of the first consumer
    last: int = 0    # graph position of the last consumer

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.consumers]


def _shapes_by_node(gm: fx.GraphModule, shapes: dict[str, tuple]) -> dict[fx.Node, tuple]:
    """The shape analysis (node name -> shape) keyed by node, for the nodes that output one tensor."""
    sizes = {}
    for node in gm.graph.nodes:
        shape = shapes.get(node.name)
        if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
            sizes[node] = shape
    return sizes


def _consumer(gm: fx.GraphModule, name: str, node: fx.Node, sizes: dict, classes: dict) -> Consumer:
    layer = gm.get_submodule(name)
    x = node.args[0]
    if isinstance(layer, nn.Linear):
        walk = x
        while channelwise_input(gm, walk) is not None:
            walk = channelwise_input(gm, walk)
        flat = flatten_input(gm, walk)
        if flat is not None and flat in sizes and len(sizes[flat]) >= 2:
            per_channel = math.prod(sizes[flat][2:])
            return Consumer(name, node, flat, per_channel, layer.in_features // per_channel,
                            classes.get((flat.name, 1)))
        dim = len(sizes[x]) - 1 if x in sizes else -1
        return Consumer(name, node, x, 1, layer.in_features, classes.get((x.name, dim)))
    return Consumer(name, node, x, 1, layer.in_channels, classes.get((x.name, 1)))


def plan_groups(gm: fx.GraphModule, names: list[str], shapes: dict[str, tuple], analysis: ChannelAnalysis, *,
                joint: bool, graph_inputs: bool) -> tuple[list[SelectionGroup], dict[str, str]]:
    """The selection groups of the targeted layers `names`, in graph order, and why others are skipped.

    With `joint`, consumers reading the same channels (one class of the channel analysis's
    `same_channels`: a residual stream, through its adds, BatchNorms and activations) form one group;
    otherwise (and for consumers outside any class) each layer is its own group.  Layers reading a graph
    input's channels are skipped unless `graph_inputs`, and so are layers the graph does not call exactly
    once.
    """
    sizes = _shapes_by_node(gm, shapes)
    classes = analysis.same_channels()
    input_classes = {classes.get((n.name, 1)) for n in gm.graph.nodes if n.op == "placeholder"} - {None}
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[object, SelectionGroup] = {}
    skipped = {}
    for name in names:
        if len(calls.get(name, [])) != 1:
            skipped[name] = f"called {len(calls.get(name, []))} times by the graph (inside a leaf module, or shared)"
            continue
        consumer = _consumer(gm, name, calls[name][0], sizes, classes)
        if not graph_inputs and consumer.stream in input_classes:
            skipped[name] = "reads the model's input (set select_graph_inputs: true to sample it)"
            continue
        key = ("stream", consumer.stream) if joint and consumer.stream is not None else name
        group = groups.setdefault(key, SelectionGroup([], consumer.channels))
        group.consumers.append(consumer)
    for group in groups.values():
        group.first = min(order[c.node] for c in group.consumers)
        group.last = max(order[c.node] for c in group.consumers)
    return sorted(groups.values(), key=lambda g: g.first), skipped


def _with_selector_shapes(gm: fx.GraphModule, sizes: dict[fx.Node, tuple]) -> dict[fx.Node, tuple]:
    """`sizes` of the original nodes plus the output sizes of Selector nodes inserted since."""
    out = dict(sizes)
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, Selector) and node not in out and module.dim in (1, -1):
            source = out.get(node.args[0])
            if source is not None and (module.dim == 1 or len(source) == 2):
                out[node] = (source[0], module.keep.numel(), *source[2:])
    return out


def _read_by(gm: fx.GraphModule, user: fx.Node, node: fx.Node, need: dict, sizes: dict) -> Tensor | None:
    """The channels (dim 1) of `node` that `user` passes on to what is read downstream; None: all."""
    module = module_of(gm, user)
    if isinstance(module, Selector):
        if not (module.dim == 1 or len(sizes[node]) == 2):
            return None
        after = need.get(user)
        mask = torch.zeros(sizes[node][1], dtype=torch.bool)
        mask[module.keep.cpu() if after is None else module.keep.cpu()[after]] = True
        return mask
    if channelwise_input(gm, user) is node or node in tied_operands(user, sizes):
        return need.get(user)
    if flatten_input(gm, user) is node and user in need and need[user] is not None:
        return need[user].reshape(sizes[node][1], -1).any(1)
    return None


def needed_channels(gm: fx.GraphModule, sizes: dict[fx.Node, tuple]) -> dict[fx.Node, Tensor | None]:
    """For every node, the bool mask of its dim-1 channels read downstream (None: all, or unknown).

    Follows the graph backwards through Selectors (a Selector reads its `keep`), elementwise and
    per-channel ops, tied add/mul/sub operands and ``flatten``; any other reader (a layer, the output,
    an op without a rule) reads every channel.  Seed 003 §2.7 ``C_{k+1}^T`` for bottom-up chaining.
    """
    sizes = _with_selector_shapes(gm, sizes)
    need: dict[fx.Node, Tensor | None] = {}
    for node in reversed(list(gm.graph.nodes)):
        if node not in sizes or len(sizes[node]) < 2 or not node.users:
            need[node] = None
            continue
        mask = torch.zeros(sizes[node][1], dtype=torch.bool)
        for user in node.users:
            read = _read_by(gm, user, node, need, sizes)
            if read is None or read.numel() != mask.numel():
                mask = None
                break
            mask |= read
        need[node] = mask
    return need


# ------------------------------------------------------------------------------------ the solve


@dataclass
class _Block:
    """One consumer's part of a (joint) problem: statistics on the reconstructed output rows."""
    consumer: Consumer
    stats: LayerStats
    rows: Tensor | None      # output rows reconstructed (bottom_up), None: all
    Rxx: Tensor
    Ryx: Tensor
    energy: float            # E||y_rows||^2
    groups: Tensor           # source channel of every column, -1 for the bias column

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.energy) if self.energy > 0 else 1.0


def _column_channels(consumer: Consumer, stats: LayerStats) -> Tensor:
    ids = stats.column_groups().clone()
    ids[ids >= 0] //= consumer.per_channel
    return ids


def _augmented_weight(layer: nn.Module, with_bias: bool) -> Tensor:
    weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    return torch.cat([weight, layer.bias.detach().double()[:, None]], 1) if with_bias else weight


def _block(consumer: Consumer, stats: LayerStats, rows: Tensor | None, layer: nn.Module) -> _Block:
    Ryx = stats.Ryx
    energy = float(stats.ryy)
    if rows is not None:
        Ryx = Ryx[rows]
        energy = float((_augmented_weight(layer, stats.has_bias_column)[rows] * Ryx).sum())
    return _Block(consumer, stats, rows, stats.Rxx, Ryx, energy, _column_channels(consumer, stats))


@dataclass
class _Solution:
    support: Tensor          # bool over the group's channels
    weights: list[Tensor]    # per consumer: M (h x d, full rows, bias column last if any)
    lam: float
    lam_max: float
    seconds: float


def _keep_count(config: SelectNeuronsConfig, channels: int) -> int:
    count = config.keep if isinstance(config.keep, int) else max(1, round(config.keep * channels))
    return min(max(count, config.min_keep), channels)


def _row_basis(block: _Block) -> tuple[Tensor | None, Tensor]:
    """The block's scaled target ``B = s Ryx`` (h x d) as ``(Q, Q^T B)`` with ``Q`` (h x d) orthonormal when it has
    more rows than columns (the expansion convs of inverted residuals: h = 6 C), else ``(None, B)``.  Exact: the
    objective only reads ``M`` through ``tr(M R M^T) - 2 tr(M B^T)`` and group norms, and with ``M = Q M~`` both
    are those of ``M~`` on ``Q^T B`` (the solver's output-space reduction, done per block before the joint
    statistics are formed, so that they take sum(d) instead of sum(h) rows)."""
    B = block.Ryx * block.scale
    if B.shape[0] <= B.shape[1]:
        return None, B
    Q, T = torch.linalg.qr(B)
    return Q, T


def _solve(blocks: list[_Block], config: SelectNeuronsConfig, channels: int) -> _Solution:
    """One group lasso over all blocks: block-diagonal statistics, channel j's columns of every block
    forming group j, each block's target scaled to unit energy.  The debiasing refit on the support
    decouples over the blocks, so it runs per block once the joint statistics are freed."""
    start = time.perf_counter()
    bases, targets = zip(*[_row_basis(b) for b in blocks])
    Rxx = torch.block_diag(*[b.Rxx for b in blocks])
    Ryx = torch.block_diag(*targets)
    groups = torch.cat([b.groups for b in blocks])
    options = {"solver": config.solver, "tol": config.tol, "ryy": sum(b.energy * b.scale ** 2 for b in blocks)}
    floor = min(config.min_keep, channels)
    if config.keep is not None:
        result = search_lambda(Rxx, Ryx, _keep_count(config, channels), groups, **options)
    else:
        result = group_lasso(Rxx, Ryx, config.lam * lambda_max(Rxx, Ryx, groups), groups, **options)
        if int(result.support.sum()) < floor:
            result = search_lambda(Rxx, Ryx, floor, groups, **options)
    del Rxx, Ryx
    weights, row, col = [], 0, 0
    for b, Q, B in zip(blocks, bases, targets):
        h, d = B.shape
        if config.debias:
            M = debias(b.Rxx, B, support_columns(result.support, b.groups))
        else:
            M = result.M[row:row + h, col:col + d]
        weights.append(_unscaled(M if Q is None else Q @ M, b))
        row, col = row + h, col + d
    return _Solution(result.support, weights, result.lam, result.lam_max, time.perf_counter() - start)


def _unscaled(M: Tensor, b: _Block) -> Tensor:
    """The block's M, unscaled, with zero rows for the outputs it does not reconstruct."""
    full = torch.zeros(b.stats.sum_yx.shape, dtype=M.dtype)
    full[b.rows if b.rows is not None else slice(None)] = M / b.scale
    return full


def _relative_error(b: _Block, M: Tensor) -> float:
    """E||y - M x||^2 / E||y||^2 on the block's reconstructed rows (seed 003 §2.4: Gram form)."""
    Mr = M[b.rows] if b.rows is not None else M
    error = b.energy - 2 * float((Mr * b.Ryx).sum()) + float(((Mr @ b.Rxx) * Mr).sum())
    return max(error, 0.0) / b.energy if b.energy > 0 else 0.0


# ------------------------------------------------------------------------------------ rewriting


def _narrow(gm: fx.GraphModule, consumer: Consumer, kept_channels: Tensor, M: Tensor, has_bias: bool) -> int:
    """Give the layer the weight P (and bias) of `M` on the kept inputs behind a Selector; returns inputs kept."""
    layer = gm.get_submodule(consumer.name)
    indices = consumer.input_indices(kept_channels)
    kernel = tuple(layer.weight.shape[2:])
    columns = (indices[:, None] * math.prod(kernel) + torch.arange(math.prod(kernel))).flatten()
    weight = M[:, columns].reshape(layer.weight.shape[0], indices.numel(), *kernel)
    bias = M[:, -1] if has_bias else None
    total = layer.weight.shape[1]
    if indices.numel() == total:
        replace_module(gm, consumer.name, narrowed_layer(layer, indices, weight, bias))
    else:
        select_inputs(gm, consumer.node, indices, weight, bias)
    return total


# ------------------------------------------------------------------------------------ the pass


def _targets(gm: fx.GraphModule, config: SelectNeuronsConfig) -> tuple[list[str], list[str]]:
    """Targeted layers that can be selected, and the grouped convolutions among the targets."""
    names = select_modules(gm, config.targets, config.exclude, LAYER_TYPES)
    grouped = [n for n in names if getattr(gm.get_submodule(n), "groups", 1) != 1]
    return [n for n in names if n not in grouped], grouped


def _inputs(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _reads_a_placeholder(gm: fx.GraphModule, name: str) -> bool:
    """Whether the layer's input is a graph input, up to elementwise/per-channel ops and ``flatten``."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    x = node.args[0] if node is not None and node.args else None
    while isinstance(x, fx.Node) and x.op != "placeholder":
        x = channelwise_input(gm, x) or flatten_input(gm, x)
    return isinstance(x, fx.Node)


def _check(gm: fx.GraphModule, config: SelectNeuronsConfig) -> None:
    """Before any work: a `keep` count must not exceed the inputs of any layer that will be selected."""
    names, _ = _targets(gm, config)
    if isinstance(config.keep, int):
        for name in names:
            if not config.select_graph_inputs and _reads_a_placeholder(gm, name):
                continue
            inputs = _inputs(gm.get_submodule(name))
            if config.keep > inputs:
                raise ValueError(f"keep: {config.keep} is more than the {inputs} inputs of layer '{name}': give "
                                 f"a count <= {inputs}, a ratio in (0, 1], or exclude '{name}'")


def _check_groups(groups: list[SelectionGroup], config: SelectNeuronsConfig) -> None:
    if not isinstance(config.keep, int):
        return
    for group in groups:
        if config.keep > group.channels:
            raise FxCompressError(f"select_neurons: keep: {config.keep} is more than the {group.channels} input "
                                  f"channels of layer(s) {', '.join(group.names)} (a Linear after flatten selects "
                                  "whole channels): give a smaller count or a ratio, or exclude them")


def _note_gathers_that_stay(ctx, gm: fx.GraphModule, groups: list[SelectionGroup]) -> None:
    """Tell, before solving, which selections collapse cannot fully absorb upstream, from the channel-dependency
    analysis (``fxcompress.graph.channels``): the consumers whose input channels no Linear/Conv makes, that an
    op without a rule (or a normalisation over the channels) freezes, that a grouped convolution splits into
    blocks, or that other layers read with a selection of their own (or none). There the Selector stays, in
    part, an ONNX Gather in front of the layer."""
    analysis = ctx.analysis("channels", gm)
    for group in groups:
        names = {c.node.name for c in group.consumers}
        for consumer in group.consumers:
            channels = analysis.consumer_group(consumer.node.name)
            if channels is None:
                continue
            why = list(channels.frozen_by) + [f"normalised by {n}" for n in channels.normalized_by]
            if not channels.producers:
                why.append("no Linear/Conv makes these channels")
            if channels.blocks > 1:
                why.append(f"split into {channels.blocks} blocks by a grouped op")
            others = sorted({port.module or port.node for port in channels.consumers if port.node not in names})
            if others:
                why.append(f"also read by {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} "
                           "with a selection of their own")
            if why:
                ctx.note(f"{consumer.name}: its input channels cannot all shrink upstream ({'; '.join(why[:2])}): "
                         "the selection may stay a Gather in front of it (see `fxcompress inspect --groups`)")


def _columns(gm: fx.GraphModule, group: SelectionGroup) -> int:
    """Columns of the group's joint statistics: every consumer's weight inputs plus its bias column."""
    return sum(gm.get_submodule(c.name).weight[0].numel() + 1 for c in group.consumers)


def _affordable(ctx, gm: fx.GraphModule, groups: list[SelectionGroup], config) -> list[SelectionGroup]:
    """The groups whose statistics fit `max_columns`; the others are skipped with a note."""
    kept = []
    for group in groups:
        columns = _columns(gm, group)
        if columns <= config.max_columns:
            kept.append(group)
            continue
        ctx.note(f"skipped {', '.join(group.names)}: {columns:,} input columns (R_xx would take "
                 f"{8 * columns ** 2 / 2 ** 30:.1f} GiB) exceed max_columns {config.max_columns:,}; raise max_columns "
                 "to select them")
    return kept


def _partial(mask: Tensor | None) -> Tensor | None:
    """A bool row mask when only some (but not no) outputs are read downstream, else None (all rows)."""
    return mask if mask is not None and bool(mask.any()) and not bool(mask.all()) else None


def _order(groups: list[SelectionGroup], chaining: str) -> list[SelectionGroup]:
    if chaining == "bottom_up":
        return sorted(groups, key=lambda g: g.last, reverse=True)
    return groups


def _statistics(gm, reference, names, batches, device) -> dict[str, LayerStats]:
    """Statistics of `names`: X and Y from `gm` (reference None), or X from `gm` and Y from `reference`."""
    kw = {"device": device, "progress": False, "append_bias": True}
    if reference is None:
        return collect_stats(gm, names, batches, target="self", **kw)
    return collect_stats(gm, names, batches, target="reference", reference_model=reference, **kw)


def _record(ctx, group: SelectionGroup, blocks: list[_Block], solution: _Solution, totals: list[int]) -> None:
    kept = int(solution.support.sum())
    for block, M, total in zip(blocks, solution.weights, totals):
        c = block.consumer
        ctx.record_layer(name=c.name, kept=kept * c.per_channel, total=total,
                         lam=solution.lam, lam_relative=solution.lam / solution.lam_max if solution.lam_max else 0.0,
                         rel_error=_relative_error(block, M), seconds=round(solution.seconds, 4),
                         joint_with=[n for n in group.names if n != c.name])


@register_pass("select_neurons", config=SelectNeuronsConfig, target_types=LAYER_TYPES, needs=("calibration",),
               check=_check)
def select_neurons(gm, ctx, config):
    """Group-lasso reconstruction of the targeted layers on fewer inputs, behind Selectors (seed 003)."""
    names, grouped = _targets(gm, config)
    shapes = ctx.analysis("shapes", gm)
    groups, skipped = plan_groups(gm, names, shapes, ctx.analysis("channels", gm), joint=config.residual == "joint",
                                  graph_inputs=config.select_graph_inputs)
    _check_groups(groups, config)
    groups = _affordable(ctx, gm, groups, config)
    for name in grouped:
        ctx.note(f"skipped {name}: grouped convolution (select the inputs of the layer after it instead)")
    for name, reason in skipped.items():
        ctx.note(f"skipped {name}: {reason}")
    if not groups:
        ctx.note("no layer selected")
        return gm
    _note_gathers_that_stay(ctx, gm, groups)
    batches = ctx.calibration_batches("select_neurons")
    sizes = _shapes_by_node(gm, shapes)
    reference = copy.deepcopy(gm) if config.chaining == "top_down" else None
    stats = None if reference is not None else \
        _statistics(gm, None, [n for g in groups for n in g.names], batches, ctx.device)
    selected: dict[str, Tensor] = {}
    bar = ctx.progress(_order(groups, config.chaining), desc="select_neurons", total=len(groups))
    for group in bar:
        bar.set_postfix_str(group.names[0] + (f" +{len(group.names) - 1} joint" if len(group.names) > 1 else ""))
        group_stats = stats or _statistics(gm, reference, group.names, batches, ctx.device)
        need = needed_channels(gm, sizes) if config.chaining == "bottom_up" else {}
        blocks = [_block(c, group_stats[c.name], _partial(need.get(c.node)), gm.get_submodule(c.name))
                  for c in group.consumers]
        solution = _solve(blocks, config, group.channels)
        kept_channels = torch.nonzero(solution.support).flatten().cpu()
        totals = [_narrow(gm, b.consumer, kept_channels, M, b.stats.has_bias_column)
                  for b, M in zip(blocks, solution.weights)]
        _record(ctx, group, blocks, solution, totals)
        selected.update({c.name: c.input_indices(kept_channels) for c in group.consumers})
        finish(gm)
    ctx.state["select_neurons"] = selected
    ctx.note(f"{config.chaining} selection of {sum(len(g.consumers) for g in groups)} layer(s) in "
             f"{len(groups)} group(s) ({config.residual} residual streams)")
    return gm
