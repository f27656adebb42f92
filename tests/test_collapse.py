"""collapse: selectors commute with per-entry ops and fold into the layer producing their tensor (seed 003 §2.2,
§2.6), exactly; what cannot move stays a dynamic sampler."""
import copy
import operator

import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxcompress
from fxcompress import selector as selector_module
from fxcompress.context import PassContext
from fxcompress.errors import FxCompressError
from fxcompress.export import export_onnx
from fxcompress.models import LeNet5
from fxcompress.registry import get_pass
from fxcompress.report import PassRecord
from fxcompress.rewrite import finish, module_of
from fxcompress.selector import (Commutation, Selection, Selector, narrow_tensor, register_commutation,
                                 select_inputs)
from conftest import ConvBN1d, randomize_batchnorm


LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# --- helpers -----------------------------------------------------------------------------------------

def random_half(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 2].sort().values


def channel_block_features(channels: torch.Tensor, block: int) -> torch.Tensor:
    """The flattened features of whole channels, as a layer after a flatten selects them by channel."""
    return (channels[:, None] * block + torch.arange(block)).flatten()


def annotate(gm, keeps: dict | None = None, skip=(), seed: int = 0):
    """select_inputs in front of each ungrouped Linear/Conv (a random half of its inputs unless `keeps` names
    them), except those in `skip`; returns the annotated GraphModule."""
    for i, node in enumerate(list(gm.graph.nodes)):
        layer = module_of(gm, node)
        if not isinstance(layer, LAYERS) or getattr(layer, "groups", 1) != 1 or node.target in skip:
            continue
        if keeps is not None and node.target not in keeps:
            continue
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        select_inputs(gm, node, keeps[node.target] if keeps is not None else random_half(width, seed + i))
    return finish(gm)


def traced(model, keeps=None, skip=(), dtype=torch.float64, leaf_modules=()):
    return annotate(fxcompress.trace(model.to(dtype).eval(), leaf_modules), keeps, skip)


def run_collapse(gm, x):
    """The registered pass on `gm` (in place); returns the collapsed model and its report record."""
    info = get_pass("collapse")
    ctx = PassContext(example_inputs=(x,), progress=False)
    ctx.current = PassRecord(index=0, name="collapse", exact=True)
    return info.run(gm, ctx, info.config()), ctx.current


def collapsed(gm, x):
    """(annotated copy, collapsed model, report record), after checking the collapse is exact in float64."""
    annotated = copy.deepcopy(gm)
    out, record = run_collapse(gm, x)
    with torch.no_grad():
        expected, got = annotated(x), out(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    return annotated, out, record


def selectors(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Selector)]


def keep_of(gm, node) -> torch.Tensor:
    return gm.get_submodule(node.target).keep


def params(gm) -> int:
    return sum(p.numel() for p in gm.parameters())


def dynamic_reasons(record) -> dict:
    return {row["name"]: row["reason"] for row in record.layers if row["action"] == "dynamic"}


def width(node) -> int:
    """The channel (dim 1) width of `node`'s output, as shape propagation last recorded it."""
    return node.meta["tensor_meta"].shape[1]


def regrouped_selector(gm, node):
    """The selector that alone reads the channel concatenation `node`, if any."""
    if node.target is not torch.cat or len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.op == "call_module" and isinstance(gm.get_submodule(user.target), Selector) else None


def entries_read(gm, tensor, reader) -> set | None:
    """The channels of `tensor` that `reader` uses: a selector's kept ones, the share of a concatenation's
    regrouped selector that falls on `tensor`, or None for all of them."""
    if reader.op == "call_module" and isinstance(gm.get_submodule(reader.target), Selector):
        return set(keep_of(gm, reader).tolist())
    gathered = regrouped_selector(gm, reader)
    if gathered is None:
        return None
    offset = 0
    for part in reader.args[0]:
        if part is tensor:
            return {i - offset for i in keep_of(gm, gathered).tolist() if offset <= i < offset + width(part)}
        offset += width(part)
    raise AssertionError(f"{tensor.name} is not concatenated by {reader.name}")


def assert_only_shared_tensors_keep_selectors(gm, x):
    """Every remaining selector (all on channels) reads a tensor that several consumers read and whose
    readers, together, use all of it (a residual stream or a tensor concatenated in several places), or
    gathers once after a concatenation of at least two such tensors: nothing else is left."""
    ShapeProp(gm).propagate(x)
    for node in selectors(gm):
        assert gm.get_submodule(node.target).dim % len(node.meta["tensor_meta"].shape) == 1
        source = node.args[0]
        partial = [source]
        if regrouped_selector(gm, source) is node:
            partial = [p for p in source.args[0] if len(entries_read(gm, p, source)) < width(p)]
            assert len(partial) >= 2, f"{node.name} regroups fewer than two selections"
        for tensor in partial:
            assert len(tensor.users) > 1, f"{node.name} reads {tensor.name} alone but was not absorbed"
            used = [entries_read(gm, tensor, reader) for reader in tensor.users]
            assert None in used or set().union(*used) == set(range(width(tensor))), \
                f"{tensor.name} could shrink further"


