"""export_onnx: write the current graph to ONNX and check it in onnxruntime (the graph is unchanged)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fxcompress import PassConfig, register_pass
from fxcompress.export import export_onnx as export


class ExportOnnxConfig(PassConfig):
    path: str = Field("model.onnx", description="output file; relative paths go to the run's output folder")
    verify: bool = Field(True, description="run the file in onnxruntime and compare with torch")
    dynamic_batch: bool = True
    rtol: float = Field(1e-3, ge=0)
    atol: float = Field(1e-4, ge=0)
    opset: int | None = None


@register_pass("export_onnx", config=ExportOnnxConfig, exact=True)
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
    return gm
