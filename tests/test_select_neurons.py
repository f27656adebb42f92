"""Tests of the `select_neurons` pass (seed 003 §2.4-2.7) and its shipped recipes."""
from __future__ import annotations

import copy

import pytest
import yaml
import torch
from torch import nn

import fxcompress
from fxcompress import FxCompressError, RecipeError
from fxcompress.data import load_source
from fxcompress.models import LeNet300, LeNet5, build_model
from fxcompress.recipe import DataSource
from fxcompress.selector import Selector, select_inputs
from fxcompress.training import accuracy, train


DIGITS_CALIBRATION = {"source": "digits", "split": "train", "batch_size": 256}


def digits(split, input_shape=(1, 64), batch_size=256, shuffle=False):
    return load_source(DataSource(source="digits", split=split, batch_size=batch_size, shuffle=shuffle), input_shape)


@pytest.fixture(scope="module")
def lenet300():
    """LeNet-300-100 on 8x8 digits (64 inputs), trained for a few epochs, and its test batches."""
    torch.manual_seed(0)
    model = LeNet300(64)
    train(model, digits("train", batch_size=64, shuffle=True), epochs=5, lr=0.1, optimizer="sgd", progress=False)
    test = digits("test")
    assert accuracy(model, test) > 0.95
    return model.eval(), test


class SmallMLP(nn.Module):
    """8 -> 32 (tanh) -> 6: smooth hidden units, so the hidden activations have a full-rank R_xx."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def select(model, options, *, input_shape=(1, 64), calibration=None, passes=(), data=None):
    """Run select_neurons (then `passes`) on a copy of `model`; returns the CompressionResult."""
    recipe = {"fxcompress": 1, "input_shape": list(input_shape),
              "data": data if data is not None else ({} if calibration is not None else
                                                     {"calibration": DIGITS_CALIBRATION}),
              "passes": [{"select_neurons": options}, *passes]}
    return fxcompress.compress(copy.deepcopy(model), recipe, calibration=calibration, progress=False)


def selectors(gm):
    return {name.removesuffix("_select"): m for name, m in gm.named_modules() if isinstance(m, Selector)}


def layer_rows(result):
    return {row["name"]: row for row in result.report.passes[0].layers}


def lstsq_fit(X, Y):
    """Least squares Y ~ [X, 1] @ [W, b]^T in float64: returns (W, b)."""
    X1 = torch.cat([X.double(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(X1, Y.double(), driver="gelsd").solution.T
    return coef[:, :-1], coef[:, -1]


def calibration_inputs():
    return torch.cat([x for x, _ in digits("train")])


def hidden(model, x):
    """LeNet-300-100's two hidden activations on x (of the original layers)."""
    h1 = torch.relu(model.fc1(x))
    return h1, torch.relu(model.fc2(h1))


# ------------------------------------------------------------------------------------ keep, lam, debias


def test_keep_ratio_and_count_give_exact_input_counts(lenet300):
    model, _ = lenet300
    half = select(model, {"keep": 0.5})
    assert {n: s.keep.numel() for n, s in selectors(half.model).items()} == {"fc2": 150, "fc3": 50}
    assert half.model.fc2.weight.shape == (100, 150) and half.model.fc3.weight.shape == (10, 50)
    rows = layer_rows(half)
    assert (rows["fc2"]["kept"], rows["fc2"]["total"], rows["fc3"]["kept"], rows["fc3"]["total"]) == (150, 300, 50, 100)
    assert all(0 <= r["rel_error"] < 0.05 and r["lam"] > 0 and r["seconds"] >= 0 for r in rows.values())
    assert "fc1" not in rows and any("skipped fc1: reads the model's input" in n for n in half.report.passes[0].notes)

    seven = select(model, {"keep": 7, "targets": ["fc2", "fc3"], "select_graph_inputs": True})
    assert {n: s.keep.numel() for n, s in selectors(seven.model).items()} == {"fc2": 7, "fc3": 7}

    floored = select(model, {"keep": 0.5, "min_keep": 120})
    assert selectors(floored.model)["fc2"].keep.numel() == 150
    assert "fc3" not in selectors(floored.model) and floored.model.fc3.weight.shape == (10, 100)


