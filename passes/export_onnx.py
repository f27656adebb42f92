"""export_onnx: write the current graph to ONNX and check it in onnxruntime (the graph is unchanged)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fxcompress import FxCompressError, PassConfig, register_pass
from fxcompress.export import compare_latency, export_onnx as export


class ExportOnnxConfig(PassConfig):
    path: str = Field("model.onnx", description="output file; relative paths go to the run's output folder")
    verify: bool = Field(True, description="run the file in onnxruntime and compare with torch")
    dynamic_batch: bool = True
    rtol: float = Field(1e-3, ge=0, description="parity tolerance relative to each output's largest magnitude")
    atol: float = Field(1e-4, ge=0, description="absolute parity tolerance added to rtol's")
    opset: int | None = None
    latency: bool = Field(False, description="also time the original and the exported model in onnxruntime")
    latency_batches: list[int] = Field([1, 32], min_length=1, description="batch sizes timed")
    latency_repeats: int = Field(20, ge=1, description="timed runs per batch size (the median is reported)")


@register_pass("export_onnx", config=ExportOnnxConfig, exact=True, output_only=True)
def export_onnx(gm, ctx, config):
    """Export to ONNX (dynamo exporter, dynamic batch), verified in onnxruntime, written atomically."""
    path = Path(config.path)
    if not path.is_absolute() and ctx.output_dir is not None:
        path = Path(ctx.output_dir) / path
    result = export(gm, ctx.example_inputs, path, verify=config.verify, dynamic_batch=config.dynamic_batch,
                    rtol=config.rtol, atol=config.atol, seed=ctx.seed, opset=config.opset)
    ctx.state.setdefault("onnx_paths", []).append(result.path)
    error = "" if result.max_abs_error is None else f", onnxruntime max |error| {result.max_abs_error:.3g}"
    ctx.note(f"wrote {config.path} ({result.size_bytes:,} bytes{error})")
    if config.latency:
        record_latency(gm, ctx, result.path, config.latency_batches, config.latency_repeats)
    return gm


def record_latency(gm, ctx, onnx_path, batches, repeats) -> None:
    """Put onnxruntime latency of the original vs the exported model, beside the MACs ratio, in the report."""
    if ctx.original is None:
        raise FxCompressError("latency needs the original model: run the pass through fxcompress.compress")
    macs = (sum(row["macs"] for row in ctx.report.layers_before), sum(c.macs for c in ctx.analysis("cost", gm)))
    rows = compare_latency(ctx.original(), onnx_path, ctx.example_inputs, macs=macs, batches=tuple(batches),
                           repeats=repeats, seed=ctx.seed)
    for row in rows:
        ctx.note(f"onnxruntime latency at batch {row['batch']}: original {row['original_ms']:.3f} ms, "
                 f"compressed {row['compressed_ms']:.3f} ms (speedup x{row['speedup']}, "
                 f"MACs ratio x{row['macs_ratio']})")
    ctx.report.metrics["onnx_latency"] = rows
