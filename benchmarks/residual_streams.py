"""Residual streams shrink: resnet50 and mobilenet_v2 at 64x64 with `keep: 0.5` everywhere, ONNX latency.

For each model (random weights, eval mode, synthetic calibration images), fxcompress runs
``fold_batchnorm``, ``select_neurons {keep: 0.5, residual: joint}`` (every reader of a residual stream
solved as one group lasso, so the stream keeps one channel set), ``collapse`` and ``export_onnx`` with
onnxruntime parity and latency (original vs compressed, median of repeated runs at batch 1 and 32).
Side by side, torch-pruning's ``MetaPruner`` with ``GroupMagnitudeImportance`` at ratio 0.5 (the final
classifier ignored), exported and timed the same way.

Recorded per model and tool: parameters and MACs before/after (``fxcompress.graph.cost``), the MACs
drop, Gathers (Selectors) left in the graph, seconds, and the onnxruntime speedup per batch size.
The issue's target: the MACs of the collapsed model fall by at least 40% and its ONNX runs faster.

    python benchmarks/residual_streams.py                 # resnet50 and mobilenet_v2
    python benchmarks/residual_streams.py --models mobilenet_v2 --samples 64 --repeats 50
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxcompress
import zoo
from fxcompress.export import compare_latency, export_onnx
from fxcompress.selector import Selector

RESULTS = Path(__file__).resolve().parent / "results"


def recipe(size: int, samples: int, repeats: int) -> dict:
    return {
        "fxcompress": 1, "input_shape": [1, 3, size, size], "seed": 0, "verify": True,
        "data": {"calibration": {"source": "synthetic", "samples": samples, "batch_size": 8}},
        "passes": [
            "fold_batchnorm",
            {"select_neurons": {"keep": 0.5, "residual": "joint"}},
            "collapse",
            {"export_onnx": {"path": "model.onnx", "latency": True, "latency_repeats": repeats}},
        ],
    }


def _row(tool, before, after, seconds, gathers, latency) -> dict:
    (params0, macs0), (params1, macs1) = before, after
    return {"tool": tool, "params_before": params0, "params_after": params1, "macs_before": macs0,
            "macs_after": macs1, "macs_drop": round(1 - macs1 / macs0, 4), "gathers_left": gathers,
            "seconds": round(seconds, 1), "latency": latency}


def run_fxcompress(name: str, size: int, samples: int, repeats: int) -> dict:
    model = zoo.build_model(name)
    inputs = zoo.example_input(size)
    before = zoo.measure(model, inputs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = fxcompress.compress(model, recipe(size, samples, repeats), example_inputs=inputs,
                                     progress=False, output_dir=out)
    seconds = time.perf_counter() - start
    gathers = sum(isinstance(m, Selector) for m in result.model.modules())
    return _row("fxcompress", before, zoo.measure(result.model, inputs), seconds, gathers,
                result.report.metrics["onnx_latency"])


def run_torch_pruning(name: str, size: int, repeats: int) -> dict:
    model = zoo.build_model(name)
    inputs = zoo.example_input(size)
    ignored = zoo.output_layers(fxcompress.channel_groups(fxcompress.trace(model), inputs))
    before = zoo.measure(model, inputs)
    original = copy.deepcopy(model)
    start = time.perf_counter()
    zoo.prune_with_torch_pruning(model, inputs[0], ignored)
    seconds = time.perf_counter() - start
    after = zoo.measure(model, inputs)
    with tempfile.TemporaryDirectory() as out:
        path = export_onnx(model, inputs, Path(out) / "pruned.onnx").path
        latency = compare_latency(original, path, inputs, macs=(before[1], after[1]), repeats=repeats)
    return _row("torch-pruning", before, after, seconds, 0, latency)


def to_markdown(rows: list[dict]) -> str:
    head = ["model", "tool", "params", "MACs", "MACs drop", "Gathers left", "s", "ORT speedup b1", "ORT speedup b32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = {row["batch"]: row for row in r["latency"]}
        cells = [r["model"], r["tool"], f"{r['params_before']:,} -> {r['params_after']:,}",
                 f"{r['macs_before']:,} -> {r['macs_after']:,}", f"{100 * r['macs_drop']:.1f}%", r["gathers_left"],
                 r["seconds"]] + [f"x{speed[b]['speedup']} ({speed[b]['original_ms']:.2f} -> "
                                  f"{speed[b]['compressed_ms']:.2f} ms)" if b in speed else "-" for b in (1, 32)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32, help="synthetic calibration images")
    parser.add_argument("--repeats", type=int, default=30, help="timed onnxruntime runs per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for run in (lambda: run_fxcompress(name, args.size, args.samples, args.repeats),
                    lambda: run_torch_pruning(name, args.size, args.repeats)):
            row = {"model": name} | run()
            rows.append(row)
            print(f"{name} / {row['tool']}: MACs -{100 * row['macs_drop']:.1f}%, "
                  f"{row['gathers_left']} Gathers, {row['seconds']} s, latency {row['latency']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "residual_streams.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "residual_streams.md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
