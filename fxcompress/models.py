"""Model specs of recipes and the CLI: `torchvision:NAME`, `package.module:factory`, or a built-in name."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import FxCompressError


class LeNet300(nn.Module):
    """LeNet-300-100 (seed 003 Table 1): a 300-100 hidden-unit ReLU MLP on flattened images."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 (seed 003 Table 1): conv 20 5x5 - maxpool - conv 50 5x5 - maxpool - fc 500 - fc classes."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=2)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=2)
        side = image_size // 4
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _lenet300(input_shape, **kw):
    features = math.prod(input_shape[1:]) if input_shape else 784
    return LeNet300(in_features=features, **kw)


def _lenet5(input_shape, **kw):
    if input_shape is not None and len(input_shape) != 4:
        raise FxCompressError(f"lenet5 needs input_shape [N, C, H, W], got {list(input_shape)}")
    channels, size = (input_shape[1], input_shape[2]) if input_shape else (1, 28)
    return LeNet5(in_channels=channels, image_size=size, **kw)


BUILTIN = {"lenet300": _lenet300, "lenet5": _lenet5}


def build_model(spec: str, input_shape=None, **kwargs) -> nn.Module:
    """Instantiate a model (random weights) from a spec string."""
    if spec in BUILTIN:
        return BUILTIN[spec](input_shape, **kwargs)
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        import torchvision
        names = torchvision.models.list_models()
        if name not in names:
            raise FxCompressError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if name:
        from .data import import_object
        factory = import_object(spec, field="model")
        return factory(**kwargs)
    raise FxCompressError(f"unknown model '{spec}': use a built-in name ({', '.join(BUILTIN)}), "
                          "'torchvision:NAME' or 'package.module:factory'")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict file (or a checkpoint holding `state_dict`) into `model`, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FxCompressError(f"weights file '{path}' does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FxCompressError(f"weights '{path}' do not fit {type(model).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; check the model spec and its options")
    return model
