"""Singular-value spectra of the Linear / Conv1d / Conv2d weights of a graph (the `spectrum` analysis).

A weight is read as the matrix a low-rank factorisation approximates (seed 001 sections 12.1.2 and
13.1.5): a Linear weight as it is (out x in), a convolution weight as out_channels x
(in_channels/groups * kernel numel).  A grouped convolution is block diagonal, one block per group,
so its spectrum is the union of the groups' spectra (sorted); ``weight_matrices`` returns the blocks.

Per layer the analysis reports, after seed 001 section 15.1 ("Singular Value Spectrum Analysis"):

* ``singular_values`` s_1 >= s_2 >= ... >= s_p, p = min(m, n) per group;
* ``cumulative_energy[k-1]`` = sum_{i<=k} s_i^2 / sum_i s_i^2, the fraction of the squared Frobenius
  norm kept by the best rank-k approximation (Eckart-Young);
* ``energy_ranks``: the smallest k whose cumulative energy reaches 70, 80, 90, 95 and 99 % (the
  energy-retention rule of seed 001 sections 13 and 15, ``rank_for_energy``);
* ``condition_number`` s_1 / s_p (``inf`` when s_p = 0);
* ``effective_rank``, the entropy-based effective rank of Roy and Vetterli (2007): with
  p_i = s_i / sum_j s_j, erank = exp(-sum_i p_i log p_i) (terms with p_i = 0 count 0).  It is 1
  for a rank-one matrix, k for k equal non-zero singular values, and in between otherwise: a
  continuous "number of significant directions" that needs no threshold.

``write_spectrum`` saves the spectra as JSON (an infinite condition number as null) and plots them
(matplotlib, Agg backend) to a PNG.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx, nn

from ..context import register_analysis
from ..solvers.randomized_svd import rank_for_energy
from ..targets import candidate_modules

__all__ = ["ENERGY_LEVELS", "FACTORISABLE", "LayerSpectrum", "layer_spectra", "layer_spectrum", "spectrum_stats",
           "weight_matrices", "write_spectrum"]

FACTORISABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
ENERGY_LEVELS = (0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class LayerSpectrum:
    """The spectrum of one layer's weight matrix and the numbers derived from it (module docstring)."""
    name: str
    type: str
    shape: tuple[int, int]
    groups: int
    singular_values: list[float]
    cumulative_energy: list[float]
    energy_ranks: dict[str, int]
    condition_number: float
    effective_rank: float


def weight_matrices(module: nn.Module) -> list[torch.Tensor]:
    """The weight of a Linear/Conv1d/Conv2d as one matrix per group: out/groups x (in/groups * kernel).

    The column order is that of ``weight.reshape(out, -1)`` (input channel major, then kernel
    offsets), the order in which ``fxcompress.stats`` unfolds convolution inputs.
    """
    if not isinstance(module, FACTORISABLE):
        raise TypeError(f"{type(module).__name__} has no weight matrix to factorise; "
                        "supported: Linear, Conv1d, Conv2d")
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return list(weight.reshape(weight.shape[0], -1).chunk(groups, dim=0))


def spectrum_stats(singular_values) -> dict:
    """Cumulative energy, energy ranks, condition number and effective rank of a spectrum.

    ``singular_values`` is any 1-D collection of non-negative numbers; it is sorted in decreasing
    order here.  Returns a dict with the keys of ``LayerSpectrum`` from ``singular_values`` on.
    """
    s = torch.sort(torch.as_tensor(singular_values, dtype=torch.float64).flatten(), descending=True).values
    if s.numel() == 0 or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("a spectrum is a non-empty list of finite, non-negative singular values")
    power = s.square()
    total = float(power.sum())
    cumulative = (power.cumsum(0) / total) if total > 0 else torch.ones_like(s)
    return {
        "singular_values": s.tolist(),
        "cumulative_energy": cumulative.tolist(),
        "energy_ranks": {f"{level:g}": rank_for_energy(s, level) for level in ENERGY_LEVELS},
        "condition_number": float(s[0] / s[-1]) if s[-1] > 0 else math.inf,
        "effective_rank": _effective_rank(s),
    }


def _effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of s / sum(s) (Roy and Vetterli); 0 for an all-zero spectrum."""
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def layer_spectrum(name: str, module: nn.Module) -> LayerSpectrum:
    """The ``LayerSpectrum`` of one Linear/Conv1d/Conv2d (union of its groups' spectra)."""
    blocks = weight_matrices(module)
    values = torch.cat([torch.linalg.svdvals(b.to(torch.float64)) for b in blocks])
    rows, cols = blocks[0].shape
    return LayerSpectrum(name=name, type=type(module).__name__, shape=(rows * len(blocks), cols),
                         groups=len(blocks), **spectrum_stats(values))


def layer_spectra(model: nn.Module, names: list[str] | None = None) -> list[LayerSpectrum]:
    """Spectra of the named layers of ``model`` (default: every Linear/Conv1d/Conv2d, in module order)."""
    if names is None:
        names = [name for name, _ in candidate_modules(model, FACTORISABLE)]
    return [layer_spectrum(name, model.get_submodule(name)) for name in names]


@register_analysis("spectrum")
def _spectrum(gm: fx.GraphModule, ctx) -> list[LayerSpectrum]:
    return layer_spectra(gm)


def write_spectrum(spectra: list[LayerSpectrum], path: str | Path) -> tuple[Path, Path]:
    """Write ``spectra`` to ``path`` (JSON) and their plot next to it (same name, ``.png``).

    The plot has two panels: s_i / s_1 against i (log scale) and the cumulative energy against the
    rank as a fraction of min(m, n), one line per layer, with the energy levels drawn as guides.
    Returns the two paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [asdict(s) | {"condition_number": _finite_or_none(s.condition_number)} for s in spectra]
    payload = {"energy_levels": list(ENERGY_LEVELS), "layers": layers}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    png = path.with_suffix(".png")
    _plot(spectra, png)
    return path, png


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an infinite condition number (singular matrix) is written as null."""
    return value if math.isfinite(value) else None


def _plot(spectra: list[LayerSpectrum], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure, (decay, energy) = plt.subplots(1, 2, figsize=(11, 4.2))
    for spectrum in spectra:
        s = torch.tensor(spectrum.singular_values)
        index = torch.arange(1, s.numel() + 1)
        top = float(s[0]) or 1.0
        decay.semilogy(index, (s / top).clamp(min=1e-12), label=spectrum.name)
        energy.plot(index / s.numel(), spectrum.cumulative_energy, label=spectrum.name)
    for level in ENERGY_LEVELS:
        energy.axhline(level, color="0.8", linewidth=0.6, zorder=0)
    decay.set(xlabel="index i", ylabel="s_i / s_1", title="normalised singular values")
    energy.set(xlabel="rank / min(m, n)", ylabel="cumulative energy", title="energy kept at each rank",
               ylim=(0, 1.01))
    if len(spectra) <= 12:
        energy.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