def assert_no_more_gathers(before: int, out, record):
    """Collapse left no more selectors than it received, without falling back to cautious moves."""
    assert len(selectors(out)) <= before
    assert f"{before} selector(s) in, {len(selectors(out))} left dynamic" in record.notes[0]
    assert len(record.notes) == 1, record.notes


# --- whole models ------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


def test_mlp_collapses_completely_and_drops_the_unread_rows():
    x = torch.randn(4, 20, dtype=torch.float64)
    gm = traced(MLP(), skip=("fc1",))
    before = params(gm)
    _, out, record = collapsed(gm, x)
    assert selectors(out) == []
    assert (out.fc1.out_features, out.fc2.out_features) == (32, 24)
    # fc1 loses 32 rows of 20 weights + bias; fc2 (already reading 32 inputs) loses 24 rows of 32 + bias
    assert before - params(out) == 32 * 21 + 24 * 33
    assert "0 left dynamic" in record.notes[0] and "2 absorbed" in record.notes[0]


def test_lenet5_collapses_completely():
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    channels = random_half(50, 7)
    keeps = {"conv2": random_half(20, 1), "fc1": channel_block_features(channels, 7 * 7), "fc2": random_half(500, 2)}
    gm = traced(LeNet5(), keeps)
    before = params(gm)
    _, out, _ = collapsed(gm, x)
    assert selectors(out) == []
    assert (out.conv1.out_channels, out.conv2.out_channels, out.fc1.out_features) == (10, 25, 250)
    assert out.fc1.in_features == 25 * 49
    removed = 10 * (25 + 1) + 25 * (10 * 25 + 1) + 250 * (25 * 49 + 1)
    assert before - params(out) == removed


def test_resnet18_keeps_selectors_only_on_the_residual_stream():
    model = randomize_batchnorm(torchvision.models.resnet18())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    gm = traced(model, skip=("conv1",))
    assert len(selectors(gm)) == 20
    _, out, record = collapsed(gm, x)
    assert_only_shared_tensors_keep_selectors(out, x)
    # inside each block, conv2's selector folds into conv1 through bn1 and relu
    narrowed = {row["name"] for row in record.layers if row["action"] == "narrowed"}
    assert {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)} <= narrowed
    # the residual stream's readers (the next block's conv1, the identity add or downsample) select different
    # channels: the stream shrinks to their union and each keeps a relative selector
    assert len(selectors(out)) == 16
    assert all("together use all" in reason for reason in dynamic_reasons(record).values())
    assert params(out) < 0.65 * params(model)
    assert_no_more_gathers(20, out, record)


