"""The built-in passes of fxcompress, one module each (installed as `fxcompress.passes`)."""
# importing a module registers its passes
from . import collapse, export_onnx, finetune, fold_batchnorm, lc, low_rank, select_neurons, sensitivity  # noqa: F401
