"""The Selector: an index set on one channel dimension of a tensor, and how it commutes with ops.

A layer whose reconstruction ``M = P C^T`` (seed 003 §2.7) uses only some of its
inputs reads them through ``Selector(dim, keep)``, i.e. ``x.index_select(dim, keep)``.
The selector keeps the graph valid and runnable after every pass; ``collapse`` then
moves it towards the producer of ``x`` and absorbs it there (seed 003 §2.2-2.3: a
selector commutes with every elementwise or per-channel op, so ``C^T sigma(W x) =
sigma(C^T W x)`` and ``C^T W`` is simply ``W`` without the dropped rows).

How a selection passes through an op is a *commutation rule*, registered per op:
a module class (exact type), a function (``torch.relu``, ``operator.add``, or its
qualified name ``"package.module.function"`` to avoid importing its package) or a
method name (``"relu"``). A rule receives a :class:`Site` (the producing node and
the :class:`Selection` its single reader makes of its output) and returns a
:class:`Commutation` -- the selections to place on the node's inputs, an
``apply`` that narrows the node itself, and an optional ``residual`` selection
that stays after it -- or ``None`` when the selection cannot pass (the selector
then stays in the graph as a dynamic sampler). Rules must not change the graph
or modules themselves: all changes happen in ``apply``, which runs only once the
move is accepted. A custom per-channel module declares its rule like this::

    from fxcompress.selector import Commutation, narrow_tensor, register_commutation

    @register_commutation(ChannelScale)          # forward: x * self.gain.view(1, -1, 1, 1)
    def _through_channel_scale(site):
        if site.selection.dim != 1:
            return None                          # not the channel dim: the selector stays
        def apply():
            narrow_tensor(site.own_module(), "gain", 0, site.selection.keep)
        return Commutation(inputs=[(site.node.args[0], site.selection)], apply=apply)

Built-in rules: elementwise activations, dropout and identity (modules, functions,
methods), broadcasting arithmetic (``add``, ``mul``, ... into every operand that
is not broadcast along the selected dim), BatchNorm/InstanceNorm, PReLU, LayerNorm
(a selection of an unnormalised dim), GroupNorm (by whole groups), pooling,
reductions over other dims, ``flatten``, ``cat``, ``permute``/``transpose``,
``reshape``/``view`` that split or merge only other dims,
Linear and ConvNd (absorbed: output rows dropped; grouped and depthwise
convolutions narrowed by whole groups and the selection continues upstream),
ConvTransposeNd (groups 1), chained selectors, and constant tensors (``get_attr``).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .rewrite import insert_module_before, module_of, own_module, replace_module, set_tensor


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


# ---------------------------------------------------------------------------------------------------
# Selections and commutation rules
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Selection:
    """Keep the entries `keep` (strictly increasing) of the `size` entries of dimension `dim` (>= 0)."""
    dim: int
    keep: Tensor
    size: int

    def __post_init__(self):
        keep = torch.as_tensor(self.keep, dtype=torch.long).detach().cpu().flatten()
        object.__setattr__(self, "keep", keep)
        if self.dim < 0:
            raise ValueError(f"a Selection's dim must be normalised (>= 0), got {self.dim}")
        if keep.numel() == 0 or int(keep[0]) < 0 or int(keep[-1]) >= self.size or \
                (keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all())):
            raise ValueError(f"a Selection keeps 1..{self.size} strictly increasing indices in [0, {self.size})")

    @property
    def count(self) -> int:
        return self.keep.numel()

    @property
    def is_identity(self) -> bool:
        return self.count == self.size

    def same_as(self, other: "Selection") -> bool:
        return self.dim == other.dim and self.size == other.size and torch.equal(self.keep, other.keep)

    def on(self, dim: int, size: int | None = None) -> "Selection":
        """The same indices on another dimension (of another tensor, e.g. an op's input)."""
        return Selection(dim, self.keep, self.size if size is None else size)

    def within(self, outer: "Selection") -> "Selection":
        """This selection written relative to `outer`'s output (which must contain every kept index)."""
        position = torch.searchsorted(outer.keep, self.keep)
        if not torch.equal(outer.keep[position.clamp(max=outer.count - 1)], self.keep):
            raise ValueError("within: the outer selection does not contain every kept index")
        return Selection(self.dim, position, outer.count)

    def then(self, inner: "Selection") -> "Selection":
        """Select `inner` (relative to this selection's output) after this one, as a single selection."""
        return Selection(self.dim, self.keep[inner.keep], self.size)

    @staticmethod
    def of(selector: "Selector", rank: int) -> "Selection":
        """The selection a Selector module makes of a tensor of rank `rank`."""
        return Selection(selector.dim % rank, selector.keep, selector.size)


def whole_blocks(blocks: Tensor, block: int) -> Tensor:
    """The indices of the `block`-sized blocks numbered `blocks`: ``[b*block, (b+1)*block)`` for each."""
    return (blocks[:, None] * block + torch.arange(block)).flatten()


@dataclass
class Site:
    """Where a rule is asked to move a selection: `node`'s output is read only through `selection`.

    `shapes` maps nodes to their output shapes (None for non-tensors); they are kept current while
    selectors move.
    """
    gm: fx.GraphModule
    node: fx.Node
    selection: Selection
    shapes: Mapping[fx.Node, tuple | None]

    def shape(self, node: fx.Node | None = None) -> tuple | None:
        """The output shape of `node` (default: the site's node); None if it is not a single tensor."""
        shape = self.shapes.get(self.node if node is None else node)
        return shape if is_tensor_shape(shape) else None

    @property
    def rank(self) -> int:
        return len(self.shape())

    @property
    def module(self) -> nn.Module | None:
        """The module the node calls (read only: inside `apply`, change `own_module()` instead)."""
        return module_of(self.gm, self.node)

    def own_module(self) -> nn.Module:
        """The module the node calls, copied first if other call sites share it; use it inside `apply`."""
        return own_module(self.gm, self.node)

    def input(self, index: int = 0, name: str = "input") -> fx.Node | None:
        """The node passed as argument `index` (or keyword `name`), if it is a node."""
        value = argument(self.node, index, name)
        return value if isinstance(value, fx.Node) else None

    def through(self, *inputs: fx.Node, apply: Callable[[], None] | None = None) -> "Commutation | None":
        """The selection moves unchanged onto `inputs` (tensors of the node's rank: a per-entry op);
        None if one of them is not such a tensor."""
        shapes = [self.shape(x) for x in inputs]
        if any(shape is None or len(shape) != self.rank for shape in shapes):
            return None
        d = self.selection.dim
        return Commutation(inputs=[(x, self.selection.on(d, shape[d])) for x, shape in zip(inputs, shapes)],
                           apply=apply)


@dataclass
class Commutation:
    """How a selection of a node's output moves: `inputs` get selections on their edge into the node,
    `apply` (run once the move is accepted) narrows the node itself, and `residual`, if given, is a
    selection that stays after the narrowed node, relative to its new output."""
    inputs: list[tuple[fx.Node, Selection]] = field(default_factory=list)
    apply: Callable[[], None] | None = None
    residual: Selection | None = None


CommutationRule = Callable[[Site], "Commutation | None"]
_RULES: dict[object, CommutationRule] = {}


def register_commutation(*ops) -> Callable[[CommutationRule], CommutationRule]:
    """Declare how a selection passes through `ops`: module classes (matched by exact type, so a subclass
    declares its own), functions or operators (``torch.relu``, ``operator.add``) or their qualified names
    (``"torchvision.ops.stochastic_depth.stochastic_depth"``: ``__module__`` dot ``__qualname__``), or
    method names (``"relu"``). A later registration for the same op replaces the earlier one."""
    if not ops:
        raise TypeError("register_commutation needs at least one module class, function or method name")

    def decorate(rule: CommutationRule) -> CommutationRule:
        for op in ops:
            _RULES[op] = rule
        return rule
    return decorate


def op_key(gm: fx.GraphModule, node: fx.Node):
    """What a rule is registered under for `node`: its module's class, its function, or its method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def commutation_rule(gm: fx.GraphModule, node: fx.Node) -> CommutationRule | None:
    """The rule moving a selection of `node`'s output to its inputs, or None if there is none."""
    if node.op == "get_attr":
        return _through_constant
    rule = _RULES.get(op_key(gm, node))
    if rule is None and node.op == "call_function":
        rule = _RULES.get(qualified_name(node.target))
    return rule


def qualified_name(function) -> str:
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """`node` for messages: its name and what it computes."""
    if node.op == "call_module":
        return f"'{node.name}' ({type(gm.get_submodule(node.target)).__name__} '{node.target}')"
    if node.op == "call_function":
        return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"'{node.name}' (.{node.target}())"
    return f"'{node.name}' ({node.op})"


def is_tensor_shape(shape) -> bool:
    return isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)