def test_mobilenet_v2_narrows_depthwise_convs_and_continues_upstream():
    model = randomize_batchnorm(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    annotated, out, record = collapsed(traced(model, skip=("features.0.0",)), x)
    assert_only_shared_tensors_keep_selectors(out, x)
    assert_no_more_gathers(len(selectors(annotated)), out, record)
    depthwise = [(n, m) for n, m in out.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for _, m in depthwise)
    assert all(m.groups < annotated.get_submodule(n).groups for n, m in depthwise)
    assert params(out) < 0.75 * params(annotated)


def test_densenet121_splits_selections_across_concatenations():
    model = randomize_batchnorm(torchvision.models.densenet121())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    annotated, out, record = collapsed(traced(model, skip=("features.conv0",)), x)
    assert_only_shared_tensors_keep_selectors(out, x)
    narrowed = {row["name"] for row in record.layers if row["action"] == "narrowed"}
    # each dense layer's conv2 selection folds into its conv1 through relu2 and norm2
    inner = {n for n, _ in annotated.named_modules() if n.endswith(("conv1", "norm2")) and "denselayer" in n}
    assert len(inner) == 2 * 58 and inner <= narrowed
    assert params(out) < 0.75 * params(annotated)
    # each concatenation input is read by up to 24 later concatenations whose selections together cover it:
    # the pieces left at a concatenation's inputs are gathered once after it, one per dense layer at most
    assert_no_more_gathers(len(selectors(annotated)), out, record)
    assert len(selectors(annotated)) == 120 and len(selectors(out)) <= 58 + 4
    assert sum("regrouped after" in reason for reason in dynamic_reasons(record).values()) > 50


def test_efficientnet_b0_selects_the_squeeze_excite_gate():
    model = randomize_batchnorm(torchvision.models.efficientnet_b0())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    annotated, out, record = collapsed(traced(model, skip=("features.0.0",)), x)
    assert_only_shared_tensors_keep_selectors(out, x)
    narrowed = {row["name"] for row in record.layers if row["action"] == "narrowed"}
    gates = [n for n, _ in annotated.named_modules() if n.endswith("block.2.fc2")]
    assert gates and all(name in narrowed for name in gates)
    assert params(out) < 0.85 * params(annotated)
    assert_no_more_gathers(len(selectors(annotated)), out, record)


def test_conv1d_batchnorm1d_model_collapses_completely():
    model = randomize_batchnorm(ConvBN1d())
    x = torch.randn(3, 3, 16, dtype=torch.float64)
    keeps = {"fc": channel_block_features(torch.tensor([1, 4, 6]), 16), "out": random_half(20, 3)}
    _, out, _ = collapsed(traced(model, keeps), x)
    assert selectors(out) == []
    assert (out.conv.out_channels, out.bn.num_features, out.fc.out_features, out.bn2.num_features) == (3, 3, 10, 10)


class ConvFlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_flatten_moves_the_touched_channels_and_keeps_a_residual_feature_selector():
    features = torch.tensor([0, 5, 15, 2 * 16 + 3, 5 * 16, 5 * 16 + 9])  # parts of channels 0, 2 and 5
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    _, out, record = collapsed(traced(ConvFlattenLinear(), {"fc": features}), x)
    assert out.conv.out_channels == 3
    (residual,) = selectors(out)
    assert residual.args[0].target is torch.flatten
    assert keep_of(out, residual).tolist() == [0, 5, 15, 16 + 3, 32, 32 + 9]
    assert "does not commute" in dynamic_reasons(record)[residual.name]


def onnx_case(name):
    """(model, float32 input, keeps, skipped layers) of each whole-model test, for the ONNX export check."""
    first = {"resnet18": "conv1", "mobilenet_v2": "features.0.0", "densenet121": "features.conv0",
             "efficientnet_b0": "features.0.0"}
    if name in first:
        size = 64 if name in ("resnet18", "mobilenet_v2") else 32
        model = randomize_batchnorm(getattr(torchvision.models, name)())
        return model, torch.randn(1, 3, size, size), None, (first[name],)
    return {
        "mlp": lambda: (MLP(), torch.randn(4, 20), None, ("fc1",)),
        "lenet5": lambda: (LeNet5(), torch.randn(1, 1, 28, 28),
                           {"conv2": random_half(20, 1), "fc1": channel_block_features(random_half(50, 4), 49)}, ()),
        "conv1d": lambda: (randomize_batchnorm(ConvBN1d()), torch.randn(3, 3, 16),
                           {"fc": channel_block_features(torch.tensor([1, 4, 6]), 16), "out": random_half(20, 3)}, ()),
        "flatten_linear": lambda: (ConvFlattenLinear(), torch.randn(2, 3, 4, 4),
                                   {"fc": torch.tensor([0, 5, 15, 35, 80, 89])}, ()),
    }[name]()


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0",
                                  "conv1d", "flatten_linear"])
def test_collapsed_models_export_to_onnx_and_match(name, tmp_path):
    model, x, keeps, skip = onnx_case(name)
    gm = traced(model, keeps, skip, dtype=torch.float32)
    out, _ = run_collapse(gm, x)
    assert params(out) < params(model)
    result = export_onnx(out, (x,), tmp_path / f"{name}.onnx")
    assert result.max_abs_error is not None and result.max_abs_error < 1e-3
    gathers = sum(n.op_type == "Gather" for n in onnx.load(result.path).graph.node)
    assert gathers == len(selectors(out))
    if name in ("mlp", "lenet5", "conv1d"):
        assert gathers == 0


def test_collapse_runs_from_a_recipe_and_verifies_as_exact():
    gm = traced(MLP(), skip=("fc1",))
    recipe = {"fxcompress": 1, "leaf_modules": ["Selector"], "passes": ["collapse"]}
    result = fxcompress.compress(gm, recipe, (torch.randn(2, 20, dtype=torch.float64),), progress=False,
                                 verify=True)
    (record,) = result.report.passes
    assert record.verified and record.params_after < record.params_before
    assert "2 absorbed into layers" in record.notes[0]


# --- each commutation rule ---------------------------------------------------------------------------

