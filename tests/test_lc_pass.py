"""End-to-end tests of the `lc` pass and its shipped LeNet-300-100 recipes (digits data)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
import fxcompress.passes.lc  # noqa: F401  (registers the pass)
from fxcompress import RecipeError
from fxcompress.export import export_onnx
from fxcompress.lc.modules import CodebookLinear
from fxcompress.models import LeNet300
from fxcompress.training import accuracy




def run(model, recipe, tmp_path, **changes):
    recipe = fxcompress.load_recipe(recipe)
    for key, value in changes.items():
        setattr(recipe.passes[0].config, key, value)
    return fxcompress.compress(copy.deepcopy(model), recipe, progress=False, output_dir=tmp_path)


def weights(gm):
    return {name: m.weight.detach() for name, m in gm.named_modules() if isinstance(m, (nn.Linear, CodebookLinear))}


def test_quantize_recipe_deploys_codebook_layers_and_a_small_onnx(trained, tmp_path):
    model, test = trained
    result = run(model, "lenet300_lc_quantize", tmp_path)
    gm = result.model
    layers = [m for m in gm.modules() if isinstance(m, CodebookLinear)]
    assert len(layers) == 3 and not any(isinstance(m, nn.Linear) for m in gm.modules())
    assert all(m.indices.dtype == torch.uint8 and torch.unique(m.weight).numel() <= 4 for m in layers)
    assert result.report.metrics["accuracy_after"] >= 0.95
    assert accuracy(gm, test) == pytest.approx(result.report.metrics["accuracy_after"], abs=1e-4)
    quantized = tmp_path / "model_lc_quantized.onnx"
    float_file = export_onnx(copy.deepcopy(model).eval(), (torch.randn(2, 64),), tmp_path / "float.onnx")
    assert quantized.stat().st_size <= float_file.size_bytes / 3
    assert result.report.passes[0].params_after < 0.01 * result.report.passes[0].params_before


def test_prune_recipe_keeps_five_percent_jointly_and_beats_direct_compression(trained, tmp_path):
    model, test = trained
    lc = run(model, "lenet300_lc_prune", tmp_path)
    dc = run(model, "lenet300_lc_prune", tmp_path, mode="dc")
    for result in (lc, dc):
        w = weights(result.model)
        total = sum(t.numel() for t in w.values())
        assert sum(int(torch.count_nonzero(t)) for t in w.values()) <= round(0.05 * total)
        assert all(int(torch.count_nonzero(t)) > 0 for t in w.values())
    assert lc.report.metrics["accuracy_after"] > dc.report.metrics["accuracy_after"] + 0.1
    assert lc.report.metrics["accuracy_after"] >= 0.95
    per_layer = {row["name"]: row["storage_bits"] for row in lc.report.passes[0].layers}
    assert list(per_layer) == ["fc1,fc2,fc3"]


def test_lowrank_recipe_constrains_the_hidden_layers(trained, tmp_path):
    model, _ = trained
    result = run(model, "lenet300_lc_lowrank", tmp_path)
    gm = result.model
    for name, (m, n) in {"fc1": (300, 64), "fc2": (100, 300)}.items():
        pair = gm.get_submodule(name)
        assert (pair.project.in_features, pair.project.out_features, pair.expand.out_features) == (n, 8, m)
    assert isinstance(gm.fc3, nn.Linear) and np.linalg.matrix_rank(gm.fc3.weight.double().detach().numpy()) == 10
    assert sum(p.numel() for p in gm.parameters()) == 8 * (64 + 300) + 300 + 8 * (300 + 100) + 100 + 100 * 10 + 10
    export_onnx(gm, (torch.randn(1, 64),), tmp_path / "lowrank.onnx")
    assert result.report.metrics["accuracy_after"] >= 0.95
    rows = result.report.passes[0].layers
    assert [r["name"] for r in rows] == ["fc1", "fc2"]
    assert rows[0]["storage_bits"] == 32 * 8 * (300 + 64)


RECIPE = """fxcompress: 1
model: lenet300
input_shape: [1, 64]
data:
  train: {source: digits, split: train, batch_size: 64}
passes:
  - lc:
      cstep: %s
      options: %s
      deploy: %s
      schedule: %s
"""


@pytest.mark.parametrize("cstep,options,deploy,schedule,message", [
    ("quantise", "{k: 2}", "false", "[1.0]", "unknown C step 'quantise'.*did you mean 'quantize'"),
    ("quantize", "{k: 0}", "false", "[1.0]", "'k'.*>= 1"),
    ("prune_l0", "{kappa: -3}", "false", "[1.0]", "'kappa'"),
    ("prune_l0", "{keep: 0.1}", "true", "[1.0]", "deploy: true needs a codebook C step"),
    ("binarize", "{}", "false", "[2.0, 1.0]", "non-decreasing list of positive mu"),
])
def test_bad_lc_options_fail_before_any_work_with_the_line(tmp_path, cstep, options, deploy, schedule, message):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE % (cstep, options, deploy, schedule))
    with pytest.raises(RecipeError, match=message) as info:
        fxcompress.compress(LeNet300(64), str(path), progress=False)
    assert info.value.line == 7


INTERRUPTED = """\
fxcompress: 1
model: lenet300
input_shape: [1, 64]
data:
  train: {source: digits, split: train, batch_size: 64}
passes:
  - lc: {targets: [{type: Linear}], cstep: quantize, options: {k: 2}, schedule: [0.01, 0.02], steps_per_mu: 3}
  - stop_once
"""


def test_cli_run_resume_continues_lc_from_its_checkpoint(tmp_path, monkeypatch):
    from fxcompress import FxCompressError, register_pass
    from fxcompress.cli import main
    from fxcompress.lc.algorithm import _Run
    calls = []

    @register_pass("stop_once")
    def stop_once(gm, ctx, config):
        calls.append(1)
        if len(calls) == 1:
            raise FxCompressError("interrupted")
        return gm

    restored = []
    original_restore = _Run._restore
    monkeypatch.setattr(_Run, "_restore", lambda self: restored.append(1) or original_restore(self))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(INTERRUPTED)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--resume"]) == 2
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    assert not out.exists() and (tmp_path / ".out.checkpoints" / "lc_pass0.pt").is_file()
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--resume"]) == 0
    assert restored == [1] and (out / "model.onnx").is_file()
    assert not (tmp_path / ".out.checkpoints").exists()
