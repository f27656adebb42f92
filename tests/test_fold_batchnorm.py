import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress.export import export_onnx
from conftest import ConvBN1d, randomize_batchnorm

RECIPE = {"fxcompress": 1, "passes": ["fold_batchnorm"]}
CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (2, 3, 64, 64)),
    "conv1d_linear_bn1d": (ConvBN1d, (2, 3, 16)),
}


@pytest.mark.parametrize("name", CASES)
def test_fold_batchnorm_is_exact_in_float64_and_exports(name, tmp_path):
    factory, shape = CASES[name]
    model = randomize_batchnorm(factory()).double()
    x = torch.randn(shape, dtype=torch.float64)
    result = fxcompress.compress(model, RECIPE, (x,), progress=False, verify=True)
    gm = result.model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
    assert result.report.passes[0].verified
    assert result.report.passes[0].params_after < result.report.passes[0].params_before
    float_model = result.model.float()
    onnx = export_onnx(float_model, (x.float(),), tmp_path / f"{name}.onnx")
    assert onnx.max_abs_error is not None and onnx.max_abs_error < 1e-3


def test_batchnorm_after_a_shared_tensor_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_batchnorm(Shared())
    result = fxcompress.compress(model, RECIPE, (torch.randn(1, 3, 8, 8),), progress=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(result.model(x), model(x))


def test_verify_mode_checks_fold_batchnorm_on_a_float32_model_and_exports(tmp_path):
    model = randomize_batchnorm(ConvBN1d()).eval()
    recipe = {"fxcompress": 1, "input_shape": [2, 3, 16], "verify": True,
              "passes": ["fold_batchnorm", {"export_onnx": {"path": "m.onnx"}}]}
    result = fxcompress.compress(model, recipe, progress=False, output_dir=tmp_path)
    assert [p.verified for p in result.report.passes] == [True, None]
    notes = result.report.passes[0].notes
    assert len(notes) == len(set(notes)) == 1  # the float64 check's run does not report twice
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in result.model.modules())
    assert next(result.model.parameters()).dtype == torch.float32
