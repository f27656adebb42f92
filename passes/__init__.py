"""The built-in passes of fxcompress, one module each (installed as `fxcompress.passes`)."""
from . import export_onnx, fold_batchnorm, lc  # noqa: F401  (importing registers the passes)
