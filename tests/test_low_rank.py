"""Tests of the `low_rank` pass, its rank rules, the data-aware method, the `spectrum` analysis and
the two low-rank recipes (seed 001; data-aware variant after seed 003 section 2.1)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import PassContext, RecipeError
from fxcompress.cli import main
from fxcompress.data import load_source
from fxcompress.export import check_parity, export_onnx
from fxcompress.graph.spectrum import ENERGY_LEVELS, layer_spectra, spectrum_stats
from fxcompress.models import LeNet5, LeNet300
from fxcompress.lc.csteps import make_cstep
from fxcompress.passes.low_rank import Factors, LowRankConfig, factorize, factors_to_module, low_rank
from fxcompress.recipe import DataSource
from fxcompress.stats import collect_stats
from fxcompress.training import accuracy, train


def with_spectrum(m, n, singular_values, seed=0):
    """An m x n float64 matrix U diag(s) V^T with random orthonormal U, V and the given spectrum."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


class OneLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0]).double()
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x)


class SmallCNN(nn.Module):
    """Conv2d with stride 2, padding and dilation 2, a grouped Conv2d, a Conv1d and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2, padding_mode="reflect")
        self.conv1d = nn.Conv1d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 64, 10)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        x = torch.relu(self.conv1d(x.flatten(2)))
        return self.fc(x.flatten(1))


def compress(model, options, example, **kw):
    recipe = {"fxcompress": 1, "passes": [{"low_rank": options}]}
    return fxcompress.compress(model, recipe, example_inputs=(example,), progress=False, **kw)


def rows(result):
    return {row["name"]: row for row in result.report.passes[0].layers}


# ----------------------------------------------------------------------------- full rank is exact


LAYERS = {
    "linear": (lambda: nn.Linear(20, 30), (7, 20)),
    "conv2d_stride2_pad_dil2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 13, 13)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=1), (3, 4, 17)),
    "grouped_conv2d_reflect": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3, padding_mode="reflect"),
                               (2, 6, 7, 7)),
}


@pytest.mark.parametrize("method", ["svd", "randomized", "activation"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_full_rank_factorisation_reproduces_the_layer_in_float64(kind, method):
    build, shape = LAYERS[kind]
    layer = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    rank = min(layer.weight.shape[0] // getattr(layer, "groups", 1), layer.weight[0].numel())
    stats = collect_stats(nn.Sequential(layer), ["0"], [x], progress=False)["0"] if method == "activation" else None
    factors = factorize(layer, rank, method=method, stats=stats)
    assert isinstance(factors, nn.Sequential) and list(dict(factors.named_children())) == ["project", "expand"]
    if isinstance(layer, nn.modules.conv._ConvNd):
        project, expand = factors.project, factors.expand
        assert (project.stride, project.padding, project.dilation) == (layer.stride, layer.padding, layer.dilation)
        assert expand.kernel_size == (1,) * len(layer.kernel_size) and expand.stride == (1,) * len(layer.stride)
        assert project.padding_mode == layer.padding_mode and project.groups == expand.groups == layer.groups
    assert torch.allclose(factors(x), layer(x), rtol=0, atol=1e-10)


def test_pass_rewrites_the_graph_into_two_nodes_per_layer_and_counts_their_macs():
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    result = compress(copy.deepcopy(model), {"rank": {"ratio": 0.99}, "exclude": ["fc"]}, x)
    gm = result.model
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv.project", "conv.expand", "grouped.project", "grouped.expand", "conv1d.project",
                       "conv1d.expand", "fc"]
    record = result.report.passes[0]
    assert record.macs_after < record.macs_before
    macs = {c.name: c.macs for c in fxcompress.PassContext(example_inputs=(x,)).analysis("cost", gm)}
    assert macs["conv.project"] == 8 * 8 * 27 * gm.conv.project.out_channels


def test_factors_of_the_lc_low_rank_c_step_deploy_as_a_two_layer_module():
    layer = nn.Linear(12, 9).double()
    [(u, v)] = make_cstep("low_rank", rank=3).compress([layer.weight.detach()], mu=1.0)["factors"]
    module = factors_to_module(layer, Factors([u], [v.T], layer.bias.detach()))
    x = torch.randn(4, 12, dtype=torch.float64)
    assert module.project.out_features == 3
    assert torch.allclose(module(x), x @ (u @ v.T).T + layer.bias, atol=1e-12)


# ----------------------------------------------------------------------------- rank rules


def test_energy_rule_picks_the_smallest_rank_reaching_the_fraction():
    s = [10.0 * 0.8 ** i for i in range(40)]
    weight = with_spectrum(40, 60, s)
    power = np.square(s)
    x = torch.randn(4, 60, dtype=torch.float64)
    for energy in (0.5, 0.9, 0.95, 0.99, 0.999):
        brute = next(r for r in range(1, 41) if power[:r].sum() >= energy * power.sum())
        result = compress(OneLinear(weight), {"rank": {"energy": energy}}, x)
        row = rows(result)["fc"]
        assert row["rank"] == brute, energy
        assert row["weight_error"] ** 2 == pytest.approx(power[brute:].sum() / power.sum(), rel=1e-6)


def test_ratio_rule_keeps_at_most_the_fraction_of_the_weights():
    model = LeNet300(64).double()
    result = compress(model, {"rank": {"ratio": 0.3}, "targets": ["fc1", "fc2"]}, torch.randn(2, 64).double())
    for name, (m, n) in {"fc1": (300, 64), "fc2": (100, 300)}.items():
        r = rows(result)[name]["rank"]
        assert r * (m + n) <= 0.3 * m * n < (r + 1) * (m + n)
        assert rows(result)[name]["params_after"] == r * (m + n) + m


def test_tolerance_rule_meets_the_relative_spectral_norm_tolerance():
    s = [1.5 ** -i for i in range(50)]
    weight = with_spectrum(50, 80, s)
    for tolerance in (1e-1, 1e-2, 1e-3):
        result = compress(OneLinear(weight), {"rank": {"tolerance": tolerance}}, torch.randn(2, 80).double())
        gm = result.model
        approx = gm.fc.expand.weight @ gm.fc.project.weight
        error = torch.linalg.matrix_norm(weight - approx, ord=2) / torch.linalg.matrix_norm(weight, ord=2)
        optimal = next(r for r in range(1, 51) if s[r] <= tolerance * s[0])
        assert error <= tolerance
        assert optimal <= rows(result)["fc"]["rank"] <= optimal + 10


def test_break_even_guard_keeps_a_layer_dense_and_says_so():
    model = LeNet300(64).double()
    result = compress(model, {"rank": 10, "targets": ["fc2", "fc3"]}, torch.randn(2, 64).double())
    fc2, fc3 = rows(result)["fc2"], rows(result)["fc3"]
    assert fc2["status"] == "factorised" and fc2["params_after"] < fc2["params_before"]
    assert fc3["status"].startswith("skipped") and "10 x (10 + 100) >= 10 x 100" in fc3["status"]
    assert fc3["params_after"] == fc3["params_before"]
    assert isinstance(result.model.fc3, nn.Linear)
    assert any("fc3: kept dense" in note for note in result.report.passes[0].notes)


# ----------------------------------------------------------------------------- data-aware


def correlated_inputs(n, d, generator, rank=6):
    """Inputs on a few strong directions plus weak noise, with a non-zero mean."""
    mixing = torch.randn(rank, d, generator=generator, dtype=torch.float64)
    mean = torch.randn(d, generator=generator, dtype=torch.float64)
    latent = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    return latent @ mixing + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64) + mean


def test_data_aware_low_rank_has_lower_output_error_than_plain_svd():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 40).double()
    calibration = correlated_inputs(2000, 48, g)
    held_out = calibration[1500:]
    stats = collect_stats(nn.Sequential(layer), ["0"], [calibration[:1500]], progress=False)["0"]
    with torch.no_grad():
        reference = layer(held_out)
        for rank in (2, 4, 8):
            plain = factorize(layer, rank, method="svd")
            aware = factorize(layer, rank, method="activation", stats=stats)
            error_plain = float((plain(held_out) - reference).square().mean())
            error_aware = float((aware(held_out) - reference).square().mean())
            assert error_aware < 0.5 * error_plain, rank


def test_activation_method_reports_output_error_and_reads_calibration():
    g = torch.Generator().manual_seed(1)
    model = OneLinear(torch.randn(30, 40, generator=g, dtype=torch.float64))
    data = correlated_inputs(600, 40, g)
    result = compress(model, {"rank": 6, "method": "activation"}, data[:2],
                      calibration=[data[i:i + 200] for i in range(0, 600, 200)])
    row = rows(result)["fc"]
    with torch.no_grad():
        direct = float((result.model(data) - model(data)).square().sum() / model(data).square().sum())
    assert row["output_error"] == pytest.approx(direct, rel=1e-6)
    assert row["output_error"] < 1e-2 < row["weight_error"]
    with pytest.raises(fxcompress.FxCompressError, match="needs calibration data"):
        compress(model, {"rank": 6, "method": "activation"}, data[:2])


# ----------------------------------------------------------------------------- errors


RECIPE = """fxcompress: 1
model: lenet300
input_shape: [1, 64]
passes:
  - low_rank:
      targets: [fc1, fc2, fc3]
      %s
