"""Channel-dependency analysis: which channel axes of which tensors must change together.

Every axis of every tensor in the graph — ``(tensor name, dim)`` — is a node of a networkx graph. Each op
adds edges between the axes whose index sets must shrink together, marks where channels are made
(*producers*: the output channel axis of a Linear/ConvNd, whose weight rows can be dropped) and where
they are read through weights (*consumers*: the input channel axis of a Linear/ConvNd), and *freezes*
the axes it cannot map. The connected components that hold a producer or a consumer are the
dependency groups: removing channel ``u`` of a group removes the matching indices of every member.

Edges carry how indices map across them:

- ``same``: index ``i`` is index ``i`` on both sides (elementwise ops, BatchNorm, depthwise conv, permutes).
- ``offset``: a piece of a ``cat`` (or ``split``/``chunk``/slice) — piece index ``i`` is whole index ``o + i``.
- ``scale``: a coarse axis against a finer one — coarse index ``c`` is fine indices ``[c*k, (c+1)*k)``
  (channels flattened into a Linear's features, a depthwise conv with channel multiplier ``k``).

A tensor name is the fx node's name, or ``name[i]`` for element ``i`` of a node that returns a tuple.
Ops without a rule freeze every axis they touch and are listed; nothing is guessed. The model's inputs
and outputs are frozen too: the classifier's outputs are never removable.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
from torch import fx, nn

from ..context import register_analysis
from .shapes import propagate_shapes

Axis = tuple[str, int]

ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "neg", "pos", "iadd", "isub", "imul", "itruediv",
    "add_", "sub_", "mul_", "div_", "rsub", "true_divide", "pow", "where", "maximum", "minimum",
    "masked_fill", "eq", "ne", "lt", "gt", "le", "ge", "and_", "or_", "relu", "relu_", "relu6", "gelu",
    "silu", "sigmoid", "sigmoid_", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu",
    "selu", "mish", "softplus", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "stochastic_depth", "contiguous", "clone", "detach", "to", "float", "half", "double", "type_as", "abs",
    "exp", "log", "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "erf", "sign", "square", "expand",
    "expand_as", "batch_norm", "instance_norm",
}
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)
POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample)
RESHAPES = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "unflatten", "view_as", "reshape_as"}
TRANSPOSES = {"transpose", "swapaxes", "swapdims"}
CATS = {"cat", "concat", "concatenate"}
SPLITS = {"chunk", "split", "tensor_split"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
SOFTMAXES = {"softmax", "log_softmax"}
ATTENTION = {"einsum", "matmul", "bmm", "mm", "baddbmm", "scaled_dot_product_attention",
             "shifted_window_attention"}
SIZE_READS = {"size", "numel"}
IGNORED = {"dim", "_assert", "getattr"}


@dataclass(frozen=True)
class Port:
    """Where channels of a group are made (producer) or read through weights (consumer)."""
    node: str
    module: str | None
    kind: str
    axis: Axis
    size: int


@dataclass
class Member:
    """One axis of a group. Its index ``j`` is the group's channel ``offset + j // inner``."""
    tensor: str
    dim: int
    size: int
    offset: int | None = None
    inner: int = 1


@dataclass
class ChannelGroup:
    """Axes whose index sets must change together, with who makes and who reads them.

    `size` counts the group's channels (a concatenation counts all its pieces; flattened features count
    once per channel). `blocks` > 1 means removals must be balanced across that many equal blocks (grouped
    convs, GroupNorm). `normalized_by` lists normalisations whose statistics span the axis: shrinking the
    group there is structurally valid but not function-preserving. `params` are get_attr tensors that
    must be sliced along with the group.
    """
    id: int
    size: int
    producers: list[Port]
    consumers: list[Port]
    members: list[Member]
    ops: list[str]
    frozen_by: list[str]
    normalized_by: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    blocks: int = 1

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_by)

    @property
    def removable(self) -> bool:
        """Channels can be removed here: not frozen, and some Linear/Conv makes them."""
        return not self.frozen and bool(self.producers)


@dataclass
class FrozenOp:
    """An op that froze the channels of the groups `groups`, and why."""
    node: str
    op: str
    reason: str
    groups: list[int]