def test_graph_inputs_are_sampled_only_when_asked(lenet300):
    model, _ = lenet300
    result = select(model, {"keep": 0.25, "targets": ["fc1"], "select_graph_inputs": True})
    assert selectors(result.model)["fc1"].keep.numel() == 16
    x = calibration_inputs()[:5]
    assert result.model(x).shape == (5, 10)


def test_layers_with_more_columns_than_max_columns_are_skipped_with_a_note():
    model = SmallMLP().eval()
    calibration = [torch.randn(128, 8) for _ in range(4)]
    result = select(model, {"keep": 0.5, "targets": ["fc2"], "max_columns": 32}, input_shape=(1, 8),
                    calibration=calibration)
    notes = result.report.passes[0].notes
    assert any(n.startswith("skipped fc2: 33 input columns") and "max_columns 32" in n for n in notes)
    assert not selectors(result.model) and result.model.fc2.in_features == 32
    kept = select(model, {"keep": 0.5, "targets": ["fc2"], "max_columns": 33}, input_shape=(1, 8),
                  calibration=calibration)
    assert selectors(kept.model)["fc2"].keep.numel() == 16


def test_lam_zero_gives_back_the_weights_on_full_rank_data():
    model = SmallMLP().eval()
    calibration = [torch.randn(128, 8) for _ in range(4)]
    result = select(model, {"lam": 0.0, "targets": ["fc2"]}, input_shape=(1, 8), calibration=calibration)
    assert not selectors(result.model)
    torch.testing.assert_close(result.model.fc2.weight, model.fc2.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.model.fc2.bias, model.fc2.bias, atol=1e-5, rtol=1e-5)
    assert layer_rows(result)["fc2"]["rel_error"] < 1e-10


def test_lam_selects_fewer_inputs_as_it_grows_and_respects_min_keep():
    model = SmallMLP().eval()
    calibration = [torch.randn(128, 8) for _ in range(4)]
    kept = [layer_rows(select(model, {"lam": lam, "targets": ["fc2"]}, input_shape=(1, 8),
                              calibration=calibration))["fc2"]["kept"] for lam in (0.05, 0.3, 0.8)]
    assert kept[0] >= kept[1] >= kept[2] and kept[0] > kept[2]
    floored = select(model, {"lam": 1.0, "targets": ["fc2"], "min_keep": 3}, input_shape=(1, 8),
                     calibration=calibration)
    assert selectors(floored.model)["fc2"].keep.numel() == 3


def test_debias_equals_least_squares_on_the_support():
    model = SmallMLP().eval()
    calibration = [torch.randn(128, 8) for _ in range(4)]
    x = torch.cat(calibration)
    with torch.no_grad():
        h, y = torch.tanh(model.fc1(x)), model(x)
    results = {flag: select(model, {"keep": 10, "targets": ["fc2"], "debias": flag}, input_shape=(1, 8),
                            calibration=calibration) for flag in (True, False)}
    keep = selectors(results[True].model)["fc2"].keep
    W, b = lstsq_fit(h[:, keep], y)
    torch.testing.assert_close(results[True].model.fc2.weight.double(), W, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[True].model.fc2.bias.double(), b, atol=1e-5, rtol=1e-4)
    errors = {flag: layer_rows(r)["fc2"]["rel_error"] for flag, r in results.items()}
    assert errors[True] < errors[False]


# ------------------------------------------------------------------------------------ chaining


@pytest.fixture(scope="module")
def chained(lenet300):
    model, _ = lenet300
    return {mode: select(model, {"keep": 0.3, "chaining": mode}).model for mode in ("parallel", "top_down", "bottom_up")}


def test_parallel_fits_each_layer_on_the_original_network(lenet300, chained):
    model, _ = lenet300
    gm = chained["parallel"]
    with torch.no_grad():
        h1, h2 = hidden(model, calibration_inputs())
        W, b = lstsq_fit(h2[:, selectors(gm)["fc3"].keep], model.fc3(h2))
    torch.testing.assert_close(gm.fc3.weight.double(), W, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gm.fc3.bias.double(), b, atol=1e-4, rtol=1e-3)
    assert bool((gm.fc2.weight.abs().sum(1) > 0).all())


