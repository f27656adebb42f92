"""Built-in data sources for recipes: scikit-learn digits, MNIST, ImageFolder, synthetic, or a callable.

Every source yields batches `(inputs, target)` (synthetic: bare input tensors) shaped to the recipe's
`input_shape`: images are resized (bilinear) to its height/width and repeated over its channels, or
flattened when the shape is `[N, features]`. `digits` and `mnist` use a deterministic 80/20 split
(seed 0): `split: train` is the first 80%, `split: test` the rest, `split: all` everything. Nothing
is ever downloaded.
"""
from __future__ import annotations

import gzip
import importlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, RecipeError
from .recipe import DataSource

MNIST_FILES = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
TRAIN_FRACTION = 0.8


def import_object(spec: str, *, field: str = "callable"):
    """Import `package.module:attribute`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"expected 'package.module:function', got '{spec}'", field=field)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"cannot import '{spec}': {exc}; is the package installed and on PYTHONPATH?",
                          field=field) from None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def mnist_arrays(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All MNIST idx files found under `root` (train set first), as uint8 images and labels."""
    root = Path(root)
    images, labels = [], []
    for img_stem, lbl_stem in MNIST_FILES:
        img, lbl = _find(root, img_stem), _find(root, lbl_stem)
        if img and lbl:
            images.append(_read_idx(img))
            labels.append(_read_idx(lbl))
    if not images:
        raise DataError(f"no MNIST idx files under '{root}': expected t10k-images-idx3-ubyte(.gz) and "
                        "t10k-labels-idx1-ubyte(.gz) (or the train-* pair); fxcompress never downloads")
    return np.concatenate(images), np.concatenate(labels)


def _split(n: int, split: str) -> np.ndarray:
    order = np.random.default_rng(0).permutation(n)
    cut = int(round(TRAIN_FRACTION * n))
    return {"train": order[:cut], "test": order[cut:], "all": order}[split]


def fit_images(images: torch.Tensor, input_shape) -> torch.Tensor:
    """Resize (N, 1, h, w) images to the recipe's input shape: (N, C, H, W) or flattened (N, F)."""
    if input_shape is None:
        return images
    if len(input_shape) == 4:
        _, c, h, w = input_shape
        if images.shape[-2:] != (h, w):
            images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        return images.expand(-1, c, -1, -1).contiguous()
    if len(input_shape) == 2:
        side = math.isqrt(input_shape[1])
        if side * side != input_shape[1]:
            raise DataError(f"input_shape {list(input_shape)} has {input_shape[1]} features: image sources need a "
                            "square number (e.g. 64 for 8x8 digits, 784 for 28x28)")
        if images.shape[-1] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        return images.reshape(len(images), -1)
    raise DataError(f"image sources need input_shape [N, C, H, W] or [N, features], got {list(input_shape)}")


def _batches(x: torch.Tensor, y: torch.Tensor | None, spec: DataSource, seed: int) -> list:
    if spec.samples is not None:
        x, y = x[:spec.samples], (y[:spec.samples] if y is not None else None)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if spec.shuffle \
        else torch.arange(len(x))
    out = []
    for start in range(0, len(x), spec.batch_size):
        idx = order[start:start + spec.batch_size]
        out.append((x[idx], y[idx]) if y is not None else x[idx])
    return out


def _digits(spec, input_shape, seed):
    from sklearn.datasets import load_digits
    data = load_digits()
    idx = _split(len(data.target), spec.split)
    images = torch.tensor(data.images[idx] / 16.0, dtype=torch.float32).unsqueeze(1)
    return _batches(fit_images(images, input_shape), torch.tensor(data.target[idx]), spec, seed)


def _mnist(spec, input_shape, seed):
    images, labels = mnist_arrays(spec.root)
    idx = _split(len(labels), spec.split)
    x = torch.tensor(images[idx], dtype=torch.float32).unsqueeze(1) / 255.0
    return _batches(fit_images(x, input_shape), torch.tensor(labels[idx], dtype=torch.int64), spec, seed)


def _imagefolder(spec, input_shape, seed):
    from torchvision import datasets, transforms
    size = tuple(input_shape[-2:]) if input_shape and len(input_shape) == 4 else (224, 224)
    dataset = datasets.ImageFolder(spec.root, transform=transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor()]))
    if spec.samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(spec.samples, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=spec.batch_size, shuffle=spec.shuffle,
                                       generator=torch.Generator().manual_seed(seed))


def _synthetic(spec, input_shape, seed):
    if input_shape is None:
        raise DataError("the synthetic source needs the recipe's input_shape")
    n = spec.samples or 256
    x = torch.randn((n, *input_shape[1:]), generator=torch.Generator().manual_seed(seed))
    return _batches(x, None, spec, seed)


def _callable(spec, input_shape, seed):
    return import_object(spec.callable)(**spec.options)


LOADERS = {"digits": _digits, "mnist": _mnist, "imagefolder": _imagefolder, "synthetic": _synthetic,
           "callable": _callable}


def check_source(spec: DataSource, field: str) -> None:
    """Fail before any work if a source cannot possibly load: missing root or unimportable callable."""
    if spec.source in ("mnist", "imagefolder"):
        if not spec.root:
            raise RecipeError(f"source '{spec.source}' needs `root:` (a local folder; nothing is downloaded)",
                              field=f"{field}.root")
        if not Path(spec.root).is_dir():
            raise RecipeError(f"root folder '{spec.root}' does not exist", field=f"{field}.root")
    if spec.source == "callable":
        if not spec.callable:
            raise RecipeError("source 'callable' needs `callable: package.module:function`", field=f"{field}.callable")
        import_object(spec.callable, field=f"{field}.callable")


def load_source(spec: DataSource, input_shape=None, seed: int = 0):
    """The batches of one recipe data source (a list, or a DataLoader for imagefolder)."""
    return LOADERS[spec.source](spec, input_shape, seed)
