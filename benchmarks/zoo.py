"""The torchvision zoo through fxcompress, side by side with torch-pruning.

For every classification model of ``torchvision.models`` (random weights, eval mode, a small input:
1x3x64x64, or the size in `INPUT_SIZES`), on synthetic calibration data:

* **fxcompress**: trace, ``fold_batchnorm``, ``select_neurons`` keeping 50% of the inputs at every
  selectable place (joint residual streams) + ``collapse``, ``low_rank`` at energy 0.9 on every
  Linear/Conv that passes its break-even guard, then ``export_onnx`` with onnxruntime parity — all
  through ``fxcompress.compress`` with the recipe `zoo_recipe` builds;
* **torch-pruning**: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance`` at pruning ratio 0.5,
  the layers making the model's outputs ignored (found by fxcompress's channel analysis).

Each tool's record: status (``ok``, ``failed`` with the error class and message, or ``timeout``),
parameters and MACs before/after (both counted by ``fxcompress.graph.cost`` on the traced models), and
seconds. The fxcompress record also lists the ops that freeze channels (channel analysis) and the
channel groups. Each model runs in its own subprocess under ``--timeout``; results are written after
every model to ``benchmarks/results/zoo.json`` and ``zoo.md``.

    python benchmarks/zoo.py                      # every model
    python benchmarks/zoo.py --models ci          # the CI subset of tests/test_zoo.py
    python benchmarks/zoo.py --models resnet18 vgg11 --timeout 600 --no-torch-pruning
    python benchmarks/zoo.py --models vgg13 vgg16 --merge   # add/replace these rows in the existing table
    python benchmarks/zoo.py --models vgg13 --merge --no-torch-pruning   # re-run fxcompress only, keep the rest
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZE = 64
INPUT_SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56}
CALIBRATION_SAMPLES = 16
# Small models that run the whole pipeline in ~10-15 s each on one core: residual adds, depthwise
# and grouped convs, squeeze-excite gates, concatenations (fire modules).
CI_SUBSET = ("squeezenet1_0", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0")


@dataclass
class ToolRecord:
    """What one tool did to one model."""
    status: str = "not run"
    error: str | None = None
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float | None = None

    @property
    def params_ratio(self) -> float | None:
        return _ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float | None:
        return _ratio(self.macs_before, self.macs_after)


@dataclass
class ZooRecord:
    """One model: its input size, the channel analysis summary, and both tools' records."""
    model: str
    input_size: int
    groups: int | None = None
    removable_groups: int | None = None
    frozen_ops: list[str] = field(default_factory=list)
    no_rule: list[str] = field(default_factory=list)
    fxcompress: ToolRecord = field(default_factory=ToolRecord)
    torch_pruning: ToolRecord = field(default_factory=ToolRecord)


def _ratio(before, after) -> float | None:
    return round(before / after, 3) if before and after else None


def zoo_models() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str) -> int:
    return INPUT_SIZES.get(name, DEFAULT_SIZE)


def build_model(name: str) -> nn.Module:
    """A torchvision classifier with random weights in eval mode, sized for `input_size(name)`."""
    import torchvision
    options = {"image_size": input_size(name)} if name.startswith("vit_") else {}
    if name in ("inception_v3", "googlenet"):
        options["init_weights"] = False  # PyTorch's default init; theirs (scipy truncnorm) is slow
    return torchvision.models.get_model(name, weights=None, **options).eval()


def example_input(size: int) -> tuple[torch.Tensor]:
    """The fixed 1x3xSxS input both tools are measured and exported on."""
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def zoo_recipe(size: int, samples: int = CALIBRATION_SAMPLES) -> dict:
    """The recipe every zoo model gets: fold BN, select 50% + collapse, low rank at energy 0.9, ONNX; the exact
    passes (fold_batchnorm, collapse) are checked in float64 (`verify`)."""
    return {
        "fxcompress": 1,
        "input_shape": [1, 3, size, size],
        "seed": 0,
        "verify": True,
        "data": {"calibration": {"source": "synthetic", "samples": samples, "batch_size": 8}},
        "passes": [
            "fold_batchnorm",
            {"select_neurons": {"keep": 0.5, "residual": "joint"}},
            "collapse",
            {"low_rank": {"rank": {"energy": 0.9}}},
            {"export_onnx": {"path": "model.onnx"}},
        ],
    }


def measure(model: nn.Module, inputs: tuple) -> tuple[int, int]:
    """(parameters, MACs per example) of `model`, MACs from fxcompress.graph.cost on its trace."""
    import fxcompress
    from fxcompress.graph.cost import layer_costs
    from fxcompress.graph.shapes import propagate_shapes
    gm = model if isinstance(model, torch.fx.GraphModule) else fxcompress.trace(model)
    macs = sum(c.macs for c in layer_costs(gm, propagate_shapes(gm, inputs), inputs[0].shape[0]))
    return sum(p.numel() for p in model.parameters()), macs


