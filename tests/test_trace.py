import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import TraceError


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_trace_copies_the_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gm = fxcompress.trace(model)
    with torch.no_grad():
        gm.get_submodule("0").weight.zero_()
    assert model[0].weight.abs().sum() > 0
    assert gm.get_submodule("0").weight.data_ptr() != model[0].weight.data_ptr()


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(TraceError) as info:
        fxcompress.trace(Branchy())
    message = str(info.value)
    assert "module 'gate' (Gate)" in message
    assert "if x.sum() > 0" in message and "test_trace.py" in message
    assert "leaf_modules" in message


def test_leaf_modules_make_it_traceable():
    x = torch.randn(2, 4)
    for leaf in (["Gate"], ["gate"], [Gate]):
        gm = fxcompress.trace(Branchy(), leaf_modules=leaf)
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
        model = Branchy()
        gm = fxcompress.trace(model, leaf_modules=leaf)
        torch.testing.assert_close(gm(x), model(x))


def test_unknown_leaf_module_is_an_error():
    with pytest.raises(TraceError, match="matches no submodule"):
        fxcompress.trace(Branchy(), leaf_modules=["Nope"])


def test_not_a_module():
    with pytest.raises(TraceError, match="expected a torch.nn.Module"):
        fxcompress.trace(lambda x: x)


def test_every_torchvision_classifier_traces_or_says_why():
    """Every classification model either traces or raises TraceError (on the meta device where the constructor allows)."""
    outcome = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:
            model = torchvision.models.get_model(name, weights=None)
        try:
            fxcompress.trace(model)
            outcome[name] = "traced"
        except TraceError as exc:
            assert "leaf_modules" in str(exc)
            outcome[name] = "TraceError"
    assert len(outcome) >= 80
    failed = sorted(n for n, o in outcome.items() if o != "traced")
    assert failed == [], f"untraceable: {failed}"
