"""fxcompress: compress trained PyTorch networks by rewriting their torch.fx graphs.

A YAML recipe lists passes; `compress` traces a model, validates the recipe against it, and runs them.
"""
from .errors import DataError, FxCompressError, RecipeError, TraceError, VerificationError
from .registry import PassConfig, TargetedConfig, available_passes, register_pass
from .context import PassContext, register_analysis
from .graph.channels import channel_groups
from .graph.spectrum import layer_spectra, write_spectrum
from .trace import trace
from .recipe import Recipe, load_recipe
from .export import export_onnx
from .api import CompressionResult, compress, load, save

__version__ = "0.1.0"

__all__ = ["CompressionResult", "DataError", "FxCompressError", "PassConfig", "PassContext", "Recipe",
           "RecipeError", "TargetedConfig", "TraceError", "VerificationError", "available_passes", "channel_groups",
           "compress", "export_onnx", "layer_spectra", "load", "load_recipe", "register_analysis", "register_pass",
           "save", "trace", "write_spectrum"]
