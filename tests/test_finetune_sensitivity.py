"""Tests of the `finetune` and `sensitivity` passes and the adaptive low-rank recipe (seed 001 Part II)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import FxCompressError, RecipeError
from fxcompress.data import load_source
from fxcompress.models import LeNet300
from fxcompress.passes.sensitivity import Budget, Level, choose_levels
from fxcompress.recipe import DataSource
from fxcompress.training import accuracy

HEADER = """fxcompress: 1
model: lenet300
input_shape: [1, 64]
data:
%s
passes:
"""
TRAIN = "  train: {source: digits, split: train, batch_size: 64, shuffle: true}"
EVAL = "  eval: {source: digits, split: test, batch_size: 256}"
BOTH = TRAIN + "\n" + EVAL
USER_LOSS_CALLS: list[int] = []



def predict_class_zero(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A user loss (`package.module:function`) that ignores the labels: it trains towards class 0."""
    USER_LOSS_CALLS.append(len(target))
    return F.cross_entropy(outputs, torch.zeros_like(target))


def recipe(passes: str, data: str = BOTH) -> str:
    return HEADER % data + passes


def compress(model, text, **kw):
    return fxcompress.compress(copy.deepcopy(model), text, progress=False, **kw)


def metrics_of(result, name):
    return next(p for p in result.report.passes if p.name == name).metrics


# ----------------------------------------------------------------------------- finetune

FINETUNE = "  - finetune: {epochs: 4, lr: 0.003, schedule: cosine}\n"


def test_finetune_trains_a_fresh_model_and_is_deterministic_given_the_seed():
    torch.manual_seed(1)
    fresh = LeNet300(64)
    first, second = compress(fresh, recipe(FINETUNE)), compress(fresh, recipe(FINETUNE))
    metrics = metrics_of(first, "finetune")
    assert metrics["accuracy_before"] < 0.3 and metrics["accuracy_after"] > 0.9
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert first.report.metrics["accuracy_after"] == pytest.approx(metrics["accuracy_after"], abs=1e-4)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    other_seed = compress(fresh, recipe(FINETUNE), seed=7)
    assert not torch.equal(other_seed.model.fc1.weight, first.model.fc1.weight)


def test_finetune_recovers_a_perturbed_trained_model(trained):
    model, test = trained
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std())
    result = compress(noisy, recipe("  - finetune: {steps: 60, optimizer: sgd, lr: 0.05}\n"))
    metrics = metrics_of(result, "finetune")
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.05
    assert metrics["accuracy_after"] == pytest.approx(accuracy(result.model, test), abs=1e-4)
    assert any("60 step(s) of sgd" in note for note in result.report.passes[0].notes)


def test_finetune_trains_with_the_users_loss_and_reports_the_loss_without_eval_data(trained):
    model, _ = trained
    USER_LOSS_CALLS.clear()
    text = recipe("  - finetune: {steps: 40, lr: 0.01, loss: test_finetune_sensitivity:predict_class_zero}\n",
                  data=TRAIN)
    result = compress(model, text)
    assert len(USER_LOSS_CALLS) >= 40
    metrics = metrics_of(result, "finetune")
    assert "accuracy_before" not in metrics and metrics["loss_after"] < metrics["loss_before"]
    inputs = torch.cat([x for x, _ in load_source(DataSource(source="digits", split="test"))])
    assert (result.model(inputs).argmax(-1) == 0).float().mean() > 0.9


def test_finetune_without_train_data_fails_before_any_work():
    with pytest.raises(RecipeError, match=r"needs train data: add `data: \{train: \{source") as info:
        fxcompress.compress(LeNet300(64), recipe(FINETUNE, data=EVAL), progress=False)
    assert info.value.line == 7


# ----------------------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("entry,field,message", [
    ("finetune: {optimizer: rmsprop}", "finetune.optimizer", "'sgd', 'adam' or 'adamw'"),
    ("finetune: {lr: -1}", "finetune.lr", "greater than 0"),
    ("finetune: {epochs: 2, steps: 5}", "finetune", "`epochs` or `steps`, not both"),
    ("finetune: {schedule: step}", "finetune.schedule", "'none' or 'cosine'"),
    ("finetune: {loss: cross_entropy}", "finetune.loss", "package.module:function"),
    ("finetune: {loss: 'fxcompress.nowhere:loss'}", "finetune", "loss: cannot import 'fxcompress.nowhere:loss'"),
    ("finetune: {epoch: 3}", "finetune.epoch", "unknown field 'epoch'"),
    ("sensitivity: {energies: [0.5, 1.5]}", "sensitivity.energies", r"energies must lie in \(0, 1\]"),
    ("sensitivity: {budget: {params: 0.5, max_drop: 0.01}}", "sensitivity.budget", "exactly one of max_drop"),
    ("sensitivity: {budget: {param: 0.5}}", "sensitivity.budget.param", "unknown field 'param'"),
    ("sensitivity: {budget: {macs: 1.5}}", "sensitivity.budget.macs", "less than or equal to 1"),
    ("sensitivity: {method: qr}", "sensitivity.method", "'svd' or 'randomized'"),
    ("sensitivity: {finetune_steps: -2}", "sensitivity.finetune_steps", "greater than or equal to 0"),
])
def test_bad_fields_fail_before_any_work_naming_the_field_and_line(entry, field, message):
    with pytest.raises(RecipeError, match=message) as info:
        fxcompress.compress(LeNet300(64), recipe(f"  - {entry}\n"), progress=False)
    assert info.value.field == f"passes[0].{field}"
    assert info.value.line == 8