@dataclass
class ChannelAnalysis:
    """The dependency groups of a graph and the ops that froze some of them."""
    groups: list[ChannelGroup]
    frozen_ops: list[FrozenOp]
    no_rule: list[str]
    graph: nx.MultiGraph = field(repr=False)

    def group_of(self, tensor: str, dim: int) -> ChannelGroup | None:
        """The group holding axis `dim` of the tensor `tensor` (an fx node name), if any."""
        for group in self.groups:
            if any(m.tensor == tensor and m.dim == dim for m in group.members):
                return group
        return None

    def producer_group(self, node: str) -> ChannelGroup | None:
        """The group of the output channels of the Linear/Conv called by the fx node `node`."""
        return next((g for g in self.groups if any(p.node == node for p in g.producers)), None)

    def consumer_group(self, node: str) -> ChannelGroup | None:
        """The group of the input channels of the Linear/Conv called by the fx node `node`."""
        return next((g for g in self.groups if any(c.node == node for c in g.consumers)), None)

    def same_channels(self) -> dict[Axis, int]:
        """A class id for every axis: axes of one class hold the same channels in the same order.

        Classes follow the `same` ties only (elementwise and broadcasting ops, residual adds, BatchNorm,
        pooling, depthwise convs, permutes, flattening 1x1 maps): not through concatenations or splits
        (offsets), flattening larger maps (scales), nor through a normalisation whose statistics span the channels (LayerNorm, GroupNorm),
        across which removing a channel would change every other one.  Layers reading axes of one class
        can share one channel selection (`select_neurons`' joint groups)."""
        normalizers = {name for group in self.groups for name in group.normalized_by}
        same = nx.Graph()
        same.add_nodes_from(self.graph.nodes)
        same.add_edges_from((a, b) for a, b, edge in self.graph.edges(data=True) if edge["op"] not in normalizers
                            and (edge["kind"] == "same" or (edge["kind"] == "scale" and edge["value"] == 1)))
        return {axis: index for index, component in enumerate(nx.connected_components(same)) for axis in component}


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(d, int) for d in value)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """What a node calls: the module type, the function or method name, or the node's op."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return _op_name(node) if node.op.startswith("call_") else node.op


def _arg(node: fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _dims_tuple(value, rank: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(int(d) % rank for d in values)


def reshape_segments(shape_in: tuple, shape_out: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair minimal runs of input dims and output dims with equal products (size-1 dims left out).

    ``(N, C, H, W) -> (N, C*H*W)`` gives ``[([0], [0]), ([1, 2, 3], [1])]``. Raises ValueError when the
    sizes cannot be paired.
    """
    ins = [d for d, s in enumerate(shape_in) if s != 1]
    outs = [d for d, s in enumerate(shape_out) if s != 1]
    segments, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        seg_in, seg_out = [ins[i]], [outs[j]]
        size_in, size_out = shape_in[ins[i]], shape_out[outs[j]]
        i, j = i + 1, j + 1
        while size_in != size_out:
            grow_in = size_in < size_out
            if (i >= len(ins)) if grow_in else (j >= len(outs)):
                raise ValueError(f"cannot pair the dims of {shape_in} with {shape_out}")
            if grow_in:
                size_in *= shape_in[ins[i]]
                seg_in.append(ins[i])
                i += 1
            else:
                size_out *= shape_out[outs[j]]
                seg_out.append(outs[j])
                j += 1
        segments.append((seg_in, seg_out))
    if i != len(ins) or j != len(outs):
        raise ValueError(f"cannot pair the dims of {shape_in} with {shape_out}")
    return segments


