"""LC vs direct compression (DC) vs iterated DC (iDC) on LeNet-300-100 and MNIST (seed 002 sections 4.2, 6.2).

The 10,000 images of MNIST's t10k files under --root are split (seed 0) into 8,000 training and
2,000 test images.  A reference LeNet-300-100 (784-300-100-10, ReLU) is trained with SGD, then
compressed by each method with the same budget of SGD steps for LC and iDC:

* quantization, one learned codebook of K in {2, 4, 8} values per layer;
* pruning to 5% and 10% of all weights, one kappa over the three layers jointly;
* low rank 10 for the two hidden layers.

It prints a table of test error (%), training loss and compression ratio (float32 size of the
compressed weights over the C steps' `storage_bits`).

    python benchmarks/lc_vs_dc.py [--root /work/shared/data/mnist] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.data import mnist_arrays
from fxcompress.lc.algorithm import geometric_schedule, run_lc
from fxcompress.lc.csteps import make_cstep
from fxcompress.models import LeNet300

LAYERS = ("fc1", "fc2", "fc3")
SETTINGS = [
    ("quantize K=2", "quantize", {"k": 2}, LAYERS, False),
    ("quantize K=4", "quantize", {"k": 4}, LAYERS, False),
    ("quantize K=8", "quantize", {"k": 8}, LAYERS, False),
    ("prune 5%", "prune_l0", {"keep": 0.05}, LAYERS, True),
    ("prune 10%", "prune_l0", {"keep": 0.10}, LAYERS, True),
    ("low rank 10", "low_rank", {"rank": 10}, ("fc1", "fc2"), False),
]


def load_mnist(root: str, n_train: int = 8000):
    images, labels = mnist_arrays(root)
    order = np.random.default_rng(0).permutation(len(labels))
    x = torch.tensor(images[order], dtype=torch.float32).reshape(len(labels), -1) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels[order], dtype=torch.int64)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def epoch_fn(x, y, batch_size=128):
    """One shuffled epoch of minibatches, drawn from torch's RNG (run_lc seeds it per step)."""
    def epoch():
        order = torch.randperm(len(x))
        return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
    return epoch


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    """(error %, mean cross-entropy)."""
    model.eval()
    logits = model(x)
    return 100.0 * float((logits.argmax(1) != y).float().mean()), float(F.cross_entropy(logits, y))


def train_reference(train, epochs: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    model = LeNet300(784)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.95)
    batches = epoch_fn(*train)
    for _ in range(epochs):
        model.train()
        for batch in batches():
            opt.zero_grad()
            cross_entropy(model, batch).backward()
            opt.step()
        sched.step()
    return model


def compress(reference, train, setting, mode, schedule, steps_per_mu, lr):
    _, cstep, options, layers, joint = setting
    names = [f"{layer}.weight" for layer in layers]
    groups = [names] if joint else [[n] for n in names]
    tasks = [(group, make_cstep(cstep, **options)) for group in groups]
    model = copy.deepcopy(reference)
    result = run_lc(model, tasks, cross_entropy, epoch_fn(*train), mode=mode, mu_schedule=schedule,
                    steps_per_mu=steps_per_mu, lr=lr, momentum=0.9, tol=1e-4, seed=0)
    return model, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/work/shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=40, help="reference training epochs")
    parser.add_argument("--mu0", type=float, default=1e-3)
    parser.add_argument("--factor", type=float, default=1.35)
    parser.add_argument("--mu-steps", type=int, default=30)
    parser.add_argument("--steps-per-mu", type=int, default=125, help="SGD steps per L step (2 epochs)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (fewer epochs and steps)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.mu_steps, args.steps_per_mu, args.factor = 5, 8, 30, 2.5

    train, test = load_mnist(args.root)
    start = time.perf_counter()
    reference = train_reference(train, args.epochs, lr=0.05)
    ref_err, ref_loss = evaluate(reference, *test)
    print(f"reference LeNet-300-100: test error {ref_err:.2f}%, train loss {evaluate(reference, *train)[1]:.4f} "
          f"({time.perf_counter() - start:.0f} s)")
    schedule = geometric_schedule(args.mu0, args.factor, args.mu_steps)
    print(f"mu schedule {args.mu0:g} x {args.factor:g}^k, {args.mu_steps} steps of {args.steps_per_mu} SGD steps, "
          f"lr min({args.lr:g}, 1/mu); iDC gets the same number of SGD steps\n")
    header = (f"{'compression':<14} {'ratio':>7} | {'test error %':^23} | {'train loss':^26}\n"
              f"{'':<14} {'':>7} | {'DC':>7} {'iDC':>7} {'LC':>7} | {'DC':>8} {'iDC':>8} {'LC':>8}")
    print(header)
    print("-" * len(header.splitlines()[0]))
    for setting in SETTINGS:
        errors, losses = [], []
        for mode in ("dc", "idc", "lc"):
            model, result = compress(reference, train, setting, mode, schedule, args.steps_per_mu, args.lr)
            errors.append(evaluate(model, *test)[0])
            losses.append(evaluate(model, *train)[1])
        print(f"{setting[0]:<14} {result.compression_ratio:>6.1f}x | "
              f"{errors[0]:>7.2f} {errors[1]:>7.2f} {errors[2]:>7.2f} | "
              f"{losses[0]:>8.4f} {losses[1]:>8.4f} {losses[2]:>8.4f}", flush=True)
    print(f"\nreference: test error {ref_err:.2f}%, test loss {ref_loss:.4f}; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