class Through(nn.Module):
    """conv -> op -> conv: the second conv reads a selection; the op must let it through to the first."""

    def __init__(self, op, channels=8):
        super().__init__()
        self.first = nn.Conv2d(3, channels, 3, padding=1)
        self.op = op
        self.last = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        return self.last(self.op(self.first(x)))


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Method(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return getattr(x, self.name)()


PER_CHANNEL = {
    **{cls.__name__: cls for cls in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                                     nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.Dropout,
                                     nn.Dropout2d, nn.PReLU)},
    "ReLU(inplace)": lambda: nn.ReLU(inplace=True),
    "PReLU(8)": lambda: nn.PReLU(8),
    "BatchNorm2d": lambda: randomize_batchnorm(nn.BatchNorm2d(8)),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(8, affine=True),
    "MaxPool2d": lambda: nn.MaxPool2d(2),
    "AvgPool2d": lambda: nn.AvgPool2d(2),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d(1),
    "AdaptiveMaxPool2d": lambda: nn.AdaptiveMaxPool2d(2),
    **{f"torch.{f.__name__}": (lambda f=f: Call(f)) for f in (torch.relu, torch.sigmoid, torch.tanh)},
    **{f"F.{f.__name__}": (lambda f=f: Call(f)) for f in (F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu,
                                                          F.hardswish)},
    "F.dropout(training=False)": lambda: Call(lambda x: F.dropout(x, 0.5, training=False)),
    "F.max_pool2d": lambda: Call(lambda x: F.max_pool2d(x, 2)),
    "F.adaptive_avg_pool2d": lambda: Call(lambda x: F.adaptive_avg_pool2d(x, 1)),
    **{f".{m}()": (lambda m=m: Method(m)) for m in ("relu", "sigmoid", "tanh", "clone")},
    "x * 2 + 1": lambda: Call(lambda x: x * 2 + 1),
    "x.clamp(min=0)": lambda: Call(lambda x: x.clamp(min=0)),
    "relu(x - x.mean((2, 3), keepdim=True))": lambda: Call(
        lambda x: torch.relu(x - x.mean((2, 3), keepdim=True))),
}


@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_ops_let_the_selection_through_to_the_producer(name):
    model = Through(PER_CHANNEL[name]())
    keep = random_half(8, 5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _, out, _ = collapsed(traced(model, {"last": keep}), x)
    assert out.first.out_channels == 4
    assert [s.name for s in selectors(out)] == []


def test_batchnorm_keeps_the_selected_channels_statistics():
    bn = randomize_batchnorm(nn.BatchNorm2d(8))
    keep = random_half(8, 5)
    _, out, _ = collapsed(traced(Through(bn), {"last": keep}), torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert torch.equal(out.op.running_mean, bn.running_mean.double()[keep])
    assert torch.equal(out.op.weight.detach(), bn.weight.detach().double()[keep]) and out.op.num_features == 4


class Flattened(nn.Module):
    """A selection after a reduction to (N, C): mean over H, W then a Linear."""

    def __init__(self, reduce):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.reduce = reduce
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.reduce(torch.relu(self.conv(x))))


@pytest.mark.parametrize("reduce", [lambda x: x.mean((2, 3)), lambda x: torch.sum(x, dim=[-1, -2]),
                                    lambda x: x.amax(dim=(2, 3), keepdim=True).flatten(1),
                                    lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1),
                                    nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())],
                         ids=["mean", "sum", "amax-keepdim-flatten", "pool-flatten", "Flatten"])
def test_reductions_and_flatten_pass_a_feature_selection_to_channels(reduce):
    model = Flattened(reduce)
    _, out, _ = collapsed(traced(model, {"fc": torch.tensor([1, 2, 6])}), torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert out.conv.out_channels == 3 and selectors(out) == []


class Permuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).permute(0, 2, 1)).transpose(1, 2)


def test_permute_maps_the_selected_dim_back():
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    _, out, _ = collapsed(traced(Permuted(), {"fc": torch.tensor([0, 3, 7])}), x)
    assert out.conv.out_channels == 3 and selectors(out) == []


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.last = nn.Conv2d(15, 2, 1)

    def forward(self, x):
        return self.last(torch.relu(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)))


