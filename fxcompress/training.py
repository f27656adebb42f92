"""Supervised training and evaluation loops shared by the demo, `finetune`, `sensitivity` and `lc`."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .context import split_batch
from .data import import_object
from .errors import FxCompressError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("none", "cosine")


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


def make_scheduler(opt: torch.optim.Optimizer, name: str, total_steps: int):
    """Learning-rate schedule stepped once per optimizer step: `none` (constant) or `cosine` (to 0)."""
    if name not in SCHEDULES:
        raise FxCompressError(f"unknown lr schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return None


def shuffled_epoch(batches):
    """One epoch of `batches`; lists are visited in a fresh order drawn from torch's (seeded) RNG."""
    if isinstance(batches, list):
        return [batches[i] for i in torch.randperm(len(batches)).tolist()]
    return batches


def batch_loss(model: nn.Module, batch, loss: Callable | None = None, who: str = "training") -> torch.Tensor:
    """`loss(model(*inputs), target)` of one labelled batch (cross-entropy by default)."""
    inputs, target = _labelled(batch, who)
    return (loss or F.cross_entropy)(model(*inputs), target)


def load_loss(spec: str | None, field: str = "loss") -> Callable:
    """Cross-entropy for None, else the user's `package.module:function`, called as `fn(outputs, target)`."""
    if spec is None:
        return F.cross_entropy
    fn = import_object(spec, field=field)
    if not callable(fn):
        raise FxCompressError(f"{field}: '{spec}' is a {type(fn).__name__}, not a function fn(outputs, target)")
    return fn


def train(model: nn.Module, batches: Iterable, *, epochs: int = 1, steps: int | None = None, lr: float = 1e-3,
          optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
          loss: Callable | None = None, schedule: str = "none", shuffle: bool = False, progress: bool = True,
          desc: str = "train", seed: int = 0) -> list[float]:
    """Train `model` in place with `loss(outputs, target)` (cross-entropy by default).

    Runs `epochs` passes over `batches`, or exactly `steps` optimizer steps when given. `schedule` sets the
    learning rate per step (see `make_scheduler`); `shuffle` visits list batches in a fresh seeded order
    each epoch. Returns the mean loss of each epoch.
    """
    torch.manual_seed(seed)
    total = steps or epochs * len(batches)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr, momentum, weight_decay)
    scheduler = make_scheduler(opt, schedule, total)
    model.train()
    history, done = [], 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        while (steps is None and len(history) < epochs) or (steps is not None and done < steps):
            running, count = 0.0, 0
            for batch in (shuffled_epoch(batches) if shuffle else batches):
                opt.zero_grad()
                value = batch_loss(model, batch, loss, desc)
                value.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                running, count, done = running + float(value.detach()), count + 1, done + 1
                bar.update()
                if steps is not None and done >= steps:
                    break
            history.append(running / max(count, 1))
    finally:
        bar.close()
        model.eval()
    return history


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, loss: Callable | None = None) -> float:
    """Mean per-batch `loss(outputs, target)` over labelled batches, in eval mode."""
    model.eval()
    values = [float(batch_loss(model, batch, loss, "mean_loss")) for batch in batches]
    return sum(values) / max(len(values), 1)


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
