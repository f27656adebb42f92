import json

import jsonschema
import pytest
import torch
import yaml
from torch import nn

import fxcompress
from fxcompress import PassConfig, RecipeError, register_pass
from fxcompress.recipe import shipped_recipe, shipped_recipes
from fxcompress.schema import recipe_schema

MODEL = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))

BASE = """\
fxcompress: 1
input_shape: [4, 8]
passes:
  - fold_batchnorm
{extra}"""


def recipe_error(text) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        recipe = fxcompress.load_recipe(text)
        fxcompress.compress(MODEL, recipe, progress=False)
    return info.value


def test_unknown_pass_suggests_the_closest_name_and_line():
    err = recipe_error(BASE.format(extra="  - fold_batchnrom\n"))
    assert err.line == 5 and err.field == "passes[1]"
    assert "unknown pass 'fold_batchnrom'" in str(err) and "did you mean 'fold_batchnorm'" in str(err)


def test_wrong_type_names_field_and_line():
    err = recipe_error(BASE.format(extra="  - export_onnx:\n      verify: maybe\n"))
    assert err.line == 6 and err.field == "passes[1].export_onnx.verify"
    assert "maybe" in str(err)


def test_unknown_field_lists_known_fields():
    err = recipe_error(BASE.format(extra="  - export_onnx: {pth: m.onnx}\n"))
    assert err.field == "passes[1].export_onnx.pth" and err.line == 5
    assert "unknown field 'pth'" in str(err)


def test_missing_field():
    err = recipe_error("fxcompress: 1\ninput_shape: [4, 8]\n")
    assert err.field == "passes" and "missing required field" in str(err)
    err = recipe_error(BASE.format(extra="data:\n  calibration: {samples: 10}\n"))
    assert err.field == "data.calibration.source" and err.line == 6 and "missing" in str(err)


def test_unknown_data_source():
    err = recipe_error(BASE.format(extra="data:\n  calibration:\n    source: digts\n"))
    assert err.field == "data.calibration.source" and err.line == 7
    assert "unknown data source 'digts'" in str(err) and "did you mean 'digits'" in str(err)


def test_missing_root_fails_before_work(tmp_path):
    err = recipe_error(BASE.format(extra=f"data:\n  calibration: {{source: mnist, root: {tmp_path}/nope}}\n"))
    assert err.field == "data.calibration.root" and "does not exist" in str(err)


def test_target_that_matches_nothing():
    @register_pass("test_targeted", config=fxcompress.TargetedConfig, target_types=(nn.Linear,))
    def _targeted(gm, ctx, config):
        return gm

    err = recipe_error(BASE.format(extra="  - test_targeted:\n      targets: ['0', {type: Conv2d}]\n"))
    assert err.field == "passes[1].test_targeted.targets[1]" and err.line == 6
    assert "matches no Linear module" in str(err) and "candidates are: 0, 2" in str(err)


def test_bad_version_and_yaml():
    assert recipe_error("fxcompress: 2\npasses: [fold_batchnorm]\n").field == "fxcompress"
    err = recipe_error("fxcompress: 1\npasses: [fold_batchnorm\n")
    assert "not valid YAML" in str(err) and err.line is not None


def test_yaml_tags_are_refused():
    err = recipe_error("fxcompress: 1\npasses: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in str(err)


def test_custom_pass_from_yaml():
    class ScaleConfig(PassConfig):
        factor: float

    @register_pass("test_scale_output", config=ScaleConfig)
    def scale(gm, ctx, config):
        """Multiply the model's output by a constant."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(torch.mul, (out.args[0], config.factor))
        out.args = (scaled,)
        gm.recompile()
        return gm

    result = fxcompress.compress(MODEL, BASE.format(extra="  - test_scale_output: {factor: 3}\n"), progress=False)
    x = torch.randn(5, 8)
    torch.testing.assert_close(result.model(x), 3 * MODEL(x))
    assert [p.name for p in result.report.passes] == ["fold_batchnorm", "test_scale_output"]
    assert "test_scale_output" in fxcompress.available_passes()


def test_every_shipped_recipe_is_valid_against_the_schema():
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert shipped_recipes()
    for name in shipped_recipes():
        data = yaml.safe_load(shipped_recipe(name).read_text())
        jsonschema.validate(data, schema)
        fxcompress.load_recipe(name)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"fxcompress": 1, "passes": ["nope"]}, schema)
    assert json.dumps(schema)