def test_cat_splits_the_selection_by_offsets_and_drops_inputs_with_nothing_kept():
    keep = torch.tensor([0, 2, 10, 11, 14])  # a: 0, 2; b: none; c: 0, 1, 4
    _, out, _ = collapsed(traced(Concat(), {"last": keep}), torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert (out.a.out_channels, out.c.out_channels) == (2, 3)
    assert not hasattr(out, "b") and selectors(out) == []


class SharedConcat(nn.Module):
    """a and b are also read whole by `side`, c only by the concatenation that `last` reads a part of."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.side = nn.Conv2d(10, 2, 1)
        self.last = nn.Conv2d(15, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.last(torch.relu(torch.cat([a, b, self.c(x)], dim=1))) + self.side(torch.cat([a, b], 1))


def test_a_concatenation_gathers_its_inputs_leftover_selections_once_after_it():
    keep = torch.tensor([0, 2, 5, 9, 10, 13])  # a: 0, 2; b: 1, 5; c: 0, 3
    annotated, out, record = collapsed(traced(SharedConcat(), {"last": keep}),
                                       torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert out.c.out_channels == 2 and (out.a.out_channels, out.b.out_channels) == (4, 6)
    (node,) = selectors(out)
    assert node.args[0].target is torch.cat and keep_of(out, node).tolist() == [0, 2, 5, 9, 10, 11]
    assert "regrouped after" in dynamic_reasons(record)[node.name] and "1 removed by regrouping" in record.notes[0]
    assert len(record.notes) == 1


class SplitOnInput(nn.Module):
    """A concatenation or a sum of two functions of the graph input: splitting a selection there can absorb
    nothing, as both halves reach the input."""

    def __init__(self, combine):
        super().__init__()
        self.combine = combine
        self.first = nn.Conv2d(3, 3, 1)
        self.last = nn.Conv2d(6 if combine == "cat" else 3, 2, 1)

    def forward(self, x):
        parts = [torch.relu(x), torch.sigmoid(x)]
        joined = torch.cat(parts, 1) if self.combine == "cat" else parts[0] + parts[1]
        return self.last(joined) + self.first(x).sum()


@pytest.mark.parametrize("combine, keep", [("cat", [0, 4]), ("add", [0, 2])])
def test_a_split_that_would_leave_more_selectors_is_not_made(combine, keep):
    gm = traced(SplitOnInput(combine), {"last": torch.tensor(keep), "first": torch.tensor([1, 2])})
    annotated, out, record = collapsed(gm, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert len(selectors(annotated)) == 2 and len(selectors(out)) == 2
    (node,) = [n for n in selectors(out) if n.args[0].op != "placeholder"]
    assert node.args[0].target in (torch.cat, operator.add) and keep_of(out, node).tolist() == keep
    assert "would split it into 2 selectors" in dynamic_reasons(record)[node.name]
    assert "never add a selector" in record.notes[1]


class FlattenReaders(nn.Module):
    """Two heads read parts of the same flattened features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.left, self.right = nn.Linear(8 * 4, 3), nn.Linear(8 * 4, 3)

    def forward(self, x):
        y = torch.flatten(torch.relu(self.conv(x)), 1)
        return self.left(y) + self.right(y)


def test_a_selector_read_only_by_selectors_is_folded_into_them():
    keeps = {"left": torch.tensor([0, 5, 9]), "right": torch.tensor([1, 8, 30])}  # channels 0, 1, 2 and 7
    _, out, record = collapsed(traced(FlattenReaders(), keeps), torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert out.conv.out_channels == 4
    # the union's residual selector after the flatten is folded into the two heads' selectors
    assert sorted(keep_of(out, n).tolist() for n in selectors(out)) == [[0, 5, 9], [1, 8, 14]]
    assert all(n.args[0].target is torch.flatten for n in selectors(out)) and "1 removed by" in record.notes[0]


class Tokens(nn.Module):
    """(N, C, L) channels made into tokens (N, L, C) or groups (N, G, C/G, L) around a normalisation."""

    def __init__(self, norm, reshape=None):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.norm, self.reshape = norm, reshape or (lambda y: y)
        self.last = nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.last(self.reshape(self.norm(self.conv(x))))


def _affine(norm):
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def test_layer_norm_over_other_dims_lets_the_selection_through():
    """LayerNorm over L (the last dim) commutes with selecting channels; its weight spans L only."""
    for norm in (_affine(nn.LayerNorm(5)), Call(lambda y: F.layer_norm(y, (5,)))):
        _, out, _ = collapsed(traced(Tokens(norm), {"last": torch.tensor([1, 4, 6])}),
                              torch.randn(2, 3, 5, dtype=torch.float64))
        assert out.conv.out_channels == 3 and selectors(out) == []


def test_layer_norm_over_the_selected_dim_stays_dynamic():
    norm = Call(lambda y: F.layer_norm(y.transpose(1, 2), (8,)).transpose(1, 2))
    _, out, record = collapsed(traced(Tokens(norm), {"last": torch.tensor([1, 4, 6])}),
                               torch.randn(2, 3, 5, dtype=torch.float64))
    (node,) = selectors(out)
    assert out.conv.out_channels == 8 and "layer_norm" in dynamic_reasons(record)[node.name]


@pytest.mark.parametrize("keep, groups_left, stays", [([2, 3, 6, 7], 2, False), ([0, 3, 6], 3, True),
                                                      ([0, 2, 4, 6], 4, True)],
                         ids=["whole-groups", "part-groups", "every-group"])
def test_group_norm_keeps_whole_groups_and_a_residual_within_them(keep, groups_left, stays):
    norm = _affine(nn.GroupNorm(4, 8))
    _, out, _ = collapsed(traced(Tokens(norm), {"last": torch.tensor(keep)}), torch.randn(2, 3, 5, dtype=torch.float64))
    assert (out.norm.num_groups, out.norm.num_channels) == (groups_left, 2 * groups_left)
    assert out.conv.out_channels == 2 * groups_left and len(selectors(out)) == int(stays)


RESHAPES = {
    "split L": lambda y: y.view(2, 8, 5, 2).sum(-1),
    "merge L and 1": lambda y: torch.reshape(y.view(2, 8, 10, 1), (2, 8, 10)),
    "-1 on channels": lambda y: y.reshape(2, -1, 10),
}


@pytest.mark.parametrize("name", RESHAPES)
def test_a_reshape_of_other_dims_lets_the_selection_through(name):
    model = Tokens(nn.Identity(), RESHAPES[name])
    _, out, _ = collapsed(traced(model, {"last": torch.tensor([1, 4, 6])}), torch.randn(2, 3, 10, dtype=torch.float64))
    assert out.conv.out_channels == 3 and selectors(out) == []


def test_a_reshape_of_the_selected_dim_stays_dynamic():
    model = Tokens(nn.Identity(), lambda y: y.view(2, 4, 2, 10).flip(2).reshape(2, 8, 10))
    _, out, record = collapsed(traced(model, {"last": torch.tensor([1, 4, 6])}),
                               torch.randn(2, 3, 10, dtype=torch.float64))
    (node,) = selectors(out)
    assert out.conv.out_channels == 8 and "does not commute" in dynamic_reasons(record)[node.name]


class Residual(nn.Module):
    """Two branches added, one scaled by a broadcast (N, 1, H, W) map, one by a per-channel parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.spatial = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 1, 1)
        self.gain = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.last = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.last(torch.relu(self.a(x) * torch.sigmoid(self.spatial(x)) + 0.5 * self.b(x) * self.gain))


def test_add_and_mul_push_into_every_operand_and_leave_broadcast_ones_alone():
    keep = torch.tensor([1, 4, 5])
    annotated, out, _ = collapsed(traced(Residual(), {"last": keep}), torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert (out.a.out_channels, out.b.out_channels, out.spatial.out_channels) == (3, 3, 1)
    assert torch.equal(out.gain, annotated.gain[:, keep]) and selectors(out) == []


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.squeeze, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.last = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.silu(self.conv(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.last(y * gate)


def test_a_squeeze_excite_gate_is_selected_into_its_last_conv():
    keep = torch.tensor([0, 1, 2, 3, 6])
    _, out, record = collapsed(traced(SqueezeExcite(), {"last": keep}), torch.randn(2, 3, 7, 7, dtype=torch.float64))
    assert out.excite.out_channels == 5
    # y is read by the gate's pooling (whole) and by the product (selected): it stays whole, selected once
    assert out.conv.out_channels == 8 and len(selectors(out)) == 1
    assert "also read whole" in next(iter(dynamic_reasons(record).values()))


class Grouped(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8 if groups == 8 else 4, 3, groups=groups, padding=1)
        self.last = nn.Conv2d(self.grouped.out_channels, 2, 1)

    def forward(self, x):
        return self.last(F.relu6(self.grouped(torch.relu(self.first(x)))))


def test_depthwise_conv_shrinks_and_passes_its_selection_upstream():
    keep = torch.tensor([0, 3, 4, 7])
    annotated, out, _ = collapsed(traced(Grouped(8), {"last": keep}), torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert (out.grouped.groups, out.grouped.in_channels, out.grouped.out_channels) == (4, 4, 4)
    assert torch.equal(out.grouped.weight, annotated.grouped.weight[keep])
    assert out.first.out_channels == 4 and selectors(out) == []


@pytest.mark.parametrize("keep, groups_left, stays", [([2, 3], 1, 0), ([0, 3], 2, 0), ([0, 1, 3], 2, 1)],
                         ids=["whole-group", "one-per-group", "uneven"])
def test_grouped_conv_is_narrowed_only_by_even_groups(keep, groups_left, stays):
    annotated, out, record = collapsed(traced(Grouped(2), {"last": torch.tensor(keep)}),
                                       torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert out.grouped.groups == groups_left and len(selectors(out)) == stays
    if stays:
        assert "does not commute" in next(iter(dynamic_reasons(record).values()))


class Upsampling(nn.Module):
    """A transposed conv producing channels, and a Linear applied per token on (N, T, F) whose token dim is
    selected: it passes through the Linear to its input."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 6, 2, stride=2)
        self.last = nn.Conv2d(6, 2, 1)
        self.tokens, self.head = nn.Linear(5, 7), nn.Linear(4, 3)

    def forward(self, x, t):
        mixed = self.head(torch.relu(self.tokens(t)).transpose(1, 2))  # (N, 7, 3)
        return self.last(torch.relu(self.up(x))).sum() + mixed.sum()


def test_conv_transpose_absorbs_and_a_linear_passes_other_dims_through():
    gm = annotate(fxcompress.trace(Upsampling().double()), {"last": torch.tensor([1, 4]),
                                                            "head": torch.tensor([0, 3])})
    x, t = torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    annotated = copy.deepcopy(gm)
    info = get_pass("collapse")
    out = info.run(gm, PassContext(example_inputs=(x, t), progress=False), info.config())
    with torch.no_grad():
        torch.testing.assert_close(out(x, t), annotated(x, t), rtol=1e-10, atol=1e-10)
    assert out.up.out_channels == 2 and out.up.weight.shape[1] == 2
    # the head selects tokens 0 and 3 of t: they cross the transpose, relu and the per-token Linear
    (node,) = selectors(out)
    assert node.args[0].op == "placeholder" and keep_of(out, node).tolist() == [0, 3]


class SharedNorm(nn.Module):
    """One BatchNorm module called on two branches; only one branch is selected."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.norm = randomize_batchnorm(nn.BatchNorm2d(8))
        self.last_a, self.last_b = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.last_a(self.norm(self.a(x))) + self.last_b(self.norm(self.b(x)))


def test_a_module_called_twice_is_copied_before_one_call_is_narrowed():
    _, out, _ = collapsed(traced(SharedNorm(), {"last_a": torch.tensor([2, 6])}),
                          torch.randn(2, 3, 4, 4, dtype=torch.float64))
    norms = sorted(m.num_features for m in out.modules() if isinstance(m, nn.BatchNorm2d))
    assert norms == [2, 8] and (out.a.out_channels, out.b.out_channels) == (2, 8) and selectors(out) == []


class Fork(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 1)
        self.left, self.right = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.first(x))
        return self.left(y) + self.right(y)


@pytest.mark.parametrize("left, right, width, remaining", [([0, 2, 5], [2, 3], 4, 2), ([0, 2, 5], [0, 5], 3, 1),
                                                          ([1, 6], [1, 6], 2, 0), ([0, 1, 2, 3], [4, 5, 6, 7], 8, 2)],
                         ids=["overlap", "subset", "identical", "disjoint-cover"])
def test_a_shared_tensor_shrinks_to_the_union_and_readers_keep_relative_selectors(left, right, width, remaining):
    keeps = {"left": torch.tensor(left), "right": torch.tensor(right)}
    _, out, _ = collapsed(traced(Fork(), keeps), torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert out.first.out_channels == width and len(selectors(out)) == remaining


def test_readers_of_a_tensor_that_cannot_shrink_keep_their_own_selectors():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.left(x) + self.right(x)

    keeps = {"left": torch.tensor([0, 2, 5]), "right": torch.tensor([2, 3])}
    _, out, record = collapsed(traced(TwoReaders(), keeps), torch.randn(2, 8, 3, 3, dtype=torch.float64))
    assert sorted(keep_of(out, n).tolist() for n in selectors(out)) == [[0, 2, 5], [2, 3]]
    assert all("use 4 of its 8 entries" in r and "graph input" in r for r in dynamic_reasons(record).values())


def test_chained_selectors_merge_into_one():
    gm = traced(Fork(), {"left": torch.tensor([1, 2, 5, 7])})
    left = next(n for n in gm.graph.nodes if n.target == "left")
    select_inputs(gm, left, torch.tensor([0, 2]))  # a second selection, of the first one's output
    gm = finish(gm)
    assert len(selectors(gm)) == 2
    _, out, record = collapsed(gm, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert out.left.in_channels == 2 and out.first.out_channels == 8 and len(selectors(out)) == 1
    (node,) = selectors(out)
    assert keep_of(out, node).tolist() == [1, 5] and "1 merged" in record.notes[0]


# --- what stays dynamic, the registry, errors ---------------------------------------------------------

class ChannelScale(nn.Module):
    """A custom per-channel op fxcompress knows nothing about, traced as a leaf."""

    def __init__(self, channels=8):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


@pytest.fixture
def private_rules(monkeypatch):
    monkeypatch.setattr(selector_module, "_RULES", dict(selector_module._RULES))


def test_an_op_without_a_rule_keeps_a_dynamic_selector_that_says_why(tmp_path):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    gm = traced(Through(ChannelScale()), {"last": random_half(8, 1)}, leaf_modules=[ChannelScale])
    _, out, record = collapsed(gm, x)
    (node,) = selectors(out)
    assert node.args[0].target == "op" and out.first.out_channels == 8
    reason = dynamic_reasons(record)[node.name]
    assert "no commutation rule" in reason and "ChannelScale" in reason and "register_commutation" in reason


def test_a_registered_rule_for_a_custom_module_is_used(private_rules):
    calls = []

    @register_commutation(ChannelScale)
    def through_channel_scale(site):
        calls.append(site.node.name)
        if site.selection.dim != 1:
            return None

        def apply():
            narrow_tensor(site.own_module(), "gain", 0, site.selection.keep)
        return Commutation(inputs=[(site.node.args[0], site.selection)], apply=apply)

    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _, out, _ = collapsed(traced(Through(ChannelScale()), {"last": random_half(8, 1)}, leaf_modules=[ChannelScale]), x)
    assert calls == ["op"] and out.op.gain.numel() == 4 and out.first.out_channels == 4
    assert selectors(out) == []


def test_a_failing_rule_is_an_error_naming_the_node(private_rules):
    @register_commutation(ChannelScale)
    def broken(site):
        raise RuntimeError("boom")

    gm = traced(Through(ChannelScale()), {"last": random_half(8, 1)}, leaf_modules=[ChannelScale])
    with pytest.raises(FxCompressError, match=r"broken.*'op'.*ChannelScale.*boom"):
        run_collapse(gm, torch.randn(2, 3, 5, 5, dtype=torch.float64))


class Readers(nn.Module):
    """Selections the framework must leave alone: a graph input, a tensor whose size() is read, a view."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.conv = nn.Linear(6, 4), nn.Conv2d(3, 8, 1)
        self.fc_sized, self.fc_viewed = nn.Linear(8, 3), nn.Linear(8 * 4, 3)

    def forward(self, x, v):
        y = torch.relu(self.conv(x))
        pooled = y.mean((2, 3))
        z = self.fc_sized(pooled) * pooled.size(1)
        return z.sum() + self.fc_viewed(y[:, :, :2, :2].reshape(y.shape[0], -1)).sum() + self.fc_in(v).sum()


def test_selections_that_cannot_move_stay_dynamic_and_exact():
    model = Readers().double()
    keeps = {"fc_in": torch.tensor([0, 3, 5]), "fc_sized": torch.tensor([1, 2, 6]), "fc_viewed": random_half(32, 2)}
    gm = annotate(fxcompress.trace(model), keeps)
    x, v = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    annotated = copy.deepcopy(gm)
    info = get_pass("collapse")
    ctx = PassContext(example_inputs=(x, v), progress=False)
    ctx.current = PassRecord(index=0, name="collapse", exact=True)
    out = info.run(gm, ctx, info.config())
    with torch.no_grad():
        torch.testing.assert_close(out(x, v), annotated(x, v), rtol=1e-10, atol=1e-12)
    reasons = sorted(dynamic_reasons(ctx.current).values())
    assert len(reasons) == 3 and out.conv.out_channels == 8
    assert any("graph input" in r for r in reasons)
    assert any("also read whole" in r and "size" in r for r in reasons)
    assert any("does not commute" in r and "reshape" in r for r in reasons)


def test_an_in_place_op_on_a_shared_tensor_is_not_crossed():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.last = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            z = F.relu(y, inplace=True)
            return self.last(z), y

    gm = traced(InPlace(), {"last": torch.tensor([0, 5])})
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    annotated = copy.deepcopy(gm)
    out, _ = run_collapse(gm, x)
    with torch.no_grad():
        for got, expected in zip(out(x), annotated(x)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert out.conv.out_channels == 8 and len(selectors(out)) == 1


def test_selection_arithmetic():
    outer = Selection(1, torch.tensor([1, 3, 4, 6]), 8)
    inner = Selection(1, torch.tensor([3, 6]), 8)
    assert inner.within(outer).keep.tolist() == [1, 3] and inner.within(outer).size == 4
    assert outer.then(Selection(1, torch.tensor([0, 2]), 4)).keep.tolist() == [1, 4]
    assert Selection(0, torch.arange(3), 3).is_identity
    with pytest.raises(ValueError):
        Selection(1, torch.tensor([2, 1]), 4)
    with pytest.raises(ValueError):
        inner.within(Selection(1, torch.tensor([3]), 8))