def _failure(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message[:400]}"


def analyse_channels(record: ZooRecord, model: nn.Module, inputs: tuple):
    """Fill the record's channel-analysis fields; returns the analysis."""
    import fxcompress
    from fxcompress.graph.channels import channel_groups
    analysis = channel_groups(fxcompress.trace(model), inputs)
    record.groups = len(analysis.groups)
    record.removable_groups = sum(g.removable for g in analysis.groups)
    record.frozen_ops = [f"{f.node} ({f.op}): {f.reason}" for f in analysis.frozen_ops
                         if f.op not in ("placeholder", "output")]
    record.no_rule = list(analysis.no_rule)
    return analysis


def run_fxcompress(model: nn.Module, size: int, workdir: Path,
                   samples: int = CALIBRATION_SAMPLES) -> tuple[ToolRecord, Exception | None]:
    """The zoo recipe through fxcompress.compress; returns the record and the exception, if any."""
    import fxcompress
    record = ToolRecord()
    inputs = example_input(size)
    start = time.perf_counter()
    try:
        record.params_before, record.macs_before = measure(model, inputs)
        result = fxcompress.compress(model, zoo_recipe(size, samples), example_inputs=inputs, progress=True,
                                     output_dir=workdir)
        record.params_after, record.macs_after = measure(result.model, inputs)
        record.status = "ok"
        return record, None
    except Exception as exc:  # every failure is recorded with its class and message
        record.status, record.error = "failed", _failure(exc)
        return record, exc
    finally:
        record.seconds = round(time.perf_counter() - start, 2)


def output_layers(analysis) -> list[str]:
    """Modules whose outputs are the model's outputs (the final classifier): never pruned."""
    return sorted({p.module for g in analysis.groups if any("model output" in r for r in g.frozen_by)
                   for p in g.producers if p.module is not None})


def prune_with_torch_pruning(model: nn.Module, example: torch.Tensor, ignored: list[str]) -> None:
    """torch-pruning's MetaPruner with GroupMagnitudeImportance removing 50% of the channels of every group of
    `model`, in place; the modules named in `ignored` keep their outputs."""
    import torch_pruning as tp
    tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[model.get_submodule(n) for n in ignored]).step()


def run_torch_pruning(model: nn.Module, size: int, ignored: list[str]) -> ToolRecord:
    """`prune_with_torch_pruning` recorded: sizes before/after, seconds, or the failure."""
    record = ToolRecord()
    inputs = example_input(size)
    start = time.perf_counter()
    try:
        record.params_before, record.macs_before = measure(model, inputs)
        prune_with_torch_pruning(model, inputs[0], ignored)
        with torch.no_grad():
            model(*inputs)
        record.params_after, record.macs_after = measure(model, inputs)
        record.status = "ok"
    except Exception as exc:  # torch-pruning's failures are data for the table, not errors of this script
        record.status, record.error = "failed", _failure(exc)
    record.seconds = round(time.perf_counter() - start, 2)
    return record


def run_model(name: str, tool: str, samples: int = CALIBRATION_SAMPLES) -> ZooRecord:
    """One tool (`fxcompress` or `torch_pruning`) on one model, in this process, with the channel analysis."""
    torch.manual_seed(0)
    size = input_size(name)
    record = ZooRecord(name, size)
    try:
        model = build_model(name)
        analysis = analyse_channels(record, model, (torch.randn(1, 3, size, size),))
    except Exception as exc:  # the model cannot be built or traced: recorded as the tool's failure
        setattr(record, tool, ToolRecord(status="failed", error=_failure(exc)))
        return record
    if tool == "fxcompress":
        with tempfile.TemporaryDirectory() as workdir:
            record.fxcompress, _ = run_fxcompress(model, size, Path(workdir), samples)
    else:
        record.torch_pruning = run_torch_pruning(model, size, output_layers(analysis))
    return record