def test_top_down_takes_x_from_the_compressed_network_and_y_from_the_original(lenet300, chained):
    model, _ = lenet300
    gm = chained["top_down"]
    with torch.no_grad():
        h1, h2 = hidden(model, calibration_inputs())
        compressed_h2 = torch.relu(gm.fc2(gm.fc2_select(h1)))
        W, b = lstsq_fit(compressed_h2[:, selectors(gm)["fc3"].keep], model.fc3(h2))
    torch.testing.assert_close(gm.fc3.weight.double(), W, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gm.fc3.bias.double(), b, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(gm.fc3.weight, chained["parallel"].fc3.weight, atol=1e-3)


def test_bottom_up_reconstructs_only_the_outputs_read_downstream(lenet300, chained):
    model, _ = lenet300
    gm = chained["bottom_up"]
    read = selectors(gm)["fc3"].keep
    dropped = torch.ones(100, dtype=torch.bool)
    dropped[read] = False
    assert bool((gm.fc2.weight[dropped] == 0).all()) and bool((gm.fc2.bias[dropped] == 0).all())
    with torch.no_grad():
        h1, _ = hidden(model, calibration_inputs())
        W, b = lstsq_fit(h1[:, selectors(gm)["fc2"].keep], model.fc2(h1)[:, read])
    torch.testing.assert_close(gm.fc2.weight[read].double(), W, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gm.fc2.bias[read].double(), b, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gm.fc3.weight, chained["parallel"].fc3.weight)


# ------------------------------------------------------------------------------------ bad configurations

RECIPE = """fxcompress: 1
model: lenet300
input_shape: [1, 64]
data:
  calibration: {source: digits, split: train}
passes:
  - select_neurons: %s
"""


@pytest.mark.parametrize("options,field,message", [
    ("{keep: 0.5, lam: 0.1}", "select_neurons", r"exactly one of `keep`.*and\s+`lam`.*got both"),
    ("{chaining: top_down}", "select_neurons", r"exactly one of `keep`.*and\s+`lam`.*got neither"),
    ("{keep: 1.5}", "select_neurons.keep", r"keep: a ratio must lie in \(0, 1\]"),
    ("{keep: 0}", "select_neurons.keep", r"keep: a count of inputs must be >= 1"),
    ("{keep: 200}", "select_neurons", r"keep: 200 is more than the 100 inputs of layer 'fc3'"),
    ("{lam: 2}", "select_neurons.lam", r"less than or equal to 1"),
    ("{keep: 0.5, chaining: sideways}", "select_neurons.chaining", r"'parallel', 'top_down' or 'bottom_up'"),
    ("{keep: 0.5, solver: adam}", "select_neurons.solver", r"'newton'"),
    ("{keep: 0.5, residual: static}", "select_neurons.residual", r"'joint' or 'dynamic'"),
    ("{keep: 0.5, min_keep: 0}", "select_neurons.min_keep", r"greater than or equal to 1"),
    ("{keep: 0.5, keeep: 3}", "select_neurons.keeep", r"unknown field 'keeep'"),
])
def test_bad_configurations_fail_before_any_work_naming_the_field(tmp_path, options, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE % options)
    with pytest.raises(RecipeError, match=message) as info:
        fxcompress.compress(LeNet300(64), str(path), progress=False)
    assert info.value.field.startswith(f"passes[0].{field}") and info.value.line == 7


def test_keep_count_larger_than_the_channels_of_a_flattened_map_names_the_layer():
    with pytest.raises(FxCompressError, match=r"keep: 100 is more than the 50 input channels of layer\(s\) fc1"):
        select(LeNet5(1, 8).eval(), {"keep": 100, "targets": ["fc1"]}, input_shape=(1, 1, 8, 8))


# ------------------------------------------------------------------------------------ accuracy


def magnitude_pruned(model, keep):
    """Remove the same hidden neurons' worth by weight magnitude, without reconstruction: each consumer
    keeps the inputs whose weight columns have the largest L2 norm, weights unchanged."""
    gm = fxcompress.trace(copy.deepcopy(model))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, count in keep.items():
        norms = gm.get_submodule(name).weight.detach().norm(dim=0)
        select_inputs(gm, nodes[name], torch.topk(norms, count).indices.sort().values)
    gm.recompile()
    return gm


def test_half_the_hidden_neurons_go_with_at_most_one_point_lost_and_beat_magnitude_pruning(lenet300):
    model, test = lenet300
    before = accuracy(model, test)
    reconstructed = accuracy(select(model, {"keep": 0.5}).model, test)
    magnitude = accuracy(magnitude_pruned(model, {"fc2": 150, "fc3": 50}), test)
    assert reconstructed >= before - 0.01
    assert reconstructed > magnitude


# ------------------------------------------------------------------------------------ recipes, residual streams


def shipped(name, **header):
    """A shipped recipe as a dict, with header fields (input_shape, model_options, ...) overridden."""
    recipe = yaml.safe_load(fxcompress.load_recipe(name).text)
    recipe.update(header)
    return recipe


def run_recipe(model, recipe, tmp_path, upto=None):
    if upto is not None:
        recipe = {**recipe, "passes": recipe["passes"][:upto]}
    return fxcompress.compress(copy.deepcopy(model), recipe, progress=False, output_dir=tmp_path)


def onnx_note(result):
    return next(n for p in result.report.passes if p.name == "export_onnx" for n in p.notes)


def assert_collapsed_and_exported(result, annotated_params=None):
    passes = {p.name: p for p in result.report.passes}
    assert passes["collapse"].params_after < passes["collapse"].params_before
    assert passes["collapse"].max_deviation <= 1e-4
    assert "onnxruntime max |error|" in onnx_note(result)


def test_lenet300_recipe_shrinks_the_hidden_layers_and_exports(lenet300, tmp_path):
    model, test = lenet300
    result = run_recipe(model, shipped("lenet300_select"), tmp_path)
    gm = result.model
    assert (gm.fc1.out_features, gm.fc2.in_features, gm.fc2.out_features, gm.fc3.in_features) == (150, 150, 50, 50)
    assert not any(isinstance(m, Selector) for m in gm.modules())
    assert result.report.metrics["accuracy_after"] >= result.report.metrics["accuracy_before"] - 0.01
    assert_collapsed_and_exported(result)


def test_lenet5_recipe_selects_whole_channels_and_exports(tmp_path):
    result = run_recipe(LeNet5(1, 16).eval(), shipped("lenet5_select"), tmp_path)
    gm = result.model
    assert (gm.conv1.out_channels, gm.conv2.in_channels, gm.conv2.out_channels) == (10, 10, 25)
    assert (gm.fc1.in_features, gm.fc1.out_features, gm.fc2.in_features) == (25 * 4 * 4, 250, 250)
    assert_collapsed_and_exported(result)


def test_mobilenet_recipe_runs_on_a_narrow_instance_and_exports(tmp_path):
    options = {"width_mult": 0.25, "num_classes": 10}
    recipe = shipped("mobilenet_select", input_shape=[1, 3, 32, 32], model_options=options,
                     data={"calibration": {"source": "synthetic", "samples": 64, "batch_size": 32}})
    result = run_recipe(build_model("torchvision:mobilenet_v2", **options).eval(), recipe, tmp_path)
    assert result.model.get_submodule("classifier.1").in_features == 640
    assert_collapsed_and_exported(result)


STREAM_READERS = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]


