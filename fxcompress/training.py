"""Supervised training and evaluation loops shared by the demo, `finetune`, `sensitivity` and `lc`."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .context import split_batch
from .errors import FxCompressError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    if name not in OPTIMIZERS:
        raise FxCompressError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    kw = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kw["momentum"] = momentum
    return OPTIMIZERS[name](params, **kw)


def _labelled(batch, who: str):
    inputs, target = split_batch(batch)
    if target is None:
        raise FxCompressError(f"{who} needs labelled batches (inputs, target); this data source has no labels")
    return inputs, target


def train(model: nn.Module, batches: Iterable, *, epochs: int = 1, steps: int | None = None, lr: float = 1e-3,
          optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
          loss: Callable | None = None, progress: bool = True, desc: str = "train", seed: int = 0) -> list[float]:
    """Train `model` in place with `loss(outputs, target)` (cross-entropy by default).

    Runs `epochs` passes over `batches`, or exactly `steps` optimizer steps when given. Returns the mean
    loss of each epoch.
    """
    torch.manual_seed(seed)
    loss = loss or F.cross_entropy
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr, momentum, weight_decay)
    model.train()
    history, done = [], 0
    bar = tqdm(total=steps or epochs * len(batches), desc=desc, disable=not progress, leave=False)
    try:
        while (steps is None and len(history) < epochs) or (steps is not None and done < steps):
            total, count = 0.0, 0
            for batch in batches:
                inputs, target = _labelled(batch, desc)
                opt.zero_grad()
                value = loss(model(*inputs), target)
                value.backward()
                opt.step()
                total, count, done = total + float(value.detach()), count + 1, done + 1
                bar.update()
                if steps is not None and done >= steps:
                    break
            history.append(total / max(count, 1))
    finally:
        bar.close()
        model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy of a classifier over labelled batches."""
    model.eval()
    right = total = 0
    for batch in batches:
        inputs, target = _labelled(batch, "accuracy")
        right += int((model(*inputs).argmax(-1) == target).sum())
        total += len(target)
    return right / max(total, 1)


def is_labelled(batches: Iterable | None) -> bool:
    if batches is None:
        return False
    for batch in batches:
        return split_batch(batch)[1] is not None
    return False
