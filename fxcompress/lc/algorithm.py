"""The learning-compression (LC) algorithm, direct compression (DC) and iterated DC (iDC).

Seed 002 (Carreira-Perpinan, *Model compression as constrained optimization*):

* problem (1): min_{w, Theta} L(w) s.t. w = Delta(Theta);
* augmented Lagrangian (eq. 7-8) and quadratic penalty (eq. 6, lambda = 0);
* LC iterations (figure 2): start from the reference w and Theta = Pi(w) (direct compression, the
  mu -> 0+ end of the path, section 4.2) and lambda = 0; for each mu of an increasing schedule,

    L step  w     <- argmin_w L(w) + mu/2 ||w - Delta(Theta) - lambda/mu||^2         (eq. 9)
    C step  Theta <- Pi(w - lambda/mu)                                             (eq. 10)
    lambda        <- lambda - mu (w - Delta(Theta))

  stopping when ||w - Delta(Theta)|| < tol;
* the L step runs SGD with momentum whose gradient adds mu (w - w') to the loss gradient, with the
  clipped learning rate min(eta, 1/mu) of section 5.1.2 (eq. 17);
* iDC (section 6.2.3) alternates plain training started from Delta(Theta) with Theta = Pi(w).

The result is always the feasible Delta(Theta), written into the model's parameters.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .csteps import FLOAT_BITS, CStep

__all__ = ["LCResult", "run_lc", "geometric_schedule", "STUCK_RTOL"]

MODES = ("lc", "dc", "idc")
PENALTIES = ("al", "quadratic")
STUCK_RTOL = 1e-3
"""Iterates whose Delta(Theta) stays within this relative distance of the DC one count as stuck."""

CHECKPOINT_VERSION = 1


@dataclass
class LCResult:
    """What `run_lc` returns; the model itself already holds Delta(Theta).

    `thetas[t]` is the final Theta of task t.  `initial` describes the direct-compression start and
    `history` has one record per mu step (per iteration for iDC) with keys: step, mu, lr,
    loss_w (mean loss at w), loss_compressed (at Delta(Theta)), violation (||w - Delta(Theta)||),
    lambda_norm, storage_bits and dc_distance (||Delta(Theta) - Delta(Theta_DC)|| relative to
    ||Delta(Theta_DC)||).  `storage_bits`/`reference_bits` compare the compressed parameters with
    their float32 size.
    """
    mode: str
    thetas: list[dict]
    initial: dict
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    storage_bits: int = 0
    reference_bits: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.reference_bits / max(self.storage_bits, 1)


def geometric_schedule(mu0: float, a: float, steps: int) -> list[float]:
    """The multiplicative schedule mu_k = mu0 * a^k, k = 0..steps-1 (seed 002 section 4.1)."""
    if not (mu0 > 0 and a >= 1 and isinstance(steps, int) and steps >= 1):
        raise ValueError(f"geometric_schedule needs mu0 > 0, a >= 1 and steps >= 1; got {mu0}, {a}, {steps}")
    return [mu0 * a ** k for k in range(steps)]


# ----------------------------------------------------------------------------- tasks


@dataclass
class _Task:
    names: list[str]
    params: list[nn.Parameter]
    cstep: CStep


class _Tasks:
    """All tasks' parameters as one flat list, compressed (C step) and decompressed together."""

    def __init__(self, model: nn.Module, tasks):
        named = dict(model.named_parameters())
        if not tasks:
            raise ValueError("run_lc needs at least one task (parameter names, C step)")
        self.tasks: list[_Task] = []
        seen: set[str] = set()
        for names, cstep in tasks:
            if not isinstance(cstep, CStep):
                raise ValueError(f"a task's C step must be a CStep (see make_cstep), got {type(cstep).__name__}")
            names = [names] if isinstance(names, str) else list(names)
            if not names:
                raise ValueError("a task must name at least one parameter")
            for name in names:
                if name not in named:
                    raise ValueError(f"model has no parameter '{name}'; parameters: {', '.join(named)}")
                if name in seen:
                    raise ValueError(f"parameter '{name}' belongs to two tasks")
                seen.add(name)
            self.tasks.append(_Task(names, [named[n] for n in names], cstep))
        self.params = [p for t in self.tasks for p in t.params]

    @property
    def penalty_form(self) -> bool:
        return any(t.cstep.penalty_form for t in self.tasks)

    def describe(self) -> list:
        return [[list(t.names), t.cstep.name] for t in self.tasks]

    def weights(self) -> list[Tensor]:
        """A copy of the current w."""
        return [p.detach().clone() for p in self.params]

    def compress(self, mu: float, shift: list[Tensor] | None = None) -> list[dict]:
        """Theta = Pi(w - shift) per task (C step, seed 002 eq. 10)."""
        values = [p.detach() for p in self.params]
        if shift is not None:
            values = [v - s for v, s in zip(values, shift)]
        thetas, start = [], 0
        for t in self.tasks:
            thetas.append(t.cstep.compress([v.cpu() for v in values[start:start + len(t.params)]], mu))
            start += len(t.params)
        return thetas

    def decompress(self, thetas: list[dict]) -> list[Tensor]:
        """Delta(Theta), one tensor per parameter, on the parameters' devices and dtypes."""
        return [d.to(device=p.device, dtype=p.dtype) for t, th in zip(self.tasks, thetas)
                for d, p in zip(t.cstep.decompress(th), t.params)]

    def storage_bits(self, thetas: list[dict]) -> int:
        return sum(t.cstep.storage_bits(th) for t, th in zip(self.tasks, thetas))

    @torch.no_grad()
    def assign(self, values: list[Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)


# ----------------------------------------------------------------------------- training and measuring


def _epochs(train_batches: Callable[[], Iterable]) -> Iterator:
    """Endless stream of batches: one fresh `train_batches()` epoch after another."""
    while True:
        empty = True
        for batch in train_batches():
            empty = False
            yield batch
        if empty:
            raise ValueError("train_batches() returned no batch")


def _train(model: nn.Module, loss_fn, train_batches, steps: int, lr: float, momentum: float,
           params: list[nn.Parameter], targets: list[Tensor], mu: float) -> None:
    """`steps` SGD steps on loss + mu/2 sum ||p - target||^2 (gradient mu (p - target), seed 002 5.1).

    mu = 0 trains the plain loss.  Momentum buffers start at zero.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    batches = _epochs(train_batches)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        loss_fn(model, next(batches)).backward()
        if mu > 0:
            with torch.no_grad():
                for p, t in zip(params, targets):
                    p.grad.add_(p - t, alpha=mu)
        opt.step()


@torch.no_grad()
def _mean_loss(model: nn.Module, loss_fn, train_batches) -> float:
    """Mean of loss_fn over one epoch of batches, in eval mode."""
    model.eval()
    losses = [float(loss_fn(model, batch)) for batch in train_batches()]
    return sum(losses) / max(len(losses), 1)


def _loss_at(model, loss_fn, train_batches, tasks: _Tasks, values: list[Tensor]) -> float:
    """Mean loss with the compressed parameters temporarily set to `values`."""
    saved = tasks.weights()
    tasks.assign(values)
    try:
        return _mean_loss(model, loss_fn, train_batches)
    finally:
        tasks.assign(saved)


def _norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _update_multipliers(lam: list[Tensor], w: list[Tensor], dw: list[Tensor], mu: float) -> list[Tensor]:
    """lambda <- lambda - mu (w - Delta(Theta)) (seed 002 figure 2)."""
    return [l - mu * (a - b) for l, a, b in zip(lam, w, dw)]


def _record(model, loss_fn, train_batches, tasks: _Tasks, w, thetas, lam, dc_weights, step, mu, lr) -> dict:
    """One history record (see LCResult)."""
    dw = tasks.decompress(thetas)
    return {
        "step": step, "mu": mu, "lr": lr,
        "loss_w": _loss_at(model, loss_fn, train_batches, tasks, w),
        "loss_compressed": _loss_at(model, loss_fn, train_batches, tasks, dw),
        "violation": _norm(a - b for a, b in zip(w, dw)),
        "lambda_norm": _norm(lam),
        "storage_bits": tasks.storage_bits(thetas),
        "dc_distance": _norm(a - b for a, b in zip(dw, dc_weights)) / max(_norm(dc_weights), 1e-30),
    }


def _stuck_at_dc(initial: dict, history: list[dict]) -> bool:
    """Did w collapse onto Delta(Theta_DC) with Theta never leaving it (seed 002 section 5)?

    Every iterate's Delta(Theta) stays within STUCK_RTOL of the DC one while ||w - Delta(Theta)||
    fell below a tenth of its DC value; a tiny mu, which also keeps Theta at DC, leaves w near the
    reference and does not count.
    """
    return (bool(history) and all(r["dc_distance"] < STUCK_RTOL for r in history)
            and history[-1]["violation"] < 0.1 * initial["violation"])


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str, config: dict) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION or state.get("config") != config:
        raise ValueError(f"checkpoint {path} was written by a run with other settings; "
                         f"expected {config}, found {state.get('config')}")
    return state


# ----------------------------------------------------------------------------- the algorithm


@dataclass
class _Settings:
    mode: str
    penalty: str
    mus: list[float]
    steps_per_mu: int
    lr: float
    momentum: float
    tol: float
    seed: int

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.mode != "dc" and not self.mus:
            raise ValueError(f"mode {self.mode!r} needs a non-empty mu_schedule")
        if any(not (m > 0 and math.isfinite(m)) for m in self.mus):
            raise ValueError(f"mu_schedule must hold positive numbers, got {self.mus}")
        if any(b < a for a, b in zip(self.mus, self.mus[1:])):
            raise ValueError("mu_schedule must be non-decreasing (seed 002: mu_0 < mu_1 < ...)")
        if self.mode != "dc":
            if isinstance(self.steps_per_mu, bool) or not isinstance(self.steps_per_mu, int) or self.steps_per_mu < 1:
                raise ValueError(f"steps_per_mu must be an integer >= 1, got {self.steps_per_mu!r}")
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr!r}")
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    @property
    def start_mu(self) -> float:
        """The mu of the DC start: mu_0 for LC; the last mu for DC and iDC (penalty forms only)."""
        if not self.mus:
            return 1.0
        return self.mus[0] if self.mode == "lc" else self.mus[-1]


def run_lc(model: nn.Module, tasks: Sequence[tuple[Sequence[str], CStep]],
           loss_fn: Callable[[nn.Module, object], Tensor], train_batches: Callable[[], Iterable], *,
           mode: str = "lc", penalty: str = "al", mu_schedule: Sequence[float] | None = None,
           steps_per_mu: int = 100, lr: float = 0.01, momentum: float = 0.9, tol: float = 1e-3,
           checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
           progress: Callable[[dict], None] | None = None, seed: int = 0) -> LCResult:
    """Compress `model` in place and return an `LCResult` (see the module docstring for the maths).

    tasks: (parameter names of `model`, CStep) pairs; each C step compresses its parameters jointly.
      Parameters in no task (e.g. biases) are trained in L steps but not compressed.
    loss_fn(model, batch) -> scalar tensor; train_batches() -> one epoch of batches.  Every L step
      starts a fresh epoch and runs `steps_per_mu` minibatch steps (epochs repeat as needed).
    mode: "lc" (the LC algorithm), "dc" (Theta = Pi(w) only) or "idc" (iterated DC: per entry of
      mu_schedule, `steps_per_mu` steps of plain training from Delta(Theta), then Theta = Pi(w)).
    penalty: "al" (augmented Lagrangian) or "quadratic" (lambda stays 0).
    mu_schedule: non-decreasing mu values, e.g. `geometric_schedule(1e-3, 1.1, 30)`.  Penalty-form
      C steps use mu_schedule[0] for the LC start, and in "dc"/"idc" mode the last mu throughout.
    lr: the L step uses min(lr, 1/mu) (seed 002 eq. 17); iDC uses lr.
    tol: stop once ||w - Delta(Theta)|| < tol (all tasks together).
    checkpoint_path: written atomically after every step; with resume=True an existing checkpoint of
      the same settings is continued (the result equals an uninterrupted run); a missing one
      starts a fresh run.
    progress: called with each history record.
    seed: torch's RNG is seeded with seed + step before each L step (inside a forked RNG state),
      so the run is deterministic if train_batches draws its randomness from torch.

    Warns (UserWarning) when w collapses onto the direct compression while Theta never leaves it,
    which seed 002 section 5 notes is usually a sign that mu increases too fast.
    """
    settings = _Settings(mode, penalty, [float(m) for m in mu_schedule or []], steps_per_mu, float(lr),
                         float(momentum), float(tol), seed)
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    task_set = _Tasks(model, tasks)
    if not settings.mus and task_set.penalty_form:
        raise ValueError("penalty-form C steps need a mu: give mu_schedule (dc mode uses its last value)")
    path = None if checkpoint_path is None else os.fspath(checkpoint_path)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    was_training = model.training
    with torch.random.fork_rng(devices=devices):
        result = _Run(model, task_set, loss_fn, train_batches, settings, path).execute(resume, progress)
    task_set.assign(task_set.decompress(result.thetas))
    model.train(was_training)
    if mode == "lc" and _stuck_at_dc(result.initial, result.history):
        warnings.warn("LC iterates stayed at the direct-compression solution for the whole mu schedule: "
                      "mu probably increases too fast (seed 002 section 5); use a smaller mu0 or factor a",
                      stacklevel=2)
    return result


class _Run:
    """The state of one run: w (in the model), Theta, lambda, the DC point and the history."""

    def __init__(self, model, tasks: _Tasks, loss_fn, train_batches, settings: _Settings, path: str | None):
        self.model, self.tasks, self.loss_fn, self.train_batches = model, tasks, loss_fn, train_batches
        self.settings, self.path = settings, path
        self.config = {**asdict(settings), "tasks": tasks.describe()}

    def execute(self, resume: bool, progress) -> LCResult:
        if resume and os.path.exists(self.path):
            first = self._restore()
        else:
            first = self._start()
        dc_weights = self.tasks.decompress(self.theta_dc)
        converged = (self.history[-1] if self.history else self.initial)["violation"] < self.settings.tol
        steps = [] if self.settings.mode == "dc" else range(first, len(self.settings.mus))
        for k in steps:
            if converged:
                break
            mu = self.settings.mus[k]
            torch.manual_seed(self.settings.seed + k)
            w, lr = self._lc_step(mu) if self.settings.mode == "lc" else self._idc_step()
            record = _record(self.model, self.loss_fn, self.train_batches, self.tasks, w, self.thetas, self.lam,
                             dc_weights, k, mu, lr)
            self.history.append(record)
            converged = record["violation"] < self.settings.tol
            if self.path is not None:
                self._checkpoint(k + 1)
            if progress is not None:
                progress(record)
        return LCResult(mode=self.settings.mode, thetas=self.thetas, initial=self.initial, history=self.history,
                        converged=converged, storage_bits=self.tasks.storage_bits(self.thetas),
                        reference_bits=sum(p.numel() for p in self.tasks.params) * FLOAT_BITS)

    def _start(self) -> int:
        """w = reference, Theta = Pi(w) (direct compression), lambda = 0 (seed 002 section 4.1)."""
        self.theta_dc = self.thetas = self.tasks.compress(self.settings.start_mu)
        self.lam = [torch.zeros_like(p.detach()) for p in self.tasks.params]
        self.history = []
        self.initial = _record(self.model, self.loss_fn, self.train_batches, self.tasks, self.tasks.weights(),
                               self.thetas, self.lam, self.tasks.decompress(self.thetas), -1, 0.0, 0.0)
        return 0

    def _restore(self) -> int:
        state = _load_checkpoint(self.path, self.config)
        self.model.load_state_dict(state["model"])
        self.thetas, self.theta_dc = state["thetas"], state["theta_dc"]
        self.lam = [l.to(p.device) for l, p in zip(state["lambdas"], self.tasks.params)]
        self.history, self.initial = state["history"], state["initial"]
        return state["next_step"]

    def _checkpoint(self, next_step: int) -> None:
        _save_checkpoint(self.path, {
            "version": CHECKPOINT_VERSION, "config": self.config, "next_step": next_step,
            "model": self.model.state_dict(), "thetas": self.thetas, "lambdas": [l.cpu() for l in self.lam],
            "theta_dc": self.theta_dc, "history": self.history, "initial": self.initial})

    def _lc_step(self, mu: float) -> tuple[list[Tensor], float]:
        """L step, C step and multiplier update for one mu (seed 002 figure 2)."""
        al = self.settings.penalty == "al"
        dw = self.tasks.decompress(self.thetas)
        targets = [d + l / mu for d, l in zip(dw, self.lam)] if al else dw
        lr = min(self.settings.lr, 1.0 / mu)
        _train(self.model, self.loss_fn, self.train_batches, self.settings.steps_per_mu, lr, self.settings.momentum,
               self.tasks.params, targets, mu)
        self.thetas = self.tasks.compress(mu, [l / mu for l in self.lam] if al else None)
        w = self.tasks.weights()
        if al:
            self.lam = _update_multipliers(self.lam, w, self.tasks.decompress(self.thetas), mu)
        return w, lr

    def _idc_step(self) -> tuple[list[Tensor], float]:
        """Plain training from Delta(Theta), then Theta = Pi(w) (seed 002 section 6.2.3)."""
        self.tasks.assign(self.tasks.decompress(self.thetas))
        _train(self.model, self.loss_fn, self.train_batches, self.settings.steps_per_mu, self.settings.lr,
               self.settings.momentum, self.tasks.params, [], 0.0)
        self.thetas = self.tasks.compress(self.settings.start_mu)
        return self.tasks.weights(), self.settings.lr
