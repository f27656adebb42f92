import gzip
import json

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import PassConfig, VerificationError, register_pass
from fxcompress.cli import main
from fxcompress.data import load_source, mnist_arrays
from fxcompress.export import check_parity, export_onnx
from fxcompress.models import build_model
from fxcompress.recipe import DataSource

RECIPE = """\
fxcompress: 1
model: lenet300
input_shape: [1, 64]
data:
  eval: {source: digits, split: test, batch_size: 128}
passes:
  - fold_batchnorm
  - export_onnx: {path: exported.onnx}
"""


def test_cli_run_writes_every_output(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    assert {"model.pt", "model.onnx", "exported.onnx", "report.json", "report.md", "recipe.yaml"} <= \
        {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
    text = capsys.readouterr().out
    assert "fc1" in text and "export_onnx" in text and "accuracy_before" in text
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["fold_batchnorm", "export_onnx"]
    loaded = fxcompress.load(out)
    x = torch.randn(3, 64)
    check_parity(out / "model.onnx", loaded.model, (x,))


def test_cli_user_error_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("fold_batchnorm", "fold_bn"))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml:7" in err and "unknown pass 'fold_bn'" in err
    assert list(tmp_path.iterdir()) == [recipe]


def test_cli_validate_inspect_passes_schema(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["validate", str(recipe)]) == 0
    assert main(["inspect", "--model", "lenet300", "--input-shape", "1", "64"]) == 0
    assert main(["passes"]) == 0
    assert main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "valid" in text and "fc2" in text and "export_onnx" in text and "path" in text
    assert json.loads((tmp_path / "s.json").read_text())["title"] == "fxcompress recipe"
    assert main(["inspect", "--model", "nope"]) == 2


def test_verify_catches_a_pass_that_lies_about_being_exact():
    @register_pass("test_not_exact", config=PassConfig, exact=True)
    def perturb(gm, ctx, config):
        with torch.no_grad():
            next(gm.parameters()).add_(1e-3)
        return gm

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(VerificationError, match="test_not_exact"):
        fxcompress.compress(model, {"fxcompress": 1, "passes": ["test_not_exact"]}, (torch.randn(2, 4),),
                            verify=True, progress=False)


def test_compress_never_mutates_the_model_and_reports_deviation():
    @register_pass("test_zero_weights", config=PassConfig)
    def zero(gm, ctx, config):
        with torch.no_grad():
            for p in gm.parameters():
                p.zero_()
        return gm

    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    result = fxcompress.compress(model, {"fxcompress": 1, "passes": ["test_zero_weights"]}, (x,), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.report.passes[0].max_deviation == pytest.approx(float(model(x).detach().abs().max()), rel=1e-6)


def test_failed_export_leaves_no_file(tmp_path):
    class Unstable(nn.Module):
        """Its output changes on every call, so the exported constant cannot match torch."""
        def forward(self, x):
            return x * float(np.random.default_rng().random() + 1.0)

    with pytest.raises(VerificationError, match="onnxruntime output deviates"):
        export_onnx(Unstable(), (torch.randn(2, 3),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_data_sources(tmp_path):
    digits = load_source(DataSource(source="digits", split="train", batch_size=100), [1, 1, 16, 16])
    x, y = digits[0]
    assert x.shape == (100, 1, 16, 16) and y.dtype == torch.int64 and float(x.max()) <= 1.0
    test = load_source(DataSource(source="digits", split="test", batch_size=1000), [1, 64])
    assert sum(len(b[1]) for b in test) + sum(len(b[1]) for b in digits) == 1797
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(50) % 10)
    arrays = mnist_arrays(tmp_path)
    assert arrays[0].shape == (50, 28, 28) and np.array_equal(arrays[0], images)
    mnist = load_source(DataSource(source="mnist", root=str(tmp_path), split="all", batch_size=64), [1, 784])
    assert mnist[0][0].shape == (50, 784)
    synthetic = load_source(DataSource(source="synthetic", samples=10, batch_size=4), [1, 3, 8, 8], seed=3)
    assert [b.shape[0] for b in synthetic] == [4, 4, 2]
    again = load_source(DataSource(source="synthetic", samples=10, batch_size=4), [1, 3, 8, 8], seed=3)
    assert torch.equal(synthetic[0], again[0])


def test_latency_of_original_and_compressed_goes_in_the_report(tmp_path, capsys):
    recipe = RECIPE.replace("{path: exported.onnx}", "{path: exported.onnx, latency: true, latency_batches: [1, 8],"
                                                      " latency_repeats: 3}")
    result = fxcompress.compress(build_model("lenet300", [1, 64]), recipe, progress=False,
                                 output_dir=tmp_path)
    rows = result.report.metrics["onnx_latency"]
    assert [r["batch"] for r in rows] == [1, 8]
    assert all(r["original_ms"] > 0 and r["compressed_ms"] > 0 and r["macs_ratio"] == 1.0 for r in rows)
    assert any("speedup" in note for note in result.report.passes[-1].notes)
    file = tmp_path / "r.yaml"
    file.write_text(RECIPE)
    assert main(["run", str(file), "--out", str(tmp_path / "out"), "--quiet", "--latency"]) == 0
    assert "onnx_latency" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["batch"] for r in saved["metrics"]["onnx_latency"]] == [1, 32]


def test_markdown_report_has_each_pass_layer_records():
    recipe = {"fxcompress": 1, "input_shape": [1, 64], "passes": [{"low_rank": {"targets": ["fc1", "fc2"], "rank": 4}}]}
    result = fxcompress.compress(build_model("lenet300", [1, 64]), recipe, progress=False)
    text = result.report.to_markdown()
    section = text.split("## Pass 0: low_rank, per layer", 1)[1]
    header = section.strip().splitlines()[0]
    assert "name" in header and "rank" in header and "params_after" in header
    assert "| fc1 |" in section and "| fc2 |" in section


def test_demo_trains_compresses_and_exports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert {"weights.pt", "model.pt", "model.onnx", "report.json", "report.md", "recipe.yaml"} <= \
        {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["accuracy_before"] > 0.95 and metrics["accuracy_after"] >= metrics["accuracy_before"] - 0.01
    assert report["passes"][1]["params_after"] < 0.5 * report["passes"][0]["params_before"]
    assert "onnx_latency" in capsys.readouterr().out
