"""finetune: plain supervised training of the whole graph, to recover what compression cost (seed 001).

Seed 001 Part II finds fine-tuning "essential throughout" (section 14.3): a few epochs at a small learning
rate after each compression step recover most of the accuracy lost by low-rank approximation (sections
10.5 and 15.2.1).  A recipe entry::

    - finetune:
        epochs: 3              # or `steps: 200` (exactly that many optimizer steps)
        optimizer: adam        # sgd | adam | adamw
        lr: 0.0005
        schedule: cosine       # none | cosine (annealed to 0 over the run)
        loss: mypkg.losses:distill   # optional: fn(outputs, target) -> scalar; default cross-entropy

reads the recipe's `train` data, and reports accuracy on the `eval` data before and after when it is
labelled (else the mean training loss).  Runs are deterministic given the recipe's seed.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fxcompress import PassConfig, RecipeError, register_pass
from fxcompress.training import SCHEDULES, accuracy, is_labelled, load_loss, mean_loss, train


class FinetuneConfig(PassConfig):
    epochs: int = Field(1, ge=1, description="passes over the train data (ignored when `steps` is given)")
    steps: int | None = Field(None, ge=1, description="exact number of optimizer steps instead of epochs")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(5e-4, gt=0, description="learning rate (seed 001 section 10.5.1 fine-tunes at 0.0005)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal[SCHEDULES] = Field("none", description="learning-rate schedule over the whole run")
    shuffle: bool = Field(True, description="visit the train batches in a fresh seeded order each epoch")
    loss: str | None = Field(None, description="package.module:function called as fn(outputs, target); "
                                               "default cross-entropy")

    @field_validator("loss")
    @classmethod
    def _importable_spec(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"loss must be 'package.module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _epochs_or_steps(self):
        if {"epochs", "steps"} <= self.model_fields_set and self.steps is not None:
            raise ValueError("give `epochs` or `steps`, not both")
        return self


def _check(gm, config: FinetuneConfig) -> None:
    """Import the user's loss before any pass runs (ValueError names the problem)."""
    try:
        load_loss(config.loss)
    except RecipeError as exc:
        raise ValueError(f"loss: {exc.message}") from None


def _measure(model, ctx, loss) -> tuple[str, float]:
    """Accuracy on the eval data when it is labelled, else the mean loss on the train data."""
    if is_labelled(ctx.eval):
        return "accuracy", accuracy(model, ctx.eval)
    return "loss", mean_loss(model, ctx.train, loss)


def _length(config: FinetuneConfig) -> str:
    return f"{config.steps} step(s)" if config.steps is not None else f"{config.epochs} epoch(s)"


@register_pass("finetune", config=FinetuneConfig, needs=("train",), check=_check)
def finetune(gm, ctx, config):
    """Supervised fine-tuning of all trainable parameters on the recipe's train data (seed 001 section 14.3)."""
    batches = ctx.train_batches("pass 'finetune'")
    loss = load_loss(config.loss)
    metric, before = _measure(gm, ctx, loss)
    history = train(gm, batches, epochs=config.epochs, steps=config.steps, lr=config.lr,
                    optimizer=config.optimizer, momentum=config.momentum, weight_decay=config.weight_decay,
                    loss=loss, schedule=config.schedule, shuffle=config.shuffle, progress=ctx.show_progress,
                    desc="finetune", seed=ctx.seed)
    _, after = _measure(gm, ctx, loss)
    if ctx.current is not None:
        ctx.current.metrics.update({f"{metric}_before": round(before, 4), f"{metric}_after": round(after, 4),
                                    "train_loss": [round(v, 4) for v in history]})
    ctx.note(f"{_length(config)} of {config.optimizer} (lr {config.lr:g}, schedule {config.schedule}): "
             f"{metric} {before:.4f} -> {after:.4f}, last train loss {history[-1]:.4g}")
    return gm
