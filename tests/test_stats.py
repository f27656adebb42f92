"""Tests for fxcompress.stats: streaming activation statistics (seed 003 §2.4-2.7, seed 000 bias)."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.stats import LayerStats, collect_stats, layer_inputs_to_rows



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def brute_force_patches(conv, x):
    """Receptive fields by explicit loops over output positions: (N, d) or (g, N, d_g)."""
    spatial = len(conv.kernel_size)
    if spatial == 1:
        conv2 = nn.Conv2d(conv.in_channels, conv.out_channels, (1, *conv.kernel_size), groups=conv.groups)
        conv2.stride, conv2.padding, conv2.dilation = (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
        return brute_force_patches(conv2, x.unsqueeze(2))
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for u in range(out_h):
            for v in range(out_w):
                patch = xp[b, :, u * sh : u * sh + dh * (kh - 1) + 1 : dh, v * sw : v * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(conv.groups, -1))
    rows = torch.stack(rows, dim=1)
    return rows[0] if conv.groups == 1 else rows


def output_rows(y):
    """(B, C, *spatial) -> (B * positions, C), row order of layer_inputs_to_rows."""
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])


def append_ones(rows):
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1)], dim=-1)


def capture_inputs(module, model, batches):
    """Inputs of `module` for every batch, by running `model` with a temporary hook."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    return seen


CONV_CASES = {
    "conv2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2),
    "conv2d_groups2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    "conv2d_rect": lambda: nn.Conv2d(4, 2, (2, 3), stride=(1, 2), padding=(2, 1), dilation=(1, 2)),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2),
    "conv1d_groups2": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
}


def conv_input(conv, batch=2):
    return torch.randn(batch, conv.in_channels, *([9] * len(conv.kernel_size)))