def resnet_recipe(residual):
    recipe = shipped("resnet_select", input_shape=[1, 3, 32, 32],
                     data={"calibration": {"source": "synthetic", "samples": 64, "batch_size": 32}})
    recipe["passes"][1]["select_neurons"].update(targets=["layer1.*", *STREAM_READERS[2:]], residual=residual)
    return recipe


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("torchvision:resnet18").eval()


def test_joint_residual_selection_shrinks_the_resnet_stream_statically(resnet18, tmp_path):
    recipe = resnet_recipe("joint")
    annotated = run_recipe(resnet18, recipe, tmp_path, upto=2).model
    keeps = [selectors(annotated)[name.replace(".", "_")].keep for name in STREAM_READERS]
    assert all(torch.equal(k, keeps[0]) for k in keeps) and keeps[0].numel() < 64
    result = run_recipe(resnet18, recipe, tmp_path)
    gm = result.model
    stream = keeps[0].numel()
    producers = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert [gm.get_submodule(name).out_channels for name in producers] == [stream] * 3
    assert [gm.get_submodule(name).in_channels for name in STREAM_READERS] == [stream] * 4
    assert not any(isinstance(m, Selector) for m in gm.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), annotated(x), atol=1e-4, rtol=1e-4)
    assert_collapsed_and_exported(result)


