"""Shared pieces of the LeNet-300-100 / MNIST benchmarks (``selection_pareto.py``, ``lowrank_vs_selection.py``).

Data: the MNIST test set (10k images) found under ``root``, split 8k/2k by ``fxcompress.data``
(``split: train`` trains and calibrates, ``split: test`` is reported).  Not a test module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import fxcompress
from fxcompress.data import load_source
from fxcompress.models import LeNet300
from fxcompress.recipe import DataSource
from fxcompress.training import accuracy, train

INPUT_SHAPE = [1, 784]


def mnist(root: str, split: str, batch_size: int, shuffle: bool = False):
    spec = DataSource(source="mnist", root=root, split=split, batch_size=batch_size, shuffle=shuffle)
    return load_source(spec, INPUT_SHAPE)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def collapsed(gm):
    recipe = {"fxcompress": 1, "input_shape": INPUT_SHAPE, "passes": ["collapse"]}
    return fxcompress.compress(gm, recipe, progress=False).model


@dataclass
class Trained:
    """A LeNet-300-100 trained on the 8k split, with the batches it was trained, calibrated and tested on."""
    model: torch.nn.Module
    train: list      # batches of 64, shuffled
    calibration: list  # batches of 500, in order
    test: list       # batches of 500 (the 2k held-out images)
    epochs: int
    seconds: float

    def describe(self) -> str:
        return (f"LeNet-300-100, {self.epochs} epochs on 8k MNIST images ({self.seconds:.0f} s): test accuracy "
                f"{accuracy(self.model, self.test):.4f} on 2k images, {params(self.model):,} parameters")


def trained_lenet300(root: str, epochs: int, seed: int = 0) -> Trained:
    """Seeded SGD training (lr 0.05, batches of 64) of LeNet-300-100; the model is returned in eval mode."""
    torch.manual_seed(seed)
    train_batches, test = mnist(root, "train", 64, shuffle=True), mnist(root, "test", 500)
    calibration = mnist(root, "train", 500)
    model = LeNet300(784)
    start = time.perf_counter()
    train(model, train_batches, epochs=epochs, lr=0.05, optimizer="sgd", shuffle=True, progress=False)
    model.eval()
    return Trained(model, train_batches, calibration, test, epochs, time.perf_counter() - start)