def test_linear_stats_match_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 3, 6) for _ in range(3)]
    stats = collect_stats(model, ["0", "2"], batches, progress=False)

    x = torch.cat([b.reshape(-1, 6) for b in batches])
    for name, inputs in (("0", x), ("2", torch.relu(model[0](x)))):
        layer = model.get_submodule(name)
        x_aug = append_ones(inputs.detach())
        y = layer(inputs).detach()
        s = stats[name]
        assert (s.kind, s.groups, s.kernel_numel, s.has_bias_column) == ("linear", 1, 1, True)
        assert s.count == 36
        assert s.sum_xx.dtype == torch.float64
        torch.testing.assert_close(s.sum_xx, x_aug.T @ x_aug, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.sum_yx, y.T @ x_aug, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.sum_yy, (y**2).sum(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.Rxx, s.sum_xx / 36)
        torch.testing.assert_close(s.Ryx, s.sum_yx / 36)
        torch.testing.assert_close(s.ryy, s.sum_yy / 36)


def test_linear_without_bias_column_keeps_bias_fixed():
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    batches = [torch.randn(7, 5) for _ in range(2)]
    s = collect_stats(layer, [""], batches, append_bias=False, progress=False)[""]
    x = torch.cat(batches)
    y = x @ layer.weight.detach().T
    assert not s.has_bias_column and s.sum_xx.shape == (5, 5)
    torch.testing.assert_close(s.sum_xx, x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sum_yx, y.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_rows_match_brute_force_unfold(case):
    torch.manual_seed(2)
    conv = CONV_CASES[case]()
    x = conv_input(conv)
    rows = layer_inputs_to_rows(conv, x)
    torch.testing.assert_close(rows, brute_force_patches(conv, x), rtol=0, atol=0)
    rows_aug = layer_inputs_to_rows(conv, x, bias=True)
    assert rows_aug.shape[:-1] == rows.shape[:-1] and rows_aug.shape[-1] == rows.shape[-1] + 1
    assert torch.equal(rows_aug[..., :-1], rows) and bool((rows_aug[..., -1] == 1).all())


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_flat_weight_on_rows_reproduces_conv_output(case):
    torch.manual_seed(3)
    conv = CONV_CASES[case]()
    x = conv_input(conv)
    w_aug = torch.cat([conv.weight.detach().reshape(conv.out_channels, -1), conv.bias.detach()[:, None]], dim=1)
    rows = layer_inputs_to_rows(conv, x, bias=True)
    if conv.groups == 1:
        y = rows @ w_aug.T
    else:
        h_g = conv.out_channels // conv.groups
        y = torch.cat([rows[j] @ w_aug[j * h_g : (j + 1) * h_g].T for j in range(conv.groups)], dim=1)
    torch.testing.assert_close(y, output_rows(conv(x).detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same", "valid"])
@pytest.mark.parametrize("dims", [1, 2])
def test_rows_honour_padding_modes(padding_mode, padding, dims):
    torch.manual_seed(4)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(3, 4, 4 if padding == "same" else 3, padding=padding, padding_mode=padding_mode, dilation=2, bias=False)
    x = torch.randn(2, 3, *([8] * dims))
    rows = layer_inputs_to_rows(conv, x)
    y = rows @ conv.weight.detach().reshape(4, -1).T
    torch.testing.assert_close(y, output_rows(conv(x).detach()), rtol=0, atol=1e-12)


def test_unbatched_conv_input():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(layer_inputs_to_rows(conv, x), layer_inputs_to_rows(conv, x[None]), rtol=0, atol=0)
    s = collect_stats(conv, [""], [x], progress=False)[""]
    y = output_rows(conv(x[None]).detach())
    rows = layer_inputs_to_rows(conv, x, bias=True)
    torch.testing.assert_close(s.sum_yx, y.T @ rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["conv2d", "conv2d_groups2", "conv1d", "conv1d_groups2"])
def test_conv_stats_match_brute_force(case):
    torch.manual_seed(6)
    conv = CONV_CASES[case]()
    batches = [conv_input(conv) for _ in range(2)]
    s = collect_stats(conv, [""], batches, progress=False)[""]

    g, h_g = conv.groups, conv.out_channels // conv.groups
    d_g = conv.weight[0].numel() + 1
    patches = torch.cat([append_ones(brute_force_patches(conv, x)) for x in batches], dim=-2)
    y = torch.cat([output_rows(conv(x).detach()) for x in batches])
    n = y.shape[0]
    assert s.kind == "conv" and s.groups == g and s.kernel_numel == conv.weight[0, 0].numel() and s.count == n
    if g == 1:
        assert s.sum_xx.shape == (d_g, d_g) and s.sum_yx.shape == (conv.out_channels, d_g)
        torch.testing.assert_close(s.sum_xx, patches.T @ patches, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(s.sum_yx, y.T @ patches, rtol=1e-12, atol=1e-10)
    else:
        assert s.sum_xx.shape == (g, d_g, d_g) and s.sum_yx.shape == (g, h_g, d_g)
        for j in range(g):
            torch.testing.assert_close(s.sum_xx[j], patches[j].T @ patches[j], rtol=1e-12, atol=1e-10)
            y_j = y[:, j * h_g : (j + 1) * h_g]
            torch.testing.assert_close(s.sum_yx[j], y_j.T @ patches[j], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(s.sum_yy, (y**2).sum(), rtol=1e-12, atol=1e-10)


def test_merge_of_halves_equals_full_pass_exactly():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-3, 4, p.shape))
    batches = [torch.randint(-4, 5, (2, 3, 5, 5)).double() for _ in range(4)]
    names = ["0", "1", "3"]
    full = collect_stats(model, names, batches, progress=False)
    first = collect_stats(model, names, batches[:2], progress=False)
    second = collect_stats(model, names, batches[2:], progress=False)
    for name in names:
        for merged in (first[name] + second[name], sum([first[name], second[name]])):
            assert merged.count == full[name].count
            for field in ("sum_xx", "sum_yx", "sum_yy"):
                assert torch.equal(getattr(merged, field), getattr(full[name], field))
        in_place = first[name].merge(second[name])
        assert in_place is first[name] and torch.equal(in_place.sum_xx, full[name].sum_xx)
    with pytest.raises(ValueError, match="incompatible"):
        full["0"] + full["1"]


def test_reference_target_uses_reference_outputs():
    torch.manual_seed(8)
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
        model[2].weight.add_(1.0)
    batches = [(torch.randn(8, 6), torch.zeros(8)) for _ in range(2)]
    x = torch.cat([b[0] for b in batches])
    x_model = torch.tanh(model[0](x)).detach()
    y_ref = reference[2](torch.tanh(reference[0](x))).detach()

    s = collect_stats(model, ["2"], batches, target="reference", reference_model=reference, progress=False)["2"]
    x_aug = append_ones(x_model)
    torch.testing.assert_close(s.sum_xx, x_aug.T @ x_aug, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sum_yx, y_ref.T @ x_aug, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sum_yy, (y_ref**2).sum(), rtol=1e-12, atol=1e-12)

    fixed = collect_stats(
        model, ["2"], batches, target="reference", reference_model=reference, append_bias=False, progress=False
    )["2"]
    y_shift = y_ref - model[2].bias.detach()
    torch.testing.assert_close(fixed.sum_yx, y_shift.T @ x_model, rtol=1e-12, atol=1e-12)

    own = collect_stats(model, ["2"], batches, progress=False)["2"]
    assert not torch.allclose(own.sum_yx, s.sum_yx)


def test_reference_target_grouped_conv_and_shared_layer():
    torch.manual_seed(9)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    reference = Shared()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.conv.weight.mul_(-1)
    x = torch.randn(2, 4, 5, 5)
    s = collect_stats(model, ["conv"], [x], target="reference", reference_model=reference, progress=False)["conv"]

    inputs = [x, torch.relu(model.conv(x))]
    targets = [reference.conv(x), reference.conv(torch.relu(reference.conv(x)))]
    patches = torch.cat([append_ones(brute_force_patches(model.conv, i.detach())) for i in inputs], dim=1)
    y = torch.cat([output_rows(t.detach()) for t in targets])
    assert s.count == y.shape[0] == 100
    for j in range(2):
        torch.testing.assert_close(s.sum_yx[j], y[:, 2 * j : 2 * j + 2].T @ patches[j], rtol=1e-12, atol=1e-10)


def test_streaming_keeps_no_activations_and_constant_shapes():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    alive = []

    def stream(n):
        for _ in range(n):
            assert sum(ref() is not None for ref in alive) <= 1, "earlier batches are still referenced"
            x = torch.randn(16, 8)
            alive.append(weakref.ref(x))
            yield x

    few = collect_stats(model, ["0", "2"], stream(2), progress=False)
    alive.clear()
    many = collect_stats(model, ["0", "2"], stream(50), progress=False)
    for name in ("0", "2"):
        assert many[name].sum_xx.shape == few[name].sum_xx.shape
        assert many[name].sum_yx.shape == few[name].sum_yx.shape
        assert many[name].sum_yy.shape == ()
        assert many[name].count == 25 * few[name].count


def test_column_groups_and_unpenalised_bias_column():
    torch.manual_seed(11)
    lin = nn.Linear(3, 2)
    s = collect_stats(lin, [""], [torch.randn(5, 3)], progress=False)[""]
    assert s.column_groups().tolist() == [0, 1, 2, -1]
    x = s.Rxx
    torch.testing.assert_close(x[-1, -1], torch.tensor(1.0))
    torch.testing.assert_close(x[-1, :-1], s.sum_xx[:-1, -1] / s.count)
    torch.testing.assert_close(s.Ryx[:, -1], s.sum_yx[:, -1] / s.count)

    no_bias = collect_stats(nn.Linear(3, 2, bias=False), [""], [torch.randn(5, 3)], progress=False)[""]
    assert not no_bias.has_bias_column and no_bias.column_groups().tolist() == [0, 1, 2]

    conv = nn.Conv2d(2, 3, (1, 2))
    s = collect_stats(conv, [""], [torch.randn(1, 2, 3, 3)], progress=False)[""]
    assert s.column_groups().tolist() == [0, 0, 1, 1, -1]

    grouped = nn.Conv1d(4, 2, 2, groups=2)
    s = collect_stats(grouped, [""], [torch.randn(1, 4, 5)], progress=False)[""]
    assert s.column_groups().tolist() == [[0, 0, 1, 1, -1], [2, 2, 3, 3, -1]]
    assert s.column_groups().shape == s.sum_xx.shape[:-1]
    # every group id >= 0 covers exactly kernel_numel columns of one input channel
    ids = s.column_groups()
    for channel in range(4):
        assert int((ids == channel).sum()) == s.kernel_numel


def test_graph_module_and_tuple_inputs():
    torch.manual_seed(12)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x, z):
            return self.b(self.a(x) + z)

    model = TwoInputs()
    traced = torch.fx.symbolic_trace(model)
    batches = [((torch.randn(5, 3), torch.randn(5, 4)), torch.zeros(5)) for _ in range(2)]
    eager = collect_stats(model, ["a", "b"], batches, progress=False)
    graph = collect_stats(traced, ["a", "b"], batches, progress=False)
    for name in ("a", "b"):
        assert graph[name].count == 10
        torch.testing.assert_close(graph[name].sum_xx, eager[name].sum_xx, rtol=0, atol=0)
        torch.testing.assert_close(graph[name].sum_yx, eager[name].sum_yx, rtol=0, atol=0)


def test_errors_and_hooks_always_removed():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Conv3d(1, 1, 1), nn.ConvTranspose2d(1, 1, 1))
    batches = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="unknown layer name 'nope'"):
        collect_stats(model, ["nope"], batches, progress=False)
    for name, type_name in (("1", "ReLU"), ("2", "Conv3d"), ("3", "ConvTranspose2d")):
        with pytest.raises(ValueError, match=rf"'{name}' \({type_name}\).*supported: nn.Linear, nn.Conv1d, nn.Conv2d"):
            collect_stats(model, [name], batches, progress=False)
    with pytest.raises(ValueError, match="ConvTranspose2d.*supported"):
        layer_inputs_to_rows(model[3], torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="target"):
        collect_stats(model, ["0"], batches, target="parallel", progress=False)
    with pytest.raises(ValueError, match="reference_model"):
        collect_stats(model, ["0"], batches, target="reference", progress=False)

    def failing():
        yield torch.randn(2, 3)
        yield torch.randn(2, 5)

    with pytest.raises(RuntimeError):
        collect_stats(model[:2], ["0"], failing(), progress=False)
    assert not model[0]._forward_hooks


def test_layer_stats_zero_count_and_device():
    empty = LayerStats.zeros(3, 2, kind="linear")
    assert empty.sum_xx.shape == (3, 3) and empty.sum_yx.shape == (2, 3) and empty.count == 0
    with pytest.raises(ValueError, match="count == 0"):
        empty.Rxx
    s = collect_stats(nn.Linear(2, 2).float(), [""], [torch.randn(3, 2).float()], device="cpu", progress=False)[""]
    assert s.sum_xx.dtype == torch.float64 and s.sum_xx.device.type == "cpu"