"""


@pytest.mark.parametrize("option,field,message", [
    ("rank: {energy: 1.5}", "rank.energy", "less than or equal to 1"),
    ("rank: {enrgy: 0.9}", "rank.enrgy", "unknown field 'enrgy'"),
    ("rank: {energy: 0.9, ratio: 0.2}", "rank", "exactly one rank rule"),
    ("rank: {from: elsewhere}", "rank.from", "'sensitivity'"),
    ("rank: fast", "rank", "rank is an integer or one of"),
    ("rank: 0", "rank.fixed", "greater than or equal to 1"),
    ("rank: 8\n      method: qr", "method", "'svd', 'randomized' or 'activation'"),
    ("rank: 8\n      power_iters: -1", "power_iters", "greater than or equal to 0"),
    ("rank: 8\n      damping: -1", "damping", "greater than or equal to 0"),
    ("rank: 8\n      oversampling: 5", "oversampling", "unknown field"),
])
def test_bad_config_names_the_field_and_line(tmp_path, option, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE % option)
    with pytest.raises(RecipeError, match=message) as info:
        fxcompress.load_recipe(str(path))
    assert info.value.field == f"passes[0].low_rank.{field}"
    assert info.value.line is not None and info.value.line >= 5


def test_rank_larger_than_a_layer_fails_before_any_work_naming_it(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(RECIPE % "rank: 20")
    model = LeNet300(64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=r"rank 20 is larger than layer 'fc3' allows: its weight is 10x100") as info:
        fxcompress.compress(model, str(path), progress=False)
    assert info.value.line == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_factorize_rejects_bad_rank_and_activation_without_stats():
    layer = nn.Conv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match=r"3x18 weight matrix \(per group of 2\).*rank <= 3"):
        factorize(layer, 4)
    with pytest.raises(ValueError, match="needs the layer's statistics"):
        factorize(layer, 2, method="activation")


def test_rank_from_sensitivity_reads_the_state_or_says_to_run_it():
    model = LeNet300(64).double()
    x = torch.randn(2, 64, dtype=torch.float64)
    with pytest.raises(RecipeError, match="add `- sensitivity` before it") as info:
        compress(model, {"rank": {"from": "sensitivity"}}, x)
    assert info.value.field == "passes[0].low_rank"
    gm = fxcompress.trace(copy.deepcopy(model))
    ctx = PassContext(example_inputs=(x,), progress=False)
    with pytest.raises(RecipeError, match="run the sensitivity pass first") as info:
        low_rank(gm, ctx, LowRankConfig.model_validate({"rank": {"from": "sensitivity"}}))
    assert info.value.field == "rank.from"
    ctx.state["sensitivity"] = {"ranks": {"fc1": 5, "fc2": 7}}
    gm = low_rank(gm, ctx, LowRankConfig.model_validate({"rank": {"from": "sensitivity"}}))
    assert gm.fc1.project.out_features == 5 and gm.fc2.project.out_features == 7
    assert isinstance(gm.fc3, nn.Linear)
    assert ctx.state["low_rank"]["ranks"] == {"fc1": 5, "fc2": 7}
    ctx.state["sensitivity"] = {"ranks": {"fc3": 11}}
    with pytest.raises(RecipeError, match="rank 11 for layer 'fc3'.*allows 1..10"):
        low_rank(fxcompress.trace(copy.deepcopy(model)), ctx, LowRankConfig(rank={"from": "sensitivity"}))


# ----------------------------------------------------------------------------- ONNX


def test_rewritten_graph_exports_to_onnx_with_onnxruntime_parity(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    result = compress(copy.deepcopy(model), {"rank": {"ratio": 0.5}, "method": "randomized"}, x)
    assert {row["status"] for row in result.report.passes[0].layers} == {"factorised"}
    exported = export_onnx(result.model, (x,), tmp_path / "low_rank.onnx")
    assert check_parity(exported.path, result.model, (torch.randn(5, 3, 16, 16),)) < 1e-4


# ----------------------------------------------------------------------------- spectrum


def test_spectrum_numbers_on_known_singular_values():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    layer = nn.Linear(9, 6)
    with torch.no_grad():
        layer.weight.copy_(with_spectrum(6, 9, s))
    [spectrum] = layer_spectra(nn.Sequential(layer))
    power = np.square(s)
    assert spectrum.shape == (6, 9) and spectrum.singular_values == pytest.approx(s, rel=1e-5)
    assert spectrum.cumulative_energy == pytest.approx(np.cumsum(power) / power.sum(), rel=1e-5)
    for level in ENERGY_LEVELS:
        brute = 1 + int(np.argmax(np.cumsum(power) >= level * power.sum()))
        assert spectrum.energy_ranks[f"{level:g}"] == brute
    assert spectrum.condition_number == pytest.approx(32.0, rel=1e-5)
    p = np.array(s) / sum(s)
    assert spectrum.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert spectrum_stats([3.0, 3.0, 3.0, 3.0])["effective_rank"] == pytest.approx(4.0)
    flat = spectrum_stats([5.0, 0.0, 0.0])
    assert flat["effective_rank"] == pytest.approx(1.0) and flat["condition_number"] == math.inf


def test_spectrum_analysis_of_a_grouped_conv_is_the_union_of_its_blocks():
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, 0], [0, 0], [0, 0], [0, 0.5], [0, 0], [2.0, 0]]).reshape(6, 2, 1, 1))
    gm = fxcompress.trace(nn.Sequential(conv))
    [spectrum] = PassContext(example_inputs=(torch.randn(1, 4, 3, 3),)).analysis("spectrum", gm)
    assert spectrum.groups == 2 and spectrum.shape == (6, 2)
    assert spectrum.singular_values == pytest.approx([3.0, 2.0, 0.5, 0.0], abs=1e-6)


def test_inspect_spectrum_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "spectra" / "lenet300.json"
    assert main(["inspect", "--model", "lenet300", "--input-shape", "1", "64", "--spectrum", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [layer["name"] for layer in data["layers"]] == ["fc1", "fc2", "fc3"]
    fc1 = data["layers"][0]
    assert fc1["shape"] == [300, 64] and len(fc1["singular_values"]) == 64
    assert set(fc1["energy_ranks"]) == {"0.7", "0.8", "0.9", "0.95", "0.99"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "r@90%" in capsys.readouterr().out


# ----------------------------------------------------------------------------- recipes


def digits(shape, split, batch_size=64, shuffle=False):
    return load_source(DataSource(source="digits", split=split, batch_size=batch_size, shuffle=shuffle), shape)


def test_mlp_lowrank_recipe_keeps_accuracy_with_a_quarter_of_the_hidden_weights(tmp_path):
    torch.manual_seed(0)
    model = LeNet300(64)
    train(model, digits([1, 64], "train", shuffle=True), epochs=15, lr=0.1, optimizer="sgd", progress=False)
    result = fxcompress.compress(copy.deepcopy(model), "mlp_lowrank", progress=False, output_dir=tmp_path)
    layers = rows(result)
    assert {layers["fc1"]["rank"], layers["fc2"]["rank"]} == {13, 18}
    assert layers["fc1"]["params_after"] < 0.27 * layers["fc1"]["params_before"]
    assert result.report.metrics["accuracy_before"] > 0.95
    assert result.report.metrics["accuracy_after"] >= result.report.metrics["accuracy_before"] - 0.01
    assert (tmp_path / "model.onnx").is_file()


def test_cnn_lowrank_energy_recipe_runs_end_to_end_and_exports(tmp_path):
    torch.manual_seed(0)
    model = LeNet5(1, 16)
    train(model, digits([1, 1, 16, 16], "train", shuffle=True), epochs=3, lr=0.05, optimizer="sgd",
          progress=False)
    test = digits([1, 1, 16, 16], "test", batch_size=256)
    result = fxcompress.compress(copy.deepcopy(model), "cnn_lowrank_energy", progress=False, output_dir=tmp_path)
    layers = rows(result)
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2"]
    for name, spectrum in zip(layers, layer_spectra(model)):
        assert layers[name]["rank"] == spectrum.energy_ranks["0.9"]
    record = result.report.passes[0]
    assert record.params_after < record.params_before and record.macs_after < record.macs_before
    assert result.report.metrics["accuracy_after"] >= result.report.metrics["accuracy_before"] - 0.05
    assert accuracy(result.model, test) == pytest.approx(result.report.metrics["accuracy_after"], abs=1e-4)
    assert (tmp_path / "model.onnx").is_file()


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (64, 64)])
def test_energy_rank_from_the_gram_spectrum_matches_svdvals(shape):
    from fxcompress.passes.low_rank import _singular_values
    from fxcompress.solvers.randomized_svd import rank_for_energy
    g = torch.Generator().manual_seed(1)
    m, n = shape
    decay = torch.logspace(0, -3, min(m, n), dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))[0]
    x = ((U * decay) @ V.T).float()
    reference = torch.linalg.svdvals(x.double())
    torch.testing.assert_close(_singular_values(x).sort(descending=True).values, reference, atol=1e-6, rtol=0)
    for energy in (0.5, 0.9, 0.99):
        assert rank_for_energy(_singular_values(x), energy) == rank_for_energy(reference, energy)