def argument(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` of a call, given positionally or as keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def narrow_tensor(owner: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    """Keep only the entries `keep` of dimension `dim` of the parameter or buffer `name` of `owner`."""
    tensor = getattr(owner, name)
    if tensor is not None:
        set_tensor(owner, name, tensor.detach().index_select(dim, keep.to(tensor.device)).clone())


def _constants(*values) -> bool:
    """Whether the op's dim/flag arguments are Python ints/bools, not values computed by the graph."""
    return all(isinstance(v, (int, bool)) for v in values)


def _operands(node: fx.Node) -> list[fx.Node]:
    """The distinct nodes a call reads, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return found


# --- elementwise ops: every operand not broadcast along the selected dim gets the selection -----------

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
                nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ELEMENTWISE_FUNCTIONS = (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.elu, F.elu_, F.selu, F.celu, F.mish, F.softplus,
    F.hardtanh, F.hardtanh_, F.softsign, F.logsigmoid, F.tanhshrink, F.hardshrink, F.softshrink, F.threshold,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.abs, torch.neg, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp,
    torch.clip, torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum, torch.minimum, torch.where,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg, operator.iadd,
    operator.isub, operator.imul, operator.itruediv)
_ELEMENTWISE_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "log", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "add", "add_", "sub", "sub_", "mul", "mul_",
    "div", "div_", "pow", "maximum", "minimum", "contiguous", "clone", "detach")


def _mutates_an_input(site: Site) -> bool:
    """Whether the op may work in place: an in-place name, ``inplace=True``, or any positional ``True``
    (``F.relu(x, True)``; conservative for flags such as ``F.dropout(x, p, True)``)."""
    node, module = site.node, site.module
    name = getattr(node.target, "__name__", node.target) if node.op != "call_module" else ""
    in_place_name = isinstance(name, str) and (name.endswith("_") and not name.startswith("_")
                                               or name in ("iadd", "isub", "imul", "itruediv"))
    return bool(in_place_name or node.kwargs.get("inplace") or getattr(module, "inplace", False)
                or any(arg is True for arg in node.args[1:]))


@register_commutation(*_ACTIVATIONS, *_ELEMENTWISE_FUNCTIONS, *_ELEMENTWISE_METHODS)
def _through_elementwise(site: Site) -> Commutation | None:
    """Push into every tensor operand; one broadcast along the selected dim (size 1 or missing) stays."""
    out, d = site.shape(), site.selection.dim
    if site.module is not None and len(_operands(site.node)) != 1:
        return None
    inputs = []
    for operand in _operands(site.node):
        shape = site.shapes.get(operand)
        if shape is None:
            continue  # a Python number computed by the graph
        if not is_tensor_shape(shape):
            return None
        aligned = d - (len(out) - len(shape))
        if aligned < 0 or (shape[aligned] == 1 and out[d] != 1):
            continue  # broadcast along the selected dim: every kept entry reads the same value
        if shape[aligned] != out[d]:
            return None
        if _mutates_an_input(site) and len(operand.users) > 1:
            return None  # the in-place op would stop changing the tensor its other readers see
        inputs.append((operand, site.selection.on(aligned, shape[aligned])))
    return Commutation(inputs=inputs)


@register_commutation("torchvision.ops.stochastic_depth.stochastic_depth")
def _through_per_sample(site: Site) -> Commutation | None:
    """Per-sample random scaling (stochastic depth) commutes with a selection of any dim but the batch."""
    x = site.input()
    if x is None or site.selection.dim == 0:
        return None
    return site.through(x)


@register_commutation(nn.PReLU)
def _through_prelu(site: Site) -> Commutation | None:
    """One slope per channel (dim 1, or 0 for an unbatched vector): keep the kept channels' slopes."""
    prelu, d = site.module, site.selection.dim
    if prelu.num_parameters == 1:
        return site.through(site.node.args[0])
    if d != min(1, site.rank - 1):
        return None

    def apply():
        module = site.own_module()
        narrow_tensor(module, "weight", 0, site.selection.keep)
        module.num_parameters = site.selection.count
    return site.through(site.node.args[0], apply=apply)


# --- normalisation with per-channel statistics and affine parameters ---------------------------------

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _norm_channel_dim(norm: nn.Module, rank: int) -> int:
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return rank - norm._get_no_batch_dim()
    return 1


@register_commutation(*_NORMS)
def _through_norm(site: Site) -> Commutation | None:
    """Per-channel statistics and affine parameters: keep the kept channels' entries."""
    if site.selection.dim != _norm_channel_dim(site.module, site.rank):
        return None

    def apply():
        norm = site.own_module()
        for name in ("weight", "bias", "running_mean", "running_var"):
            narrow_tensor(norm, name, 0, site.selection.keep)
        norm.num_features = site.selection.count
    return site.through(site.node.args[0], apply=apply)


@register_commutation(nn.LayerNorm, F.layer_norm)
def _through_layer_norm(site: Site) -> Commutation | None:
    """Normalisation over the last dims commutes with a selection of an earlier dim (weight and bias span the
    normalised dims only); a selection of a normalised dim does not commute with it."""
    x = site.input()
    dims = site.module.normalized_shape if site.node.op == "call_module" else \
        argument(site.node, 1, "normalized_shape")
    dims = (dims,) if isinstance(dims, int) else dims
    if x is None or not isinstance(dims, (list, tuple)) or not _constants(*dims) or \
            site.selection.dim >= site.rank - len(dims):
        return None
    return site.through(x)


@register_commutation(nn.GroupNorm)
def _through_group_norm(site: Site) -> Commutation | None:
    """Statistics per group of consecutive channels: the groups with a kept channel are kept whole (with
    their weight and bias entries) and move upstream; a residual selection within them stays after."""
    norm, d = site.module, site.selection.dim
    if d != 1:
        return None
    per_group = norm.num_channels // norm.num_groups
    groups = torch.unique(site.selection.keep // per_group)
    covered = Selection(d, whole_blocks(groups, per_group), norm.num_channels)
    residual = site.selection.within(covered)

    def apply():
        module = site.own_module()
        for name in ("weight", "bias"):
            narrow_tensor(module, name, 0, covered.keep)
        module.num_groups, module.num_channels = groups.numel(), covered.count
    return Commutation(inputs=[(site.node.args[0], covered)], apply=apply,
                       residual=None if residual.is_identity else residual)


# --- pooling and reductions over other dims ----------------------------------------------------------

def _spatial_rule(spatial: int) -> CommutationRule:
    def rule(site: Site) -> Commutation | None:
        x = site.input()
        if x is None or site.selection.dim >= site.rank - spatial:
            return None
        return site.through(x)
    rule.__doc__ = f"Pooling over the last {spatial} dims commutes with a selection on any other dim."
    return rule


def _pooling_ops(spatial: int) -> list:
    names = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool")
    functions = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
    return [getattr(nn, f"{n}{spatial}d") for n in names] + [getattr(F, f"{f}{spatial}d") for f in functions] + \
        [getattr(torch, f"{f}{spatial}d") for f in functions if hasattr(torch, f"{f}{spatial}d")]


for _spatial in (1, 2, 3):
    register_commutation(*_pooling_ops(_spatial))(_spatial_rule(_spatial))
register_commutation(nn.LPPool1d, F.lp_pool1d)(_spatial_rule(1))
register_commutation(nn.LPPool2d, F.lp_pool2d)(_spatial_rule(2))


@register_commutation(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _through_reduction(site: Site) -> Commutation | None:
    """A reduction over dims other than the selected one commutes with it (keepdim or not)."""
    x = site.input()
    in_shape = site.shape(x) if x is not None else None
    dims = argument(site.node, 1, "dim")
    dims = (dims,) if isinstance(dims, int) else dims
    keepdim = argument(site.node, 2, "keepdim", False)
    if in_shape is None or not isinstance(dims, (list, tuple)) or not _constants(*dims, keepdim):
        return None
    dims = {d % len(in_shape) for d in dims}
    surviving = [i for i in range(len(in_shape)) if keepdim or i not in dims]
    source = surviving[site.selection.dim]
    if source in dims:
        return None
    return Commutation(inputs=[(x, site.selection.on(source, in_shape[source]))])


# --- shape ops --------------------------------------------------------------------------------------

def _flatten_range(site: Site) -> tuple[fx.Node | None, int, int]:
    if site.node.op == "call_module":
        return site.node.args[0], site.module.start_dim, site.module.end_dim
    return site.input(), argument(site.node, 1, "start_dim", 0), argument(site.node, 2, "end_dim", -1)


@register_commutation(torch.flatten, "flatten", nn.Flatten)
def _through_flatten(site: Site) -> Commutation | None:
    """A selection of flattened features becomes a selection of the leading flattened dim (channels).

    Features ``c * B + r`` (B the product of the other flattened dims) come from channel ``c``: the
    channels with at least one kept feature move upstream; unless whole channel blocks are kept, a
    residual selection among the features of those channels stays after the flatten.
    """
    x, start, end = _flatten_range(site)
    in_shape = site.shape(x) if isinstance(x, fx.Node) else None
    if in_shape is None or not in_shape or not _constants(start, end):
        return None
    start, end, d = start % len(in_shape), end % len(in_shape), site.selection.dim
    if d != start:
        source = d if d < start else d + end - start
        return Commutation(inputs=[(x, site.selection.on(source, in_shape[source]))])
    block = math.prod(in_shape[start + 1:end + 1])
    channels = torch.unique(site.selection.keep // block)
    if channels.numel() == in_shape[start]:
        return None
    covered = Selection(d, whole_blocks(channels, block), site.selection.size)
    residual = site.selection.within(covered)
    return Commutation(inputs=[(x, Selection(start, channels, in_shape[start]))],
                       residual=None if residual.is_identity else residual)


@register_commutation(torch.cat, torch.concat, torch.concatenate)
def _through_cat(site: Site) -> Commutation | None:
    """Split the selection by the inputs' offsets along the concatenated dim; inputs with nothing kept
    leave the concatenation. Along another dim every input gets the whole selection."""
    tensors = argument(site.node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) and site.shape(t) for t in tensors):
        return None
    cat_dim = argument(site.node, 1, "dim", 0)
    if not _constants(cat_dim):
        return None
    cat_dim, d = cat_dim % site.rank, site.selection.dim
    if d != cat_dim:
        return site.through(*tensors)
    inputs, kept, offset = [], [], 0
    for tensor in tensors:
        size = site.shape(tensor)[d]
        local = site.selection.keep[(site.selection.keep >= offset) & (site.selection.keep < offset + size)] - offset
        offset += size
        if local.numel():
            inputs.append((tensor, Selection(d, local, size)))
            kept.append(tensor)
    if len(kept) == len(tensors):
        return Commutation(inputs=inputs)

    def apply():
        _replace_argument(site.node, 0, "tensors", type(tensors)(kept))
    return Commutation(inputs=inputs, apply=apply)


def _replace_argument(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _target_sizes(node: fx.Node) -> list | None:
    """The sizes a reshape/view asks for, flattened from ``x.view(a, b)``, ``x.view((a, b))`` or
    ``torch.reshape(x, shape)``; None unless they are constant ints (a size computed by the graph could
    change when a dim is narrowed)."""
    if node.op == "call_method":
        sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    else:
        sizes = [argument(node, 1, "shape")]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return sizes if _constants(*sizes) and not any(isinstance(s, bool) for s in sizes) else None


@register_commutation(torch.reshape, "reshape", "view")
def _through_reshape(site: Site) -> Commutation | None:
    """A reshape that splits or merges only dims other than the selected one: an input dim of the same size
    with as many entries before it becomes the selected dim, so the selection moves there unchanged (the size
    asked for the selected dim, if not -1, becomes the kept count)."""
    x, out, d = site.input(), site.shape(), site.selection.dim
    in_shape, sizes = (site.shape(x) if x is not None else None), _target_sizes(site.node)
    if in_shape is None or sizes is None or len(sizes) != len(out):
        return None
    before = math.prod(out[:d])
    source = next((j for j, size in enumerate(in_shape) if size == out[d] and math.prod(in_shape[:j]) == before),
                  None)
    if source is None:
        return None

    def apply():
        if sizes[d] != -1:
            resized = [*sizes[:d], site.selection.count, *sizes[d + 1:]]
            site.node.args, site.node.kwargs = (x, *resized) if site.node.op == "call_method" else \
                (x, tuple(resized)), {}
    return Commutation(inputs=[(x, site.selection.on(source, in_shape[source]))], apply=apply)


def _permutation(site: Site) -> list[int] | None:
    node, rank = site.node, site.rank
    if node.target in ("transpose", torch.transpose):
        a, b = argument(node, 1, "dim0"), argument(node, 2, "dim1")
        if not _constants(a, b):
            return None
        a, b, order = a % rank, b % rank, list(range(rank))
        order[a], order[b] = b, a
        return order
    dims = node.args[1:] if node.target == "permute" else (argument(node, 1, "dims"),)
    if node.target == "permute" and not dims:
        dims = (node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return [d % rank for d in dims] if _constants(*dims) else None


@register_commutation(torch.permute, "permute", torch.transpose, "transpose")
def _through_permute(site: Site) -> Commutation | None:
    """Output dim ``d`` of a permutation is input dim ``order[d]``."""
    x, order = site.input(), _permutation(site)
    if x is None or order is None:
        return None
    source = order[site.selection.dim]
    return Commutation(inputs=[(x, site.selection.on(source, site.shape(x)[source]))])


# --- layers that absorb a selection of their outputs ----------------------------------------------

@register_commutation(nn.Linear)
def _through_linear(site: Site) -> Commutation | None:
    """Selecting output features drops rows of the weight and bias (absorbed: ``C^T W``, seed 003 §2.2);
    a selection of any other dim passes through to the input."""
    if site.selection.dim != site.rank - 1:
        return site.through(site.node.args[0])

    def apply():
        linear = site.own_module()
        narrow_tensor(linear, "weight", 0, site.selection.keep)
        narrow_tensor(linear, "bias", 0, site.selection.keep)
        linear.out_features = site.selection.count
    return Commutation(apply=apply)


@register_commutation(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _through_conv(site: Site) -> Commutation | None:
    """Selecting output channels drops rows of the weight and bias.

    With ``groups > 1`` output channels come in groups of ``out/groups`` that read only their group's
    ``in/groups`` input channels: the selection is absorbed when every group with a kept channel keeps
    the same number of them; groups with none are removed, and so are their input channels, whose
    selection moves upstream (a depthwise conv: selecting outputs is selecting inputs).
    """
    conv, d = site.module, site.selection.dim
    if d != site.rank - len(conv.kernel_size) - 1:
        return None
    keep, groups = site.selection.keep, conv.groups
    kept_groups, per_group = torch.unique(keep // (conv.out_channels // groups), return_counts=True)
    if not bool((per_group == per_group[0]).all()):
        return None
    in_per_group = conv.in_channels // groups
    inputs = [] if kept_groups.numel() == groups else \
        [(site.node.args[0], Selection(d, whole_blocks(kept_groups, in_per_group), conv.in_channels))]

    def apply():
        layer = site.own_module()
        narrow_tensor(layer, "weight", 0, keep)
        narrow_tensor(layer, "bias", 0, keep)
        layer.out_channels = keep.numel()
        layer.groups = kept_groups.numel()
        layer.in_channels = layer.groups * in_per_group
    return Commutation(inputs=inputs, apply=apply)


@register_commutation(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _through_conv_transpose(site: Site) -> Commutation | None:
    """Selecting output channels of an ungrouped transposed conv drops columns (dim 1) of its weight."""
    conv, d = site.module, site.selection.dim
    if conv.groups != 1 or d != site.rank - len(conv.kernel_size) - 1:
        return None

    def apply():
        layer = site.own_module()
        narrow_tensor(layer, "weight", 1, site.selection.keep)
        narrow_tensor(layer, "bias", 0, site.selection.keep)
        layer.out_channels = site.selection.count
    return Commutation(apply=apply)


@register_commutation(Selector)
def _through_selector(site: Site) -> Commutation | None:
    """Two selections of the same dim compose into one (the outer selects among the inner's output)."""
    inner = Selection.of(site.module, site.rank)
    if inner.dim != site.selection.dim:
        return None

    def apply():
        set_selection(site.gm, site.node, inner.then(site.selection))
    return Commutation(apply=apply)


def _through_constant(site: Site) -> Commutation | None:
    """A tensor attribute read by this node only (no module call uses it) is narrowed in place."""
    target = site.node.target
    for other in site.gm.graph.nodes:
        if other is not site.node and other.op in ("get_attr", "call_module") and \
                (other.target == target or target.startswith(other.target + ".")
                 or other.target.startswith(target + ".")):
            return None
    owner_name, _, name = target.rpartition(".")

    def apply():
        owner = site.gm.get_submodule(owner_name) if owner_name else site.gm
        narrow_tensor(owner, name, site.selection.dim, site.selection.keep)
    return Commutation(apply=apply)


def set_selection(gm: fx.GraphModule, node: fx.Node, selection: Selection) -> None:
    """Make the Selector called by `node` compute `selection` (other call sites of it are unchanged)."""
    device = own_module(gm, node).keep.device
    replace_module(gm, node.target, Selector(selection.dim, selection.keep, selection.size).to(device))