def test_dynamic_residual_selection_selects_each_stream_reader_on_its_own(resnet18, tmp_path):
    annotated = run_recipe(resnet18, resnet_recipe("dynamic"), tmp_path, upto=2)
    keeps = [selectors(annotated.model)[name.replace(".", "_")].keep for name in STREAM_READERS]
    assert any(not torch.equal(k, keeps[0]) for k in keeps[1:])
    assert all(not row["joint_with"] for row in annotated.report.passes[1].layers)


class _ReadersOfOneStream(nn.Module):
    """Four layers read the stem's channels: a conv directly, a Linear after a permute to channels-last,
    one after a depthwise conv, and a Linear after a LayerNorm (which mixes the channels it normalises)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.after_depthwise = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(8)
        self.fc_norm = nn.Linear(8, 6)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        t = x.permute(0, 2, 3, 1)
        return (self.conv(x).mean() + self.after_depthwise(self.depthwise(x)).mean() + self.fc(t).mean()
                + self.fc_norm(self.norm(t)).mean())


def test_joint_groups_follow_the_channel_analysis():
    from fxcompress.graph.channels import channel_groups
    from fxcompress.graph.shapes import propagate_shapes
    from fxcompress.passes.select_neurons import plan_groups
    gm = fxcompress.trace(_ReadersOfOneStream())
    inputs = (torch.randn(2, 3, 6, 6),)
    shapes, analysis = propagate_shapes(gm, inputs), channel_groups(gm, inputs)
    targets = ["conv", "after_depthwise", "fc", "fc_norm"]
    joint, _ = plan_groups(gm, targets, shapes, analysis, joint=True, graph_inputs=False)
    assert [g.names for g in joint] == [["conv", "after_depthwise", "fc"], ["fc_norm"]]
    assert all(g.channels == 8 for g in joint)
    alone, _ = plan_groups(gm, targets, shapes, analysis, joint=False, graph_inputs=False)
    assert [g.names for g in alone] == [[name] for name in ["conv", "after_depthwise", "fc", "fc_norm"]]
    skipped_stem, why = plan_groups(gm, ["stem", "conv"], shapes, analysis, joint=True, graph_inputs=False)
    assert [g.names for g in skipped_stem] == [["conv"]] and "model's input" in why["stem"]


def test_expansion_targets_are_solved_on_their_row_basis_without_changing_the_solution():
    # A consumer with more outputs than input columns (an inverted residual's expansion conv) enters the joint
    # problem as Q^T B (d rows instead of h): the same support and lam, and Q M~ is the full problem's M.
    from fxcompress.passes.select_neurons import _row_basis
    from fxcompress.solvers.group_lasso import search_lambda
    g = torch.Generator().manual_seed(4)
    X = torch.cat([torch.randn(200, 12, generator=g, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    W = torch.randn(40, 13, generator=g, dtype=torch.float64)
    R = X.T @ X / 200
    groups = torch.cat([torch.arange(12), torch.tensor([-1])])

    class Block:
        Rxx, Ryx, scale = R, W @ R, 0.5

    Q, T = _row_basis(Block)
    assert Q.shape == (40, 13) and T.shape == (13, 13)
    full = search_lambda(R, 0.5 * W @ R, 5, groups)
    reduced = search_lambda(R, T, 5, groups)
    assert torch.equal(full.support, reduced.support)
    assert abs(full.lam - reduced.lam) <= 1e-9 * full.lam
    torch.testing.assert_close(Q @ reduced.M, full.M, atol=1e-8, rtol=1e-6)
    wide = type("Wide", (), {"Ryx": torch.randn(5, 13, dtype=torch.float64), "scale": 1.0})
    assert _row_basis(wide)[0] is None