# ----------------------------------------------------------------------------- sensitivity

def sensitivity(model, options: str = "", data: str = BOTH):
    return compress(model, recipe(f"  - sensitivity: {{{options}}}\n", data=data))


def curves_of(result) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for row in result.report.passes[0].layers:
        curves.setdefault(row["layer"], []).append(row)
    return curves


@pytest.mark.parametrize("options", ["", "finetune_steps: 3, energies: [0.5, 0.9]"])
def test_sensitivity_leaves_the_model_unchanged(trained, options):
    model, test = trained
    before = copy.deepcopy(model.state_dict())
    result = sensitivity(model, options)
    inputs = test[0][0]
    assert torch.equal(result.model(inputs), model(inputs))
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert result.report.passes[0].max_deviation == 0


def test_sensitivity_curve_reports_each_layer_and_energy(trained):
    model, _ = trained
    result = sensitivity(model, "energies: [0.3, 0.8, 1.0]")
    curves = curves_of(result)
    assert list(curves) == ["fc1", "fc2", "fc3"]
    for name, rows in curves.items():
        assert [r["energy"] for r in rows] == [0.3, 0.8, 1.0]
        ranks = [r["rank"] for r in rows]
        assert ranks == sorted(ranks) and ranks[-1] == min(getattr(model, name).weight.shape)
        assert rows[-1]["drop"] == pytest.approx(0, abs=1e-9)
        assert rows[-1]["params_saved"] < 0 and not rows[-1]["chosen"]
    assert curves["fc3"][0]["drop"] > 0.05
    table = result.report.metrics["sensitivity curves (pass 0)"]
    assert len(table) == 9 and list(table[0]) == ["layer", "energy", "rank", "params_saved", "macs_saved",
                                                  "accuracy", "drop", "chosen"]
    assert "sensitivity curves (pass 0):" in result.report.summary()


def test_sensitivity_without_labels_measures_the_output_error(trained):
    model, _ = trained
    unlabelled = "  eval: {source: synthetic, samples: 128}"
    result = sensitivity(model, "energies: [0.2, 0.6, 1.0], budget: {params: 0.5}", data=unlabelled)
    for name, rows in curves_of(result).items():
        errors = [r["output_error"] for r in rows]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-9, name


def test_max_drop_budget_keeps_the_predicted_drop_within_it(trained):
    model, _ = trained
    result = sensitivity(model, "budget: {max_drop: 0.01}")
    rows = result.report.passes[0].layers
    chosen = [r for r in rows if r["chosen"]]
    assert chosen and sum(max(r["drop"], 0) for r in chosen) <= 0.01
    assert len({r["layer"] for r in chosen}) == len(chosen)


@pytest.mark.parametrize("kind,fraction", [("params", 0.3), ("macs", 0.5)])
def test_size_budgets_are_met_by_the_chosen_ranks(trained, kind, fraction):
    model, _ = trained
    result = sensitivity(model, f"budget: {{{kind}: {fraction}}}")
    record = result.report.passes[0]
    total = record.params_before if kind == "params" else record.macs_before
    chosen = {r["layer"]: r for r in record.layers if r["chosen"]}
    saved = sum(r[f"{kind}_saved"] for r in chosen.values())
    assert total - saved <= fraction * total


def test_an_unreachable_size_budget_fails_before_the_sweep(trained):
    model, _ = trained
    with pytest.raises(FxCompressError, match=r"budget \{params: 0.01\} is out of reach"):
        sensitivity(model, "budget: {params: 0.01}")


def test_sensitivity_needs_eval_data_and_train_data_for_finetune_steps(trained):
    model, _ = trained
    with pytest.raises(RecipeError, match="needs eval data"):
        sensitivity(model, data=TRAIN)
    with pytest.raises(FxCompressError, match="finetune_steps > 0 needs training data"):
        sensitivity(model, "finetune_steps: 2", data=EVAL)


