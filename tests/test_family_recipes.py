"""The shipped recipes per model family, each run end to end on a small instance of its family.

Each recipe names a full-size torchvision model; here it runs (through ``fxcompress.compress``, with the
recipe's own ``verify: true``: exact passes checked in float64) on a narrow or shallow instance of the
same architecture at 32x32, with 64 synthetic calibration images, and must shrink the model, collapse
exactly and export with onnxruntime parity. ResNet and MobileNetV2 recipes are tested in
test_select_neurons.py.
"""
import torch
import torchvision
import yaml
from torchvision.models import convnext, regnet

import fxcompress
from fxcompress.selector import Selector


def small_instance(family: str) -> torch.nn.Module:
    models = torchvision.models
    torch.manual_seed(0)
    if family == "mobilenet_v3_select":
        model = models.mobilenet_v3_small(width_mult=0.5, num_classes=10)
    elif family == "efficientnet_select":
        model = models.efficientnet_b0(num_classes=10)
    elif family == "densenet_select":
        model = models.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=10)
    elif family == "regnet_select":
        params = regnet.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
        model = models.RegNet(params, num_classes=10)
    elif family == "convnext_select":
        model = models.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                                num_classes=10)
    else:
        model = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                         mlp_dim=64, num_classes=10)
    return model.eval()


def run_shipped(name: str, tmp_path):
    recipe = yaml.safe_load(fxcompress.load_recipe(name).text)
    recipe.update(input_shape=[1, 3, 32, 32], data={"calibration": {"source": "synthetic", "samples": 64,
                                                                    "batch_size": 32}})
    result = fxcompress.compress(small_instance(name), recipe, progress=False, output_dir=tmp_path)
    passes = {p.name: p for p in result.report.passes}
    totals = result.report.totals()
    assert totals["params_after"] < totals["params_before"] and totals["macs_after"] < totals["macs_before"]
    assert passes["collapse"].verified and passes["collapse"].max_deviation <= 1e-4
    assert any("onnxruntime max |error|" in note for note in passes["export_onnx"].notes)
    assert (tmp_path / f"{name}.onnx").is_file()
    return result


def gathers(model) -> int:
    return sum(isinstance(m, Selector) for m in model.modules())


def test_mobilenet_v3_recipe_shrinks_streams_through_squeeze_excite(tmp_path):
    result = run_shipped("mobilenet_v3_select", tmp_path)
    assert gathers(result.model) == 0
    assert result.report.totals()["macs_after"] < 0.6 * result.report.totals()["macs_before"]


def test_efficientnet_recipe_shrinks_streams_through_squeeze_excite(tmp_path):
    result = run_shipped("efficientnet_select", tmp_path)
    assert gathers(result.model) == 0
    assert result.report.totals()["macs_after"] < 0.6 * result.report.totals()["macs_before"]


def test_densenet_recipe_selects_through_concatenations(tmp_path):
    result = run_shipped("densenet_select", tmp_path)
    layer = result.model.get_submodule("features.denseblock1.denselayer2.conv1")
    assert layer.in_channels < 16 + 8
    notes = next(p.notes for p in result.report.passes if p.name == "select_neurons")
    assert any(note.startswith("features.denseblock1.denselayer1.conv1: its input channels cannot all shrink")
               and "features.transition1.conv" in note for note in notes)  # the channel analysis explains Gathers


def test_regnet_recipe_handles_grouped_convolutions_and_squeeze_excite(tmp_path):
    result = run_shipped("regnet_select", tmp_path)
    notes = next(p.notes for p in result.report.passes if p.name == "select_neurons")
    assert any("grouped convolution" in note for note in notes)
    assert any("blocks by a grouped op" in note for note in notes)


def test_convnext_recipe_halves_every_block_mlp(tmp_path):
    result = run_shipped("convnext_select", tmp_path)
    for stage, dim in (("features.1.0", 16), ("features.3.0", 32)):
        first, second = (result.model.get_submodule(f"{stage}.block.{i}") for i in (3, 5))
        assert first.out_features == second.in_features == 2 * dim  # 4 * dim hidden, half kept


def test_vit_recipe_halves_every_encoder_mlp(tmp_path):
    result = run_shipped("vit_select", tmp_path)
    for layer in range(2):
        mlp = result.model.get_submodule(f"encoder.layers.encoder_layer_{layer}.mlp")
        assert mlp.get_submodule("3").in_features == 32
        assert gathers(mlp) == 0
