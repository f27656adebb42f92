"""ONNX export through the dynamo exporter, written atomically and verified in onnxruntime."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FxCompressError, VerificationError


@dataclass
class ExportResult:
    path: str
    max_abs_error: float | None
    size_bytes: int


def _with_batch(inputs: tuple, batch: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if torch.is_floating_point(t):
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        else:
            out.append(t[:1].expand(shape).clone())
    return tuple(out)


def _flat_outputs(out) -> list[np.ndarray]:
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach().cpu().numpy() for t in flat if isinstance(t, torch.Tensor)]


def onnx_session(path: str | Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: tuple) -> list[np.ndarray]:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def check_parity(path: str | Path, model: nn.Module, inputs: tuple, *, rtol: float = 1e-3,
                 atol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| on `inputs`; raises VerificationError beyond `atol + rtol * max|torch|` on any
    output tensor.

    The bound scales with the output's largest magnitude, not with each element: the two runtimes sum in
    different orders in float32, so their difference is a rounding error of the sums, which is as large on an
    output element near zero as on the largest one (an elementwise bound rejected a compressed resnet50 with
    random weights over a 4.6e-4 difference)."""
    with torch.no_grad():
        expected = _flat_outputs(model(*inputs))
    got = run_onnx(onnx_session(path), inputs)
    if len(got) != len(expected):
        raise VerificationError(f"ONNX model has {len(got)} outputs, torch has {len(expected)}")
    worst = 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise VerificationError(f"ONNX output shape {g.shape} differs from torch {e.shape}")
        err = np.abs(e.astype(np.float64) - g.astype(np.float64))
        worst = max(worst, float(err.max()) if err.size else 0.0)
        if err.size and not float(err.max()) <= atol + rtol * float(np.abs(e).max()):
            raise VerificationError(f"onnxruntime output deviates from torch by up to {float(err.max()):.3g} "
                                    f"(atol {atol:g}, rtol {rtol:g})")
    return worst


def export_onnx(model: nn.Module, example_inputs: tuple, path: str | Path, *, verify: bool = True,
                dynamic_batch: bool = True, rtol: float = 1e-3, atol: float = 1e-4, seed: int = 0,
                opset: int | None = None) -> ExportResult:
    """Export `model` to `path` with `torch.onnx.export(..., dynamo=True)`.

    The file is written to a temporary name and renamed only after it passed verification, so a failed
    export leaves no partial file. With `verify`, onnxruntime runs it on fresh random inputs (another
    batch size when the batch is dynamic) and must match torch within `atol + rtol * |torch|`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example_inputs = tuple(example_inputs)
    model = model.eval()
    if dynamic_batch and example_inputs[0].shape[0] == 1:
        example_inputs = _with_batch(example_inputs, 2, seed)
    dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in example_inputs) if dynamic_batch else None
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=f".{path.stem}-", dir=path.parent)
    os.close(fd)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, example_inputs, tmp, dynamo=True, dynamic_shapes=dynamic_shapes,
                              opset_version=opset, external_data=False)
        error = None
        if verify:
            fresh = _with_batch(example_inputs, 3 if dynamic_batch else example_inputs[0].shape[0], seed + 1)
            error = check_parity(tmp, model, fresh, rtol=rtol, atol=atol)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except VerificationError:
        raise
    except Exception as exc:
        raise FxCompressError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ExportResult(str(path), error, path.stat().st_size)


def onnx_latency(path: str | Path, inputs: tuple, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time in seconds of one onnxruntime run on `inputs`."""
    session = onnx_session(path)
    for _ in range(warmup):
        run_onnx(session, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_onnx(session, inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare_latency(original: nn.Module, compressed_onnx: str | Path, example_inputs: tuple, *,
                    macs: tuple[int, int], batches: tuple[int, ...] = (1, 32), warmup: int = 3,
                    repeats: int = 20, seed: int = 0) -> list[dict]:
    """onnxruntime latency of `original` (exported to a temporary file) and of `compressed_onnx`.

    Both run on the same random inputs per batch size (the exports have a dynamic batch), alternating
    original / compressed after `warmup` runs each; the medians of `repeats` runs are compared. One row
    per batch size: ``{batch, original_ms, compressed_ms, speedup, macs_ratio}``, the last from
    ``macs = (MACs of the original, MACs of the compressed model)``.
    """
    macs_ratio = round(macs[0] / macs[1], 3) if macs[1] else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = export_onnx(original, example_inputs, Path(tmp) / "original.onnx", verify=False,
                                seed=seed).path
        for batch in batches:
            inputs = _with_batch(tuple(example_inputs), batch, seed + batch)
            before = onnx_latency(reference, inputs, warmup=warmup, repeats=repeats)
            after = onnx_latency(compressed_onnx, inputs, warmup=warmup, repeats=repeats)
            rows.append({"batch": batch, "original_ms": round(before * 1e3, 4),
                         "compressed_ms": round(after * 1e3, 4), "speedup": round(before / after, 3),
                         "macs_ratio": macs_ratio})
    return rows
