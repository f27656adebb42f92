"""Accuracy vs parameters of LeNet-300-100 on MNIST: low rank vs neuron selection vs both (not a test).

For each target size t, a fraction of the hidden layers' parameters (fc1 + fc2, weights and biases:
265,600 of the model's 266,610), the total budget is ``round(t * 265,600) + 1,010`` (fc3 kept as it
is) and every method is set to the largest size that fits it:

* selection -- ``select_neurons`` (group-lasso reconstruction on the calibration data, exact keep
  count, debiased) at the largest keep ratio that fits, then ``collapse``.  fc1 keeps its 784 inputs
  (a graph input); the fc1/fc2 neurons kept are removed from fc1/fc2's outputs and fc2/fc3's inputs.
* low rank (svd) -- ``low_rank`` on fc1 and fc2 with ``rank: {ratio: f}``, ``method: svd``: truncated
  SVD of each weight; f from the budget.
* low rank (activation) -- the same with ``method: activation``: the rank-r factors that minimise the
  output error on the calibration data (SVD of W C^{1/2}, bias absorbing the mean error).
* selection + low rank -- ``select_neurons`` at the milder keep ratio ``t ** split`` (``--split``,
  default 0.5: the compression shared evenly in log scale) + ``collapse``, then ``low_rank`` on the
  narrowed fc1 and fc2 with the ratio that brings the whole model to the budget; once with
  ``method: svd`` and once with ``method: activation`` (the same selected model).

The params columns are the total parameters of the compressed model (``sum(p.numel())``, fc3
included, every factor and bias counted).  Rank rules round down, so a method may land a little under
the budget; it never lands over it (a combined row whose selection alone fits runs no low rank).
With ``--finetune-steps N`` each compressed model is also fine-tuned by the ``finetune`` pass (N Adam
steps at lr 5e-4 on the 8k train images, batches of 64) and the cells read ``before -> after``.

Data: the MNIST test set (10k images) found under ``--root``, split 8k/2k by ``fxcompress.data``
(``split: train`` trains, calibrates and fine-tunes; ``split: test`` is reported, and used for
nothing else).  The training and data helpers are shared with ``selection_pareto.py`` (``_mnist.py``).

    python benchmarks/lowrank_vs_selection.py --root /work/shared/data/mnist --out benchmarks/results
    python benchmarks/lowrank_vs_selection.py --quick            # 2 epochs, two targets
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import fxcompress
from _mnist import INPUT_SHAPE, Trained, params, trained_lenet300
from fxcompress.training import accuracy

TARGETS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
QUICK_TARGETS = (0.3, 0.1)
HIDDEN = ("fc1", "fc2")
METHODS = {  # key: column title
    "selection": "selection",
    "svd": "low rank (svd)",
    "activation": "low rank (activation)",
    "selection+svd": "selection + low rank (svd)",
    "selection+activation": "selection + low rank (activation)",
}


# ------------------------------------------------------------------------------------ sizes


def widths(model) -> tuple[int, int]:
    """Neurons of fc1 and fc2 (the output width of their last factor when factorised)."""
    return tuple(_dense_or_expand(model.get_submodule(name)).out_features for name in HIDDEN)


def _dense_or_expand(layer):
    return layer.expand if isinstance(layer, torch.nn.Sequential) else layer


def shape_of(model) -> str:
    """e.g. ``300/100`` (dense) or ``212(r37)/71(r12)`` (factorised fc1/fc2)."""
    parts = []
    for name in HIDDEN:
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Sequential):
            parts.append(f"{layer.expand.out_features}(r{layer.project.out_features})")
        else:
            parts.append(f"{layer.out_features}")
    return "/".join(parts)


def selected_params(n1: int, n2: int) -> int:
    """Total params of LeNet-300-100 with n1/n2 hidden neurons: fc1 784->n1, fc2 n1->n2, fc3 n2->10."""
    return 785 * n1 + (n1 + 1) * n2 + 10 * n2 + 10


def counts(keep: float) -> tuple[int, int]:
    """The neurons ``select_neurons`` keeps at ratio ``keep`` (fc2 reads 300 inputs, fc3 100)."""
    return max(1, round(keep * 300)), max(1, round(keep * 100))


def keep_for_budget(budget: int) -> float:
    """The largest keep ratio whose selected model fits ``budget`` params (ratios c/300 and c/100 only,
    so that ``round`` never meets a tie)."""
    candidates = sorted({c / 300 for c in range(1, 301)} | {c / 100 for c in range(1, 101)})
    fitting = [k for k in candidates if selected_params(*counts(k)) <= budget]
    return fitting[-1] if fitting else candidates[0]


def ratio_for_budget(budget: int, n1: int, n2: int) -> float | None:
    """The ``rank: {ratio: f}`` that brings fc1 (784->n1) and fc2 (n1->n2) to ``budget`` total params.

    Biases and fc3 stay; the factorised weights get ``budget - fixed`` params, a fraction f of the dense
    ones (each layer's rank is the largest with r (m + n) <= f m n, so the sum stays within it).  None
    when the dense layers already fit (no low rank needed), or when nothing is left for the weights.
    """
    fixed = n1 + n2 + 10 * n2 + 10
    weights = 784 * n1 + n1 * n2
    f = (budget - fixed) / weights
    if f >= 1 or f <= 0:
        return None
    return math.floor(f * 1e6) / 1e6  # rank_for_ratio reads the decimal string: never round up


# ------------------------------------------------------------------------------------ methods


def recipe(*passes) -> dict:
    return {"fxcompress": 1, "input_shape": INPUT_SHAPE, "passes": list(passes)}


def select(model, keep: float, calibration):
    result = fxcompress.compress(copy.deepcopy(model),
                                 recipe({"select_neurons": {"keep": keep}}, "collapse"),
                                 calibration=calibration, progress=False)
    return result.model


def low_rank(model, ratio: float, method: str, calibration):
    config = {"targets": list(HIDDEN), "rank": {"ratio": ratio}, "method": method}
    result = fxcompress.compress(copy.deepcopy(model), recipe({"low_rank": config}),
                                 calibration=calibration if method == "activation" else None, progress=False)
    return result.model


def finetune(model, steps: int, train_batches):
    result = fxcompress.compress(model, recipe({"finetune": {"steps": steps}}), train=train_batches,
                                 progress=False)
    return result.model


@dataclass
class Cell:
    """One method at one target."""
    params: int
    shape: str
    accuracy: float
    settings: dict
    seconds: float
    finetuned: float | None = None


@dataclass
class Row:
    target: float
    budget: int
    cells: dict[str, Cell] = field(default_factory=dict)


def compress_all(trained: Trained, target: float, split: float, hidden_params: int, fixed_params: int,
                 finetune_steps: int = 0) -> Row:
    """Every method of the module docstring at one target, each fine-tuned after when ``finetune_steps``."""
    model, calibration = trained.model, trained.calibration
    row = Row(target, round(target * hidden_params) + fixed_params)

    def record(key: str, compressed, settings: dict, seconds: float) -> None:
        cell = Cell(params(compressed), shape_of(compressed), accuracy(compressed, trained.test), settings,
                    round(seconds, 2))
        if finetune_steps:
            tuned = finetune(compressed, finetune_steps, trained.train)
            assert params(tuned) == cell.params
            cell.finetuned = accuracy(tuned, trained.test)
        row.cells[key] = cell

    start = time.perf_counter()
    keep = keep_for_budget(row.budget)
    record("selection", select(model, keep, calibration), {"keep": keep}, time.perf_counter() - start)

    ratio = ratio_for_budget(row.budget, 300, 100)
    for method in ("svd", "activation"):
        start = time.perf_counter()
        record(method, low_rank(model, ratio, method, calibration), {"ratio": ratio, "method": method},
               time.perf_counter() - start)

    start = time.perf_counter()
    mild = max(target ** split, keep)  # never harsher than selection alone
    selected = select(model, mild, calibration)
    selection_seconds = time.perf_counter() - start
    ratio = ratio_for_budget(row.budget, *widths(selected))
    for method in ("svd", "activation"):
        start = time.perf_counter()
        combined = selected if ratio is None else low_rank(selected, ratio, method, calibration)
        record(f"selection+{method}", combined, {"keep": round(mild, 6), "ratio": ratio, "method": method},
               selection_seconds + time.perf_counter() - start)
    for key, cell in row.cells.items():
        assert cell.params <= row.budget, f"{key} at {target:.0%}: {cell.params:,} params > budget {row.budget:,}"
    return row


# ------------------------------------------------------------------------------------ output


def to_markdown(header: str, rows: list[Row], finetune_steps: int, settings: str) -> str:
    lines = [header, "", settings, ""]
    if finetune_steps:
        lines += [f"Accuracy cells: before -> after {finetune_steps} fine-tuning steps (Adam, lr 5e-4).", ""]
    titles = ["target (budget)"] + [f"{title} {what}" for title in METHODS.values() for what in ("params", "acc")]
    lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        cells = [f"{row.target:.0%} ({row.budget:,})"]
        for key in METHODS:
            cell = row.cells[key]
            acc = f"{cell.accuracy:.4f}" + (f" -> {cell.finetuned:.4f}" if cell.finetuned is not None else "")
            cells += [f"{cell.params:,}", acc]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "fc1/fc2 neurons (rank when factorised) and settings:", "",
              "| target | " + " | ".join(METHODS.values()) + " |", "|" + "---|" * (len(METHODS) + 1)]
    for row in rows:
        details = []
        for key in METHODS:
            cell = row.cells[key]
            settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in cell.settings.items() if k != "method")
            details.append(f"{cell.shape} ({settings})")
        lines.append(f"| {row.target:.0%} | " + " | ".join(details) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, markdown: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowrank_vs_selection.md").write_text(markdown)
    (out / "lowrank_vs_selection.json").write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 10, --quick: 2)")
    parser.add_argument("--quick", action="store_true", help=f"2 epochs and targets {QUICK_TARGETS} only")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help=f"fractions of the hidden layers' params (default {TARGETS})")
    parser.add_argument("--split", type=float, default=0.5,
                        help="selection + low rank: select at keep = target ** split, low rank does the rest")
    parser.add_argument("--finetune-steps", type=int, default=0, help="finetune steps after each compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: an MLP this small gains nothing from more, and a "
                             "shared machine loses a lot to oversubscription)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for lowrank_vs_selection.md and .json (e.g. benchmarks/results)")
    args = parser.parse_args()
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    targets = args.targets or (QUICK_TARGETS if args.quick else TARGETS)

    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    trained = trained_lenet300(args.root, epochs, seed=args.seed)
    model = trained.model
    hidden_params = sum(params(model.get_submodule(name)) for name in HIDDEN)
    fixed_params = params(model) - hidden_params
    baseline = accuracy(model, trained.test)
    header = trained.describe()
    print(header + "\n", flush=True)

    rows = []
    for target in targets:
        row = compress_all(trained, target, args.split, hidden_params, fixed_params, args.finetune_steps)
        rows.append(row)
        print(f"  {target:.0%} ({time.perf_counter() - begin:.0f} s): "
              + ", ".join(f"{k} {c.accuracy:.4f} ({c.params:,})" for k, c in row.cells.items()), flush=True)

    settings = (f"Seed {args.seed}, combined methods select at keep = target ** {args.split:g}, test accuracy on "
                f"the 2k held-out images (one image = 0.0005); params = all parameters of the compressed model.")
    markdown = to_markdown(header, rows, args.finetune_steps, settings)
    print("\n" + markdown)
    print(f"total {time.perf_counter() - begin:.0f} s")
    if args.out is not None:
        payload = {"model": "LeNet300", "epochs": epochs, "seed": args.seed, "baseline_accuracy": baseline,
                   "baseline_params": params(model), "hidden_params": hidden_params, "split": args.split,
                   "finetune_steps": args.finetune_steps, "threads": args.threads, "torch": torch.__version__,
                   "python": platform.python_version(),
                   "rows": [asdict(row) for row in rows]}
        write_results(args.out, markdown, payload)
        print(f"wrote {args.out / 'lowrank_vs_selection.md'} and {args.out / 'lowrank_vs_selection.json'}")


if __name__ == "__main__":
    main()