def level(saved: int, drop: float, rank: int = 1) -> Level:
    return Level(energy=0.5, rank=rank, params_saved=saved, macs_saved=saved, metric=0.0, drop=drop)


CURVES = {"a": [level(100, 0.02, 1), level(50, 0.001, 2)],
          "b": [level(80, 0.005, 3), level(40, -0.003, 4), level(-10, 0.0, 5)]}


def test_greedy_choice_under_a_drop_budget():
    chosen = choose_levels(CURVES, Budget(max_drop=0.01), {"params": 1000, "macs": 1000})
    assert {name: lv.rank for name, lv in chosen.items()} == {"a": 2, "b": 3}
    assert choose_levels(CURVES, Budget(max_drop=0.0), {"params": 1000, "macs": 1000})["b"].rank == 4


def test_greedy_choice_under_a_size_budget_stops_once_met():
    totals = {"params": 1000, "macs": 1000}
    chosen = choose_levels(CURVES, Budget(params=0.85), totals)
    assert {name: lv.rank for name, lv in chosen.items()} == {"a": 1, "b": 3}
    assert {name: lv.rank for name, lv in choose_levels(CURVES, Budget(macs=0.95), totals).items()} == {"a": 2, "b": 4}


# ----------------------------------------------------------------------------- handoff to low_rank

def factorised_ranks(gm) -> dict[str, int]:
    return {name: module.project.weight.shape[0] for name, module in gm.named_children()
            if isinstance(module, nn.Sequential)}


@pytest.mark.parametrize("budget", ["{params: 0.3}", "{macs: 0.4}", "{max_drop: 0.01}"])
def test_low_rank_from_sensitivity_applies_the_chosen_ranks_within_the_budget(trained, budget):
    model, _ = trained
    text = recipe(f"  - sensitivity: {{budget: {budget}}}\n  - low_rank: {{rank: {{from: sensitivity}}}}\n")
    result = compress(model, text)
    sweep, factorised = result.report.passes
    chosen = {r["layer"]: r for r in sweep.layers if r["chosen"]}
    assert chosen and factorised_ranks(result.model) == {name: r["rank"] for name, r in chosen.items()}
    assert factorised.params_after == sweep.params_before - sum(r["params_saved"] for r in chosen.values())
    if "params" in budget:
        assert factorised.params_after <= 0.3 * sweep.params_before
    if "macs" in budget:
        assert factorised.macs_after <= 0.4 * sweep.macs_before
    if "max_drop" in budget:
        assert sum(max(r["drop"], 0) for r in chosen.values()) <= 0.01
        assert result.report.metrics["accuracy_after"] >= result.report.metrics["accuracy_before"] - 0.03


def test_adaptive_recipe_runs_end_to_end_and_exports_onnx(trained, tmp_path):
    model, test = trained
    result = fxcompress.compress(copy.deepcopy(model), "adaptive_lowrank", progress=False, output_dir=tmp_path)
    assert [p.name for p in result.report.passes] == ["sensitivity", "low_rank", "finetune", "export_onnx"]
    assert factorised_ranks(result.model)
    assert result.report.passes[-1].params_after < 0.5 * result.report.passes[0].params_before
    assert result.report.metrics["accuracy_after"] >= 0.95
    assert accuracy(result.model, test) == pytest.approx(result.report.metrics["accuracy_after"], abs=1e-4)
    assert (tmp_path / "adaptive_lowrank.onnx").stat().st_size > 0


def test_macs_budget_on_convolutions_without_labels_is_met_after_low_rank():
    from fxcompress.models import LeNet5
    text = """fxcompress: 1
model: lenet5
input_shape: [1, 1, 8, 8]
data:
  eval: {source: synthetic, samples: 64}
passes:
  - sensitivity: {energies: [0.3, 0.5, 0.7, 0.9], budget: {macs: 0.6}}
  - low_rank: {rank: {from: sensitivity}}
"""
    torch.manual_seed(0)
    result = compress(LeNet5(in_channels=1, image_size=8), text)
    sweep, factorised = result.report.passes
    chosen = {r["layer"]: r for r in sweep.layers if r["chosen"]}
    assert "output_error" in sweep.layers[0] and {"conv1", "conv2"} & set(chosen)
    assert factorised_ranks(result.model) == {name: r["rank"] for name, r in chosen.items()}
    assert factorised.macs_after == sweep.macs_before - sum(r["macs_saved"] for r in chosen.values())
    assert factorised.macs_after <= 0.6 * sweep.macs_before