def _run_isolated(name: str, tool: str, timeout: float, samples: int) -> ZooRecord:
    """`run_model` in a subprocess, so a hang or a crash on one model does not stop the run."""
    command = [sys.executable, __file__, "--one", name, "--tool", tool, "--samples", str(samples)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        seconds = round(time.perf_counter() - start, 1)
        where = last_progress(expired.stderr)
        return ZooRecord(name, input_size(name), **{tool: ToolRecord(
            "timeout", f"over {timeout:g} s" + (f", at: {where}" if where else ""), seconds=seconds)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return ZooRecord(name, input_size(name), **{tool: ToolRecord(
            "failed", f"process died (exit status {done.returncode}): {error[:300]}")})
    return record_from_dict(json.loads(lines[-1]))


def last_progress(stderr) -> str:
    """The last progress-bar state a timed-out run printed (pass, layers done, current layer)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    states = [part.strip() for part in text.replace("\r", "\n").splitlines() if "it/s" in part or "s/it" in part]
    return " ".join(states[-1].split())[:200] if states else ""


def compare(name: str, timeout: float, torch_pruning: bool, samples: int) -> ZooRecord:
    """Both tools on one model, each in its own subprocess under `timeout`."""
    record = _run_isolated(name, "fxcompress", timeout, samples)
    if torch_pruning:
        other = _run_isolated(name, "torch_pruning", timeout, samples)
        record.torch_pruning = other.torch_pruning
        if record.groups is None:
            record.groups, record.removable_groups = other.groups, other.removable_groups
            record.frozen_ops, record.no_rule = other.frozen_ops, other.no_rule
    return record


def record_from_dict(data: dict) -> ZooRecord:
    tools = {key: ToolRecord(**data.pop(key)) for key in ("fxcompress", "torch_pruning")}
    return ZooRecord(**data, **tools)


def _cell(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def to_markdown(records: list[ZooRecord]) -> str:
    """The table: one row per model, fxcompress and torch-pruning side by side, then the counts."""
    head = ["model", "input", "groups (removable)", "fxcompress", "params x", "MACs x", "s",
            "torch-pruning", "params x", "MACs x", "s", "frozen ops (excl. input/output)"]
    rows = []
    for r in records:
        fx_, tp_ = r.fxcompress, r.torch_pruning
        frozen = f"{len(r.frozen_ops)}: " + "; ".join(r.frozen_ops[:2]) + (" ..." if len(r.frozen_ops) > 2 else "") \
            if r.frozen_ops else "0"
        rows.append([r.model, r.input_size, f"{_cell(r.groups)} ({_cell(r.removable_groups)})",
                     _status(fx_), _cell(fx_.params_ratio), _cell(fx_.macs_ratio), _cell(fx_.seconds),
                     _status(tp_), _cell(tp_.params_ratio), _cell(tp_.macs_ratio), _cell(tp_.seconds),
                     frozen.replace("|", "/")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    lines += ["", f"fxcompress: {_counts(r.fxcompress for r in records)}",
              f"torch-pruning: {_counts(r.torch_pruning for r in records)}",
              "", "Ratios are before/after (x2.0 = half the parameters or MACs). Failures:", ""]
    for r in records:
        for tool, rec in (("fxcompress", r.fxcompress), ("torch-pruning", r.torch_pruning)):
            if rec.error:
                lines.append(f"- {r.model} / {tool}: {rec.error}")
    return "\n".join(lines) + "\n"


def _status(record: ToolRecord) -> str:
    return record.status if record.status != "failed" else f"failed ({(record.error or '').split(':')[0]})"


def _counts(records) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def write_results(records: list[ZooRecord], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) | {"fxcompress_ratios": {"params": r.fxcompress.params_ratio, "macs": r.fxcompress.macs_ratio},
                         "torch_pruning_ratios": {"params": r.torch_pruning.params_ratio,
                                                  "macs": r.torch_pruning.macs_ratio}} for r in records]
    (out / "zoo.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "zoo.md").write_text(to_markdown(records))


def previous_records(out: Path) -> dict[str, ZooRecord]:
    """The records of an earlier run in `out` (none if there is none), by model."""
    path = out / "zoo.json"
    if not path.exists():
        return {}
    return {data["model"]: record_from_dict({k: v for k, v in data.items() if not k.endswith("_ratios")})
            for data in json.loads(path.read_text())}


def in_zoo_order(records: dict[str, ZooRecord]) -> list[ZooRecord]:
    """The records in `zoo_models()` order (others after them, by name)."""
    order = {name: index for index, name in enumerate(zoo_models())}
    return sorted(records.values(), key=lambda r: (order.get(r.model, len(order)), r.model))


def _selected(models: list[str]) -> list[str]:
    if not models or models == ["all"]:
        return zoo_models()
    if models == ["ci"]:
        return list(CI_SUBSET)
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="model names, `ci`, or `all` (default)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model (both tools)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES,
                        help="synthetic calibration images (few samples leave late layers' statistics low-rank, "
                             "which inflates what low_rank removes after select_neurons)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' records already in OUT/zoo.json (run the zoo in parts)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=("fxcompress", "torch_pruning"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(asdict(run_model(args.one, args.tool, args.samples))))
        return 0
    records = previous_records(args.out) if args.merge else {}
    for name in _selected(args.models):
        record = compare(name, args.timeout, not args.no_torch_pruning, args.samples)
        if args.no_torch_pruning and name in records:  # --merge --no-torch-pruning re-runs the fxcompress rows only
            record.torch_pruning = records[name].torch_pruning
        records[name] = record
        print(f"{name}: fxcompress {_status(record.fxcompress)} ({_cell(record.fxcompress.seconds)} s), "
              f"torch-pruning {_status(record.torch_pruning)}", flush=True)
        write_results(in_zoo_order(records), args.out)
    print(f"\nwrote {args.out / 'zoo.md'} and {args.out / 'zoo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
