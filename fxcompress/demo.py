"""`fxcompress demo`: train LeNet-300-100 on scikit-learn's digits, compress it with a recipe, export ONNX."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .api import compress, save
from .data import load_source
from .export import export_onnx
from .models import build_model
from .recipe import DataSource, load_recipe
from .training import accuracy, train


def run_demo(out: Path, recipe: str = "demo", progress: bool = True, epochs: int = 40):
    """Train, compress with `recipe`, save and export into `out`; print the report. Returns the result."""
    recipe = load_recipe(recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model or "lenet300", recipe.input_shape)
    train_batches = load_source(DataSource(source="digits", split="train", batch_size=64, shuffle=True),
                                recipe.input_shape, recipe.seed)
    test_batches = load_source(DataSource(source="digits", split="test", batch_size=256), recipe.input_shape)
    train(model, train_batches, epochs=epochs, lr=1e-3, progress=progress, desc="train LeNet-300-100 on digits")
    print(f"trained {type(model).__name__} on digits: test accuracy {accuracy(model, test_batches):.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        torch.save(model.state_dict(), tmp / "weights.pt")
        result = compress(model, recipe, progress=progress, output_dir=tmp)
        save(result, tmp)
        if not (tmp / "model.onnx").exists():
            export_onnx(result.model, result.example_inputs, tmp / "model.onnx")
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(result.report.summary())
    print(f"\nwrote {out}/: weights.pt (trained), model.pt, model.onnx, report.json, report.md, recipe.yaml")
    return result