class _Builder:
    """Walks the graph once, adding each op's edges, ports and freezes to the axis graph."""

    def __init__(self, gm: fx.GraphModule, shapes: dict):
        self.gm = gm
        self.graph = nx.MultiGraph()
        self.shapes: dict[str, tuple] = {}
        self.freezes: dict[Axis, list[tuple[str, str, str]]] = defaultdict(list)
        self.producers: list[Port] = []
        self.consumers: list[Port] = []
        self.normalizers: dict[Axis, list[str]] = defaultdict(list)
        self.blocks: dict[Axis, int] = {}
        self.params: dict[str, str] = {}
        self.elements: dict[str, list[str]] = {}
        self.no_rule: list[str] = []
        self.rules = self.function_rules()
        self._register_tensors(shapes)

    def _register_tensors(self, shapes: dict) -> None:
        for node in self.gm.graph.nodes:
            shape = shapes.get(node.name)
            if _is_shape(shape):
                self._add_tensor(node.name, shape)
            elif isinstance(shape, tuple):
                self.elements[node.name] = []
                for i, element in enumerate(shape):
                    if _is_shape(element):
                        self._add_tensor(f"{node.name}[{i}]", element)
                        self.elements[node.name].append(f"{node.name}[{i}]")
            if node.op == "get_attr" and node.name in self.shapes:
                self.params[node.name] = node.target

    def _add_tensor(self, name: str, shape: tuple) -> None:
        self.shapes[name] = shape
        for dim, size in enumerate(shape):
            self.graph.add_node((name, dim), size=size)

    # -- primitives ------------------------------------------------------------------------------
    def tensor(self, value) -> str | None:
        """The tensor name of an fx argument, or None when it is not a tensor."""
        if isinstance(value, fx.Node) and value.name in self.shapes:
            return value.name
        return None

    def rank(self, tensor: str) -> int:
        return len(self.shapes[tensor])

    def size(self, tensor: str, dim: int) -> int:
        return self.shapes[tensor][dim]

    def tie(self, a: Axis, b: Axis, node: fx.Node, kind: str = "same", value: int = 0, whole: Axis | None = None):
        """Say axes `a` and `b` change together; `kind`/`value`/`whole` say how their indices map."""
        self.graph.add_edge(a, b, op=node.name, kind=kind, value=value, whole=whole)

    def freeze(self, axis: Axis, node: fx.Node, reason: str) -> None:
        self.freezes[axis].append((node.name, _describe(node, self.gm), reason))

    def freeze_tensor(self, tensor: str, node: fx.Node, reason: str) -> None:
        for dim in range(self.rank(tensor)):
            self.freeze((tensor, dim), node, reason)

    def port(self, ports: list, node: fx.Node, kind: str, axis: Axis) -> None:
        module = node.target if node.op == "call_module" else None
        ports.append(Port(node.name, module, kind, axis, self.size(*axis)))

    def inputs(self, node: fx.Node) -> list[str]:
        """Tensor names among the node's arguments, in order, without repeats."""
        found: list[str] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n.name) if n.name in self.shapes else None)
        return list(dict.fromkeys(found))

    def outputs(self, node: fx.Node) -> list[str]:
        if node.name in self.shapes:
            return [node.name]
        return list(self.elements.get(node.name, ()))

    # -- walking -------------------------------------------------------------------------------------
    def build(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except Exception as exc:  # a rule that cannot read this call freezes it; never a crash
                self.unknown(node, f"its rule failed ({type(exc).__name__}: {exc})")

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            for tensor in self.outputs(node):
                self.freeze_tensor(tensor, node, "model input")
        elif node.op == "output":
            for tensor in self.inputs(node):
                self.freeze_tensor(tensor, node, "model output: its size must not change")
        elif node.op == "get_attr":
            return
        elif node.op == "call_module":
            self.visit_module(node, self.gm.get_submodule(node.target))
        else:
            self.visit_function(node, _op_name(node))

    def visit_module(self, node: fx.Node, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            self.linear(node)
        elif isinstance(module, nn.modules.conv._ConvNd):
            self.conv(node, module)
        elif isinstance(module, ELEMENTWISE_MODULES):
            self.elementwise(node)
        elif isinstance(module, nn.LayerNorm):
            self.layer_norm(node, len(module.normalized_shape))
        elif isinstance(module, nn.GroupNorm):
            self.group_norm(node, module.num_groups)
        elif isinstance(module, nn.MultiheadAttention):
            self.multihead_attention(node)
        elif isinstance(module, POOL_MODULES):
            self.pool(node)
        elif isinstance(module, (nn.Flatten, nn.Unflatten)):
            self.reshape(node)
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            self.softmax(node, module.dim)
        elif isinstance(module, nn.ChannelShuffle):
            self.unknown(node, "channel shuffle permutes channels across groups", listed=False)
        else:
            self.unknown(node, f"no channel rule for module type {type(module).__name__}")

    def visit_function(self, node: fx.Node, name: str) -> None:
        handler = self.rules.get(name)
        if name == "getattr" and _arg(node, 1, "name") == "shape":
            self.size_read(node)
        elif handler is not None:
            handler(node)
        elif name in ELEMENTWISE:
            self.elementwise(node)
        elif "pool" in name or name in ("interpolate", "upsample"):
            self.pool(node)
        elif name in ATTENTION:
            self.unknown(node, f"{name} contracts axes (attention internals): no channel mapping", listed=False)
        elif name in IGNORED or not (self.inputs(node) or self.outputs(node)):
            return
        else:
            self.unknown(node, f"no channel rule for {node.op} '{name}'")

    def function_rules(self) -> dict[str, Callable[[fx.Node], None]]:
        rules = {name: self.reshape for name in RESHAPES}
        rules.update({name: self.transpose for name in TRANSPOSES})
        rules.update({name: self.cat for name in CATS})
        rules.update({name: self.split for name in SPLITS})
        rules.update({name: self.reduction for name in REDUCTIONS})
        rules.update({name: lambda n: self.softmax(n, _arg(n, 1, "dim")) for name in SOFTMAXES})
        rules.update({name: self.size_read for name in SIZE_READS})
        rules.update(permute=self.permute, getitem=self.getitem,
                     layer_norm=lambda n: self.layer_norm(n, len(_arg(n, 1, "normalized_shape"))),
                     group_norm=lambda n: self.group_norm(n, _arg(n, 1, "num_groups")))
        return rules

    def unknown(self, node: fx.Node, reason: str, listed: bool = True) -> None:
        """Freeze every axis the node reads or writes; `listed` ops go into `no_rule` too."""
        if listed:
            self.no_rule.append(node.name)
        for tensor in self.inputs(node) + self.outputs(node):
            self.freeze_tensor(tensor, node, reason)

    # -- rules ---------------------------------------------------------------------------------------
    def align(self, source: str, out: str, node: fx.Node) -> None:
        """Broadcasting: tie `source`'s dims to `out`'s from the right; size-1 dims broadcast, untied."""
        rank_s, rank_o = self.rank(source), self.rank(out)
        for k in range(1, rank_s + 1):
            ds, do = rank_s - k, rank_o - k
            if do < 0:
                self.freeze((source, ds), node, "axis has no counterpart in the output")
            elif self.size(source, ds) == self.size(out, do):
                self.tie((source, ds), (out, do), node)
            elif self.size(source, ds) != 1:
                self.freeze((source, ds), node, "sizes do not broadcast")
                self.freeze((out, do), node, "sizes do not broadcast")

    def elementwise(self, node: fx.Node) -> None:
        """Elementwise and broadcasting ops (and per-channel ones: BatchNorm, dropout): equal axes tie."""
        for out in self.outputs(node):
            for source in self.inputs(node):
                self.align(source, out, node)

    def linear(self, node: fx.Node) -> None:
        source, out = self.inputs(node)[0], node.name
        for dim in range(self.rank(out) - 1):
            self.tie((source, dim), (out, dim), node)
        self.port(self.consumers, node, "Linear", (source, self.rank(source) - 1))
        self.port(self.producers, node, "Linear", (out, self.rank(out) - 1))

    def conv(self, node: fx.Node, conv: nn.modules.conv._ConvNd) -> None:
        """Batch dims tie; depthwise convs tie input and output channels; others consume and produce."""
        source, out = self.inputs(node)[0], node.name
        channel = self.rank(out) - len(conv.kernel_size) - 1
        for dim in range(channel):
            self.tie((source, dim), (out, dim), node)
        kind = type(conv).__name__
        if conv.groups == conv.in_channels and conv.groups > 1:
            multiplier = conv.out_channels // conv.in_channels
            if multiplier == 1:
                self.tie((source, channel), (out, channel), node)
            else:
                self.tie((source, channel), (out, channel), node, "scale", multiplier, whole=(source, channel))
            return
        self.port(self.consumers, node, kind, (source, channel))
        self.port(self.producers, node, kind, (out, channel))
        if conv.groups > 1:
            self.blocks[(source, channel)] = conv.groups
            self.blocks[(out, channel)] = conv.groups

    def layer_norm(self, node: fx.Node, normalized: int) -> None:
        """Elementwise in shape; its statistics span the last `normalized` dims."""
        self.elementwise(node)
        out = node.name
        for dim in range(self.rank(out) - normalized, self.rank(out)):
            self.normalizers[(out, dim)].append(node.name)

    def group_norm(self, node: fx.Node, groups: int) -> None:
        """Elementwise in shape; statistics per block of channels, so removals are balanced per block."""
        self.elementwise(node)
        self.normalizers[(node.name, 1)].append(node.name)
        self.blocks[(node.name, 1)] = groups

    def multihead_attention(self, node: fx.Node) -> None:
        """Embedding inputs are read by in_proj (consumers), the output is made by out_proj (producer).

        Heads stay inside the module: its q/k/v head dims are not graph tensors, so they are not grouped.
        """
        query = self.tensor(_arg(node, 0, "query"))
        out = f"{node.name}[0]"
        for dim in range(self.rank(out) - 1):
            self.tie((query, dim), (out, dim), node)
        sources = [self.tensor(_arg(node, i, name)) for i, name in enumerate(("query", "key", "value"))]
        for source in dict.fromkeys(s for s in sources if s is not None):
            self.port(self.consumers, node, "MultiheadAttention", (source, self.rank(source) - 1))
        self.port(self.producers, node, "MultiheadAttention", (out, self.rank(out) - 1))
        for tensor in self.outputs(node)[1:]:
            self.freeze_tensor(tensor, node, "attention weights")

    def pool(self, node: fx.Node) -> None:
        """Pooling and resizing: batch and channel dims tie; spatial dims change size and stay apart."""
        source, out = self.inputs(node)[0], node.name
        spatial = 1 if "1d" in _describe(node, self.gm) else 3 if "3d" in _describe(node, self.gm) else 2
        for dim in range(self.rank(out) - spatial):
            self.tie((source, dim), (out, dim), node)

    def reshape(self, node: fx.Node) -> None:
        """view/reshape/flatten/(un)squeeze: axes that survive tie; merges and splits freeze, except
        channels flattened into the features that only Linear layers read (a `scale` tie)."""
        source, out = self.inputs(node)[0], node.name
        shape_in, shape_out = self.shapes[source], self.shapes[out]
        for dim, size in enumerate(shape_in):
            if size == 1 and shape_out.count(1) < shape_in.count(1):
                self.freeze((source, dim), node, "size-1 axis dropped")
        for seg_in, seg_out in reshape_segments(shape_in, shape_out):
            if len(seg_in) == 1 and len(seg_out) == 1:
                self.tie((source, seg_in[0]), (out, seg_out[0]), node)
            elif len(seg_out) == 1 and self.feeds_only_linear(node, seg_out[0]):
                inner = math.prod(shape_in[d] for d in seg_in[1:])
                self.tie((source, seg_in[0]), (out, seg_out[0]), node, "scale", inner, whole=(source, seg_in[0]))
                for dim in seg_in[1:]:
                    self.freeze((source, dim), node, "inner axis flattened into features")
            else:
                sizes_in = tuple(shape_in[d] for d in seg_in)
                sizes_out = tuple(shape_out[d] for d in seg_out)
                verb = "merges" if len(seg_out) == 1 else "splits" if len(seg_in) == 1 else "regroups"
                reason = f"{verb} axes {sizes_in} into {sizes_out}"
                for dim in seg_in:
                    self.freeze((source, dim), node, reason)
                for dim in seg_out:
                    self.freeze((out, dim), node, reason)

    def feeds_only_linear(self, node: fx.Node, dim: int) -> bool:
        """True when `node`'s output reaches only Linear layers reading `dim` as features, through
        elementwise unary ops (dropout, activations): the flatten-before-classifier case."""
        if dim != self.rank(node.name) - 1:
            return False
        pending, seen_linear = deque([node]), False
        while pending:
            current = pending.popleft()
            for user in current.users:
                module = self.gm.get_submodule(user.target) if user.op == "call_module" else None
                if isinstance(module, nn.Linear) and user.args[0] is current:
                    seen_linear = True
                elif len(self.inputs(user)) == 1 and (isinstance(module, ELEMENTWISE_MODULES) or (
                        user.op != "call_module" and _op_name(user) in ELEMENTWISE)):
                    pending.append(user)
                else:
                    return False
        return seen_linear

    def permute(self, node: fx.Node) -> None:
        source, out = self.inputs(node)[0], node.name
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        for dim_out, dim_in in enumerate(_dims_tuple(tuple(dims), self.rank(source))):
            self.tie((source, dim_in), (out, dim_out), node)

    def transpose(self, node: fx.Node) -> None:
        source, out = self.inputs(node)[0], node.name
        rank = self.rank(source)
        first, second = _dims_tuple((_arg(node, 1, "dim0"), _arg(node, 2, "dim1")), rank)
        order = list(range(rank))
        order[first], order[second] = order[second], order[first]
        for dim_out, dim_in in enumerate(order):
            self.tie((source, dim_in), (out, dim_out), node)

    def cat(self, node: fx.Node) -> None:
        """Pieces tie to the output at their offsets along the cat dim; other dims tie as they are."""
        pieces = _arg(node, 0, "tensors")
        out = node.name
        dim = _dims_tuple(_arg(node, 1, "dim", 0), self.rank(out))[0]
        offset = 0
        for piece in pieces:
            name = self.tensor(piece)
            if name is None:
                raise ValueError("a piece is not a tensor of the graph")
            self.tie_piece(name, out, dim, offset, node)
            offset += self.size(name, dim)

    def tie_piece(self, piece: str, whole: str, dim: int, offset: int, node: fx.Node) -> None:
        for d in range(self.rank(whole)):
            if d == dim:
                self.tie((piece, d), (whole, d), node, "offset", offset, whole=(whole, d))
            else:
                self.tie((piece, d), (whole, d), node)

    def split(self, node: fx.Node) -> None:
        """split/chunk: each piece ties to the input at its offset along the split dim."""
        source = self.inputs(node)[0]
        pieces = self.outputs(node)
        dim = _dims_tuple(_arg(node, 2, "dim", 0), self.rank(source))[0]
        offset = 0
        for piece in pieces:
            self.tie_piece(piece, source, dim, offset, node)
            offset += self.size(piece, dim)

    def reduction(self, node: fx.Node) -> None:
        """mean/sum over dims: kept dims tie; a reduced axis is frozen (its channels are summed)."""
        source, out = self.inputs(node)[0], node.name
        reduced = _dims_tuple(_arg(node, 1, "dim"), self.rank(source)) or tuple(range(self.rank(source)))
        keepdim = bool(_arg(node, 2, "keepdim", False))
        dim_out = 0
        for dim in range(self.rank(source)):
            if dim in reduced:
                self.freeze((source, dim), node, "reduced over")
                dim_out += keepdim
                continue
            self.tie((source, dim), (out, dim_out), node)
            dim_out += 1

    def softmax(self, node: fx.Node, dim) -> None:
        """Softmax normalises across `dim`, which freezes; the other dims tie."""
        source, out = self.inputs(node)[0], node.name
        dim = _dims_tuple(dim, self.rank(source))[0]
        for d in range(self.rank(source)):
            if d == dim:
                self.freeze((source, d), node, "softmax normalises across it")
                self.freeze((out, d), node, "softmax normalises across it")
            else:
                self.tie((source, d), (out, d), node)

    def size_read(self, node: fx.Node) -> None:
        """`x.size()`, `x.shape`, `x.numel()`: the axes whose size the model reads as a number freeze."""
        source = self.inputs(node)[0]
        name = _op_name(node)
        explicit = _arg(node, 1, "dim") if name == "size" else None
        if explicit is not None:
            dims = _dims_tuple(explicit, self.rank(source))
        elif name == "numel" or any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            dims = tuple(range(self.rank(source)))
        else:
            dims = self.dims_read(node, self.rank(source))
        for dim in dims:
            self.freeze((source, dim), node, f"reads the size of axis {dim} as a number")

    @staticmethod
    def dims_read(node: fx.Node, rank: int) -> tuple[int, ...]:
        dims: set[int] = set()
        for user in node.users:
            index = user.args[1]
            dims.update(range(rank)[index] if isinstance(index, slice) else (int(index) % rank,))
        return tuple(sorted(dims))

    def getitem(self, node: fx.Node) -> None:
        """`x[i]` of a tuple ties to element i; indexing a tensor ties the axes it keeps."""
        container, index = node.args
        if not isinstance(container, fx.Node):
            return
        element = f"{container.name}[{index}]" if isinstance(index, int) else None
        if element in self.shapes and node.name in self.shapes:
            for dim in range(self.rank(node.name)):
                self.tie((element, dim), (node.name, dim), node)
        elif container.name in self.shapes and node.name in self.shapes:
            self.index_tensor(node, container.name, index)
        elif node.name in self.shapes:
            self.unknown(node, "getitem on a value that is not a tensor or tuple of tensors")

    def index_tensor(self, node: fx.Node, source: str, index) -> None:
        """Basic indexing: full slices tie, partial slices tie at their offset, integers and strided
        slices freeze the axis they pick from; tensor indices are not handled."""
        items = index if isinstance(index, tuple) else (index,)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            return self.unknown(node, "indexing with a tensor or list")
        rank = self.rank(source)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + (slice(None),) * (rank - consumed) + items[at + 1:]
        else:
            items = items + (slice(None),) * (rank - consumed)
        dim_in = dim_out = 0
        for item in items:
            if item is None:
                dim_out += 1
                continue
            self.index_axis(node, (source, dim_in), (node.name, dim_out), item)
            dim_in += 1
            dim_out += not isinstance(item, int)

    def index_axis(self, node: fx.Node, axis_in: Axis, axis_out: Axis, item) -> None:
        if isinstance(item, int):
            self.freeze(axis_in, node, f"picks index {item} of the axis")
            return
        start, stop, step = item.indices(self.size(*axis_in))
        if step != 1:
            self.freeze(axis_in, node, "strided slice")
            self.freeze(axis_out, node, "strided slice")
        elif (start, stop) == (0, self.size(*axis_in)):
            self.tie(axis_in, axis_out, node)
        else:
            self.tie(axis_out, axis_in, node, "offset", start, whole=axis_in)


def _relative_positions(graph: nx.MultiGraph, root: Axis) -> tuple[dict[Axis, tuple], bool]:
    """(offset, inner) of every member relative to `root`, following the index maps on the edges.

    Returns the positions and whether they were consistent; offset None means a map could not be composed.
    """
    positions: dict[Axis, tuple] = {root: (0, 1)}
    consistent = True
    pending = deque([root])
    while pending:
        axis = pending.popleft()
        offset, inner = positions[axis]
        for _, other, edge in graph.edges(axis, data=True):
            guess = _across(edge, axis, offset, inner)
            if other not in positions:
                positions[other] = guess
                pending.append(other)
            elif guess[0] is not None and positions[other][0] is not None and positions[other] != guess:
                consistent = False
    return positions, consistent


def _across(edge: dict, axis: Axis, offset, inner) -> tuple:
    """The (offset, inner) of the far end of `edge`, seen from `axis` at (offset, inner)."""
    if offset is None or edge["kind"] == "same":
        return offset, inner
    from_whole = edge["whole"] == axis
    if edge["kind"] == "offset":
        if inner != 1:
            return None, 1
        return (offset + edge["value"], 1) if from_whole else (offset - edge["value"], 1)
    if from_whole:
        return offset, inner * edge["value"]
    if inner % edge["value"]:
        return None, 1
    return offset, inner // edge["value"]


def _root(graph: nx.MultiGraph, component: set) -> Axis:
    """The widest member that is not the fine side of a `scale` edge (a channel axis, not features)."""
    fine = {b if a == e["whole"] else a for a, b, e in graph.subgraph(component).edges(data=True)
            if e["kind"] == "scale"}
    candidates = [a for a in component if a not in fine] or list(component)
    return max(candidates, key=lambda a: (graph.nodes[a]["size"], a))


def _members(graph: nx.MultiGraph, component: set) -> tuple[list[Member], int, bool]:
    positions, consistent = _relative_positions(graph, _root(graph, component))
    known = [p[0] for p in positions.values() if p[0] is not None]
    low = min(known)
    members = []
    for axis in sorted(component):
        offset, inner = positions[axis]
        members.append(Member(axis[0], axis[1], graph.nodes[axis]["size"],
                              None if offset is None else offset - low, inner))
    size = max(m.offset + m.size // m.inner for m in members if m.offset is not None)
    return members, size, consistent


class _Groups:
    """Turns the builder's axis graph into reported groups and frozen ops."""

    def __init__(self, builder: _Builder):
        self.b = builder
        self.order = {node.name: i for i, node in enumerate(builder.gm.graph.nodes)}

    def analysis(self) -> ChannelAnalysis:
        groups = []
        for component in nx.connected_components(self.b.graph):
            producers = [p for p in self.b.producers if p.axis in component]
            consumers = [c for c in self.b.consumers if c.axis in component]
            if producers or consumers:
                groups.append(self.group(component, producers, consumers))
        groups.sort(key=lambda g: min(self.order[p.node] for p in g.producers + g.consumers))
        for i, group in enumerate(groups):
            group.id = i
        return ChannelAnalysis(groups, self.frozen_ops(groups), list(self.b.no_rule), self.b.graph)

    def group(self, component: set, producers: list[Port], consumers: list[Port]) -> ChannelGroup:
        members, size, consistent = _members(self.b.graph, component)
        frozen_by = sorted({f"{node} ({what}): {reason}" for axis in component
                            for node, what, reason in self.b.freezes.get(axis, ())})
        if not consistent:
            frozen_by.append("the same channels appear at different offsets (e.g. a tensor concatenated twice)")
        ops = {e["op"] for _, _, e in self.b.graph.subgraph(component).edges(data=True)}
        normalizers = {n for axis in component for n in self.b.normalizers.get(axis, ())}
        blocks = math.lcm(1, *(self.b.blocks[a] for a in component if a in self.b.blocks))
        params = sorted({self.b.params[m.tensor] for m in members if m.tensor in self.b.params})
        return ChannelGroup(-1, size, producers, consumers, members, sorted(ops, key=self.order.get), frozen_by,
                            sorted(normalizers, key=self.order.get), params, blocks)

    def frozen_ops(self, groups: list[ChannelGroup]) -> list[FrozenOp]:
        group_of = {(m.tensor, m.dim): g.id for g in groups for m in g.members}
        found: dict[tuple[str, str], FrozenOp] = {}
        for axis, events in self.b.freezes.items():
            if axis not in group_of:
                continue
            for node, what, reason in events:
                entry = found.setdefault((node, reason), FrozenOp(node, what, reason, []))
                if group_of[axis] not in entry.groups:
                    entry.groups.append(group_of[axis])
        ops = sorted(found.values(), key=lambda f: self.order.get(f.node, 0))
        for op in ops:
            op.groups.sort()
        return ops


def analyze_channels(gm: fx.GraphModule, shapes: dict) -> ChannelAnalysis:
    """Channel groups of `gm` given the output shape of every node (`fxcompress.graph.shapes`)."""
    builder = _Builder(gm, shapes)
    builder.build()
    return _Groups(builder).analysis()


def channel_groups(gm: fx.GraphModule, example_inputs: tuple) -> ChannelAnalysis:
    """Channel-dependency groups of `gm`, with shapes taken from one run on `example_inputs`."""
    return analyze_channels(gm, propagate_shapes(gm, tuple(example_inputs)))


@register_analysis("channels")
def _channels(gm: fx.GraphModule, ctx) -> ChannelAnalysis:
    return analyze_channels(gm, ctx.analysis("shapes", gm))


def format_groups(result: ChannelAnalysis, limit: int = 6) -> str:
    """The groups and frozen ops as text (`fxcompress inspect --groups`); `name@k`: channels from offset k.
    Consumers reading one class of `ChannelAnalysis.same_channels` are listed as one stream."""
    def names(ports: list[Port], offsets: dict) -> str:
        def name(port: Port) -> str:
            offset = offsets.get(port.axis)
            return (port.module or port.node) + (f"@{offset}" if offset else "")
        shown = ", ".join(name(p) for p in ports[:limit])
        return shown + (f", ... (+{len(ports) - limit})" if len(ports) > limit else "") if ports else "-"

    lines = []
    classes = result.same_channels()
    for g in result.groups:
        state = "removable" if g.removable else "frozen" if g.frozen else "no producer"
        extra = (f", blocks of {g.blocks}" if g.blocks > 1 else "") + (
            f", normalised by {', '.join(g.normalized_by[:3])}" if g.normalized_by else "")
        lines.append(f"group {g.id}: {g.size} channels, {state}{extra}")
        offsets = {(m.tensor, m.dim): m.offset for m in g.members}
        lines.append(f"  producers: {names(g.producers, offsets)}")
        lines.append(f"  consumers: {names(g.consumers, offsets)}")
        together: dict[int, list[Port]] = {}
        for port in g.consumers:
            together.setdefault(classes[port.axis], []).append(port)
        for ports in together.values():
            if len(ports) > 1:
                lines.append(f"  read as one stream (select_neurons residual: joint): {names(ports, offsets)}")
        for reason in g.frozen_by[:limit]:
            lines.append(f"  frozen by {reason}")
        if len(g.frozen_by) > limit:
            lines.append(f"  ... and {len(g.frozen_by) - limit} more")
    removable = sum(g.removable for g in result.groups)
    lines.append(f"\n{len(result.groups)} groups, {removable} removable, {len(result.groups) - removable} not")
    if result.frozen_ops:
        lines.append("frozen ops:")
        lines.extend(f"  {f.node} ({f.op}): {f.reason} (groups {', '.join(map(str, f.groups))})"
                     for f in result.frozen_ops)
    if result.no_rule:
        lines.append(f"ops with no channel rule: {', '.join(result.no_rule)}")
    return "\n".join(lines)
