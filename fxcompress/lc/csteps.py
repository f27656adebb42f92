"""C steps of the LC algorithm: compression mappings Pi and decompression mappings Delta.

Seed 002 (Carreira-Perpinan, *Model compression as constrained optimization*) section 3.1 defines
the compression mapping as the orthogonal projection on the feasible set,

    Pi(w) = argmin_Theta ||w - Delta(Theta)||^2,                                    (eq. 2)

and section 4 uses it in the C step, Theta = Pi(w - lambda/mu) (eq. 10).  Every C step here solves
that problem *exactly* (up to floating point), except `additive`, whose alternating solution is a
documented approximation.  Penalty forms (section 3.3, eq. 3-4) instead solve

    argmin_Theta  alpha * C(Theta) + mu/2 ||w - Delta(Theta)||^2,

which is why `compress` receives mu; constraint forms ignore it.

A C step acts on a *list* of weight tensors that share one compression (one codebook, one kappa,
one scale...); callers wanting per-layer compression make one task per layer.  Theta is a plain dict
of tensors, numbers and lists, so `torch.save`/`torch.load(weights_only=True)` checkpoint it.

Add your own with::

    @register_cstep("my_step")
    class MyStep(CStep):
        def __init__(self, *, strength: float = 1.0): ...
        def compress(self, weights, mu): ...
        def decompress(self, theta): ...
        def storage_bits(self, theta): ...

and build any C step by name with `make_cstep("my_step", strength=2.0)`.
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CStep", "register_cstep", "make_cstep", "available_csteps",
    "AdaptiveQuantization", "FixedCodebook", "Binarize", "Ternarize",
    "L0Pruning", "L1Pruning", "L0PenaltyPruning", "L1PenaltyPruning",
    "LowRank", "LowRankSelection", "Additive",
    "kmeans1d_exact", "kmeans1d_lloyd", "project_l1_ball", "csr_bits",
]

FLOAT_BITS = 32

# ----------------------------------------------------------------------------- base and registry


class CStep:
    """A compression mapping Pi (`compress`) with its decompression Delta (`decompress`).

    `compress(weights, mu)` returns Theta for a list of weight tensors; `decompress(theta)` returns
    tensors of the same shapes and dtype; `storage_bits(theta)` counts what must be stored to
    rebuild them (weights plus codebooks, indices, masks: seed 002 section 3.2, "we need to add two
    costs").  `penalty_form` is True when `compress` minimises a penalty that depends on mu.
    `codebook_form` is True when Theta holds "codebook" (K values) and "indices" (one integer
    tensor per weight) with Delta(Theta) = codebook[indices]: such results deploy as the Codebook
    modules of `fxcompress.lc.modules`.  `factor_form` is True when Theta holds "factors", one
    (U, V) pair per weight with Delta = reshape(U V^T): such results deploy as two-layer factorised
    modules (the `low_rank` pass's rewrite).
    """

    name: str = ""
    penalty_form: bool = False
    codebook_form: bool = False
    factor_form: bool = False

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        raise NotImplementedError

    def decompress(self, theta: dict) -> list[Tensor]:
        raise NotImplementedError

    def storage_bits(self, theta: dict) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_CSTEPS: dict[str, type[CStep]] = {}


def register_cstep(name: str) -> Callable[[type[CStep]], type[CStep]]:
    """Class decorator registering a `CStep` subclass under `name` for `make_cstep`."""
    def decorate(cls: type[CStep]) -> type[CStep]:
        if not (isinstance(cls, type) and issubclass(cls, CStep)):
            raise TypeError(f"C step {name!r} must be a subclass of CStep")
        if name in _CSTEPS and _CSTEPS[name] is not cls:
            raise ValueError(f"a C step named {name!r} is already registered ({_CSTEPS[name].__name__})")
        cls.name = name
        _CSTEPS[name] = cls
        return cls
    return decorate


def available_csteps() -> list[str]:
    """Names accepted by `make_cstep`, sorted."""
    return sorted(_CSTEPS)


def make_cstep(name: str, **options) -> CStep:
    """Build the C step registered as `name` with its keyword `options`.

    Raises ValueError for an unknown name, an unknown option or an invalid option value.
    """
    if name not in _CSTEPS:
        close = difflib.get_close_matches(name, _CSTEPS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown C step '{name}'{hint}; known C steps: {', '.join(available_csteps())}")
    cls = _CSTEPS[name]
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"C step '{name}' has no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(accepted) or 'none'}")
    return cls(**options)


# ----------------------------------------------------------------------------- helpers


def _flat(weights: list[Tensor]) -> Tensor:
    """All weights as one float64 vector (joint compression of several tensors)."""
    if not weights:
        raise ValueError("a C step needs at least one weight tensor")
    return torch.cat([w.detach().reshape(-1).to(torch.float64) for w in weights])


def _split(flat: Tensor, like: list[Tensor], *, keep_dtype: bool = True) -> list[Tensor]:
    """Inverse of `_flat`: pieces shaped like `like` (and cast to its dtypes with `keep_dtype`)."""
    out, start = [], 0
    for w in like:
        piece = flat[start:start + w.numel()].reshape(w.shape)
        out.append(piece.to(w.dtype) if keep_dtype else piece)
        start += w.numel()
    return out


def _dtype(name: str) -> torch.dtype:
    """The torch dtype written as `str(dtype)` in a Theta."""
    return getattr(torch, name.removeprefix("torch."))


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"option '{name}' must be a finite number {bound}, got {value!r}")


def _index_bits(k: int) -> int:
    """Bits of one index into a codebook of k entries."""
    return math.ceil(math.log2(k)) if k > 1 else 0


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(rows, cols) of a weight seen as a matrix: conv weights become out x (in*kh*kw)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def csr_bits(dense: Tensor, value_bits: int = FLOAT_BITS) -> int:
    """Compressed-sparse-row storage of `dense` seen as a matrix (seed 003, appendix 5.2).

    nnz * (value_bits + ceil(log2 cols)) for the values and their column indices, plus one
    per-row nonzero count of ceil(log2(cols + 1)) bits per row (the row pointers).
    """
    rows, cols = _matrix_shape(dense.shape)
    nnz = int(torch.count_nonzero(dense))
    return nnz * (value_bits + _index_bits(cols)) + rows * math.ceil(math.log2(cols + 1))


# ----------------------------------------------------------------------------- 1-D k-means


def _nearest(values: Tensor, sorted_codebook: Tensor) -> Tensor:
    """Index of the nearest entry of an ascending codebook for every value (ties go down)."""
    mid = (sorted_codebook[1:] + sorted_codebook[:-1]) / 2
    return torch.bucketize(values, mid, right=False)


def kmeans1d_exact(x: Tensor, k: int) -> Tensor:
    """Globally optimal 1-D k-means codebook (ascending, k entries) of the values `x`.

    Dynamic programming over the sorted distinct values (Wang & Song's Ckmeans.1d.dp): D[m][i] is
    the least distortion of the i smallest values with m clusters, D[m][i] = min_j D[m-1][j] +
    cost(j, i).  The optimal split j is monotone in i, so each layer is solved by divide and
    conquer, vectorised one recursion level at a time: O(k * n log n) with n distinct values.
    If there are at most k distinct values they are the codebook (zero distortion, padded by
    repetition).
    """
    values, counts = torch.unique(x.detach().reshape(-1).to(torch.float64), sorted=True, return_counts=True)
    if values.numel() <= k:
        return torch.cat([values, values[-1:].expand(k - values.numel())])
    v = values.numpy()
    c = counts.to(torch.float64).numpy()
    shift = float(np.average(v, weights=c))
    s0 = np.concatenate([[0.0], np.cumsum(c)])
    s1 = np.concatenate([[0.0], np.cumsum(c * (v - shift))])
    s2 = np.concatenate([[0.0], np.cumsum(c * (v - shift) ** 2)])

    def cost(j: np.ndarray, i: np.ndarray) -> np.ndarray:
        d1 = s1[i] - s1[j]
        return s2[i] - s2[j] - d1 * d1 / (s0[i] - s0[j])

    n = v.size
    cols = np.arange(n + 1)
    prev = np.full(n + 1, np.inf)
    prev[1:] = cost(np.zeros(n, dtype=np.int64), cols[1:])
    splits = [np.zeros(n + 1, dtype=np.int64)]
    for m in range(2, k + 1):
        cur, opt = _dp_layer(prev, cost, m, n)
        splits.append(opt)
        prev = cur
    bounds = [n]
    for m in range(k - 1, -1, -1):
        bounds.append(int(splits[m][bounds[-1]]))
    bounds = bounds[::-1]
    centroids = [float(np.average(v[a:b], weights=c[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.tensor(centroids, dtype=torch.float64)


def _dp_layer(prev: np.ndarray, cost, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer D[m][i] = min_{j in [m-1, i-1]} prev[j] + cost(j, i) for i in [m, n].

    Divide and conquer on the monotone optimal split, all segments of a recursion level at once.
    """
    cur = np.full(n + 1, np.inf)
    opt = np.zeros(n + 1, dtype=np.int64)
    lo, hi = np.array([m]), np.array([n])
    olo, ohi = np.array([m - 1]), np.array([n - 1])
    while lo.size:
        mid = (lo + hi) // 2
        first, last = olo, np.minimum(ohi, mid - 1)
        length = last - first + 1
        starts = np.cumsum(length) - length
        seg = np.repeat(np.arange(lo.size), length)
        j = np.repeat(first, length) + np.arange(length.sum()) - np.repeat(starts, length)
        val = prev[j] + cost(j, mid[seg])
        best = np.minimum.reduceat(val, starts)
        hits = np.flatnonzero(val <= best[seg])
        hits = hits[np.concatenate([[True], seg[hits][1:] != seg[hits][:-1]])]
        arg = j[hits]
        cur[mid], opt[mid] = best, arg
        left, right = lo <= mid - 1, mid + 1 <= hi
        lo, hi, olo, ohi = (np.concatenate([lo[left], mid[right] + 1]),
                            np.concatenate([mid[left] - 1, hi[right]]),
                            np.concatenate([olo[left], arg[right]]),
                            np.concatenate([arg[left], ohi[right]]))
    return cur, opt


def kmeans1d_lloyd(x: Tensor, k: int, *, seed: int = 0, max_iter: int = 100) -> Tensor:
    """1-D k-means codebook (ascending) by Lloyd's algorithm from a seeded k-means++ start.

    A local optimum only; use `kmeans1d_exact` for the global one.  Empty clusters keep their
    centroid.  Deterministic for a given seed.
    """
    values = x.detach().reshape(-1).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    chosen = [values[torch.randint(values.numel(), (1,), generator=gen)]]
    d2 = (values - chosen[0]) ** 2
    for _ in range(1, k):
        pick = values[torch.multinomial(d2, 1, generator=gen)] if float(d2.sum()) > 0 else chosen[0]
        chosen.append(pick)
        d2 = torch.minimum(d2, (values - pick) ** 2)
    centroids = torch.cat(chosen).sort().values
    assign = None
    for _ in range(max_iter):
        new_assign = _nearest(values, centroids)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, values)
        sizes = torch.bincount(assign, minlength=k).to(torch.float64)
        centroids = torch.where(sizes > 0, sums / sizes.clamp(min=1), centroids).sort().values
    return centroids


# ----------------------------------------------------------------------------- quantization


def _codebook_theta(codebook: Tensor, flat_indices: Tensor, weights: list[Tensor]) -> dict:
    return {"codebook": codebook, "indices": _split(flat_indices, weights, keep_dtype=False),
            "dtypes": [str(w.dtype) for w in weights]}


class _CodebookStep(CStep):
    """Theta = {"codebook": (K,) float64 tensor, "indices": [int64 tensor per weight], "dtypes"}.

    Delta(Theta)_i = codebook[index_i] (seed 002 section 3.2, "Quantization").  Storage is
    ceil(log2 K) bits per weight plus the codebook (`_codebook_bits`).
    """

    codebook_form = True

    def _codebook_bits(self, k: int) -> int:
        return k * FLOAT_BITS

    def _codebook(self, flat: Tensor, mu: float) -> Tensor:
        raise NotImplementedError

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        flat = _flat(weights)
        codebook = self._codebook(flat, mu).sort().values
        return _codebook_theta(codebook, _nearest(flat, codebook), weights)

    def decompress(self, theta: dict) -> list[Tensor]:
        cb = theta["codebook"]
        return [cb[idx].to(_dtype(dt)) for idx, dt in zip(theta["indices"], theta["dtypes"])]

    def storage_bits(self, theta: dict) -> int:
        k = theta["codebook"].numel()
        n = sum(idx.numel() for idx in theta["indices"])
        return n * _index_bits(k) + self._codebook_bits(k)


@register_cstep("quantize")
class AdaptiveQuantization(_CodebookStep):
    """Quantization with a learned codebook of `k` values: 1-D k-means (seed 002 sections 3.2, 6.1).

    `exact=True` solves k-means globally by dynamic programming (`kmeans1d_exact`), so the C step
    is the exact projection; `exact=False` runs Lloyd from a k-means++ start seeded by `seed`.
    """

    def __init__(self, *, k: int, exact: bool = True, seed: int = 0, max_iter: int = 100):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"option 'k' (codebook size) must be an integer >= 1, got {k!r}")
        if not isinstance(exact, bool):
            raise ValueError(f"option 'exact' must be true or false, got {exact!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"option 'max_iter' must be an integer >= 1, got {max_iter!r}")
        self.k, self.exact, self.seed, self.max_iter = k, exact, seed, max_iter

    def _codebook(self, flat: Tensor, mu: float) -> Tensor:
        if self.exact:
            return kmeans1d_exact(flat, self.k)
        return kmeans1d_lloyd(flat, self.k, seed=self.seed, max_iter=self.max_iter)


@register_cstep("fixed_codebook")
class FixedCodebook(_CodebookStep):
    """Quantization onto a given codebook: each weight rounds to its nearest value (seed 002 3.2)."""

    def __init__(self, *, codebook: list[float]):
        values = list(codebook) if isinstance(codebook, (list, tuple)) else None
        if not values or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in values):
            raise ValueError(f"option 'codebook' must be a non-empty list of finite numbers, got {codebook!r}")
        self.codebook = torch.tensor(sorted(set(values)), dtype=torch.float64)

    def _codebook(self, flat: Tensor, mu: float) -> Tensor:
        return self.codebook


@register_cstep("binarize")
class Binarize(_CodebookStep):
    """Binarization: w in {-1, +1}, or {-a, +a} with a learned scale a when `scale=True`.

    Seed 002 section 3.2: Pi sets theta_i = sgn(w_i) (sgn(0) = +1 here).  With a scale, for fixed
    signs the best a is mean(|w|) (Carreira-Perpinan & Idelbayev 2017a, the quantization part of
    the seed's series), and sgn(w) is optimal for any a >= 0, so the closed form is exact.
    """

    def __init__(self, *, scale: bool = False):
        if not isinstance(scale, bool):
            raise ValueError(f"option 'scale' must be true or false, got {scale!r}")
        self.scale = scale

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        flat = _flat(weights)
        a = float(flat.abs().mean()) if self.scale else 1.0
        return _codebook_theta(torch.tensor([-a, a], dtype=torch.float64), (flat >= 0).to(torch.int64), weights)

    def _codebook_bits(self, k: int) -> int:
        return FLOAT_BITS if self.scale else 0


@register_cstep("ternarize")
class Ternarize(_CodebookStep):
    """Ternarization: w in {-1, 0, +1}, or {-a, 0, +a} with a learned scale a when `scale=True`.

    Without scale, Pi rounds to the nearest of -1, 0, 1.  With a scale, the optimum keeps the j
    largest |w_i| (signs kept) at magnitude a = mean of those j magnitudes and zeroes the rest,
    where j maximises (sum of the j largest |w_i|)^2 / j (the squared error is ||w||^2 minus that
    quantity); the closed form of the quantization paper of the seed's series.
    """

    def __init__(self, *, scale: bool = False):
        if not isinstance(scale, bool):
            raise ValueError(f"option 'scale' must be true or false, got {scale!r}")
        self.scale = scale

    def _codebook(self, flat: Tensor, mu: float) -> Tensor:
        return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        if not self.scale:
            return super().compress(weights, mu)
        flat = _flat(weights)
        order = flat.abs().argsort(descending=True, stable=True)
        sums = flat.abs()[order].cumsum(0)
        kept = int(torch.argmax(sums ** 2 / torch.arange(1, flat.numel() + 1, dtype=torch.float64))) + 1
        a = float(sums[kept - 1]) / kept
        indices = torch.ones_like(flat, dtype=torch.int64)
        indices[order[:kept]] = torch.where(flat[order[:kept]] >= 0, 2, 0)
        return _codebook_theta(torch.tensor([-a, 0.0, a], dtype=torch.float64), indices, weights)

    def _codebook_bits(self, k: int) -> int:
        return FLOAT_BITS if self.scale else 0


# ----------------------------------------------------------------------------- pruning


class _DenseStep(CStep):
    """Theta = {"weights": [dense tensor per weight]}: Delta is the identity on the kept values.

    Pruning (seed 002 section 3.2): w = Delta(theta) = theta with theta sparse.  Storage is CSR
    per tensor (`csr_bits`, seed 003 appendix 5.2).
    """

    def __init__(self, value_bits: int):
        if isinstance(value_bits, bool) or not isinstance(value_bits, int) or value_bits < 1:
            raise ValueError(f"option 'value_bits' must be an integer >= 1, got {value_bits!r}")
        self.value_bits = value_bits

    def decompress(self, theta: dict) -> list[Tensor]:
        return [w.clone() for w in theta["weights"]]

    def storage_bits(self, theta: dict) -> int:
        return sum(csr_bits(w, self.value_bits) for w in theta["weights"])


def _keep_largest(flat: Tensor, kappa: int) -> Tensor:
    """`flat` with all but its kappa largest-magnitude entries set to zero."""
    out = torch.zeros_like(flat)
    if kappa > 0:
        idx = torch.topk(flat.abs(), min(kappa, flat.numel()), sorted=False).indices
        out[idx] = flat[idx]
    return out


@register_cstep("prune_l0")
class L0Pruning(_DenseStep):
    """l0-constrained pruning, ||theta||_0 <= kappa: keep the kappa largest |w_i| (exact projection).

    Give `kappa` (a count) or `keep` (a fraction in [0, 1]).  By default one kappa is shared by all
    the task's tensors jointly (the seed's single kappa over the net, section 7); `per_tensor=True`
    applies it to each tensor separately (`keep` then is a fraction of each tensor).
    """

    def __init__(self, *, kappa: int | None = None, keep: float | None = None, per_tensor: bool = False,
                 value_bits: int = FLOAT_BITS):
        super().__init__(value_bits)
        if (kappa is None) == (keep is None):
            raise ValueError("prune_l0 needs exactly one of 'kappa' (number of nonzeros) or 'keep' (fraction)")
        if kappa is not None and (isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 0):
            raise ValueError(f"option 'kappa' must be an integer >= 0, got {kappa!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 <= keep <= 1):
            raise ValueError(f"option 'keep' must be a fraction in [0, 1], got {keep!r}")
        if not isinstance(per_tensor, bool):
            raise ValueError(f"option 'per_tensor' must be true or false, got {per_tensor!r}")
        self.kappa, self.keep, self.per_tensor = kappa, keep, per_tensor

    def _budget(self, n: int) -> int:
        return self.kappa if self.kappa is not None else int(round(self.keep * n))

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        if self.per_tensor:
            pruned = [_keep_largest(_flat([w]), self._budget(w.numel())) for w in weights]
            return {"weights": [p.reshape(w.shape).to(w.dtype) for p, w in zip(pruned, weights)]}
        flat = _flat(weights)
        return {"weights": _split(_keep_largest(flat, self._budget(flat.numel())), weights)}


def project_l1_ball(flat: Tensor, radius: float) -> Tensor:
    """Euclidean projection of a vector on {x : ||x||_1 <= radius} (Duchi et al., 2008, sort based)."""
    if float(flat.abs().sum()) <= radius:
        return flat.clone()
    if radius == 0:
        return torch.zeros_like(flat)
    mags = flat.abs().sort(descending=True).values
    cums = mags.cumsum(0)
    ranks = torch.arange(1, mags.numel() + 1, dtype=flat.dtype)
    rho = int(torch.nonzero(mags - (cums - radius) / ranks > 0).max())
    tau = (float(cums[rho]) - radius) / (rho + 1)
    return flat.sign() * (flat.abs() - tau).clamp(min=0)


@register_cstep("prune_l1")
class L1Pruning(_DenseStep):
    """l1-constrained pruning, ||theta||_1 <= radius jointly over the task's tensors.

    The C step is the exact Euclidean projection on the l1 ball (soft thresholding at the level
    that makes the l1 norm equal the radius), which zeroes the small weights.
    """

    def __init__(self, *, radius: float, value_bits: int = FLOAT_BITS):
        super().__init__(value_bits)
        _check_positive("radius", radius, allow_zero=True)
        self.radius = float(radius)

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        return {"weights": _split(project_l1_ball(_flat(weights), self.radius), weights)}


class _PenaltyPruning(_DenseStep):
    """min_theta alpha * penalty(theta) + mu/2 ||w - theta||^2, separable: `shrink` solves it per weight."""

    penalty_form = True

    def __init__(self, *, alpha: float, value_bits: int = FLOAT_BITS):
        super().__init__(value_bits)
        _check_positive("alpha", alpha, allow_zero=True)
        self.alpha = float(alpha)

    def shrink(self, flat: Tensor, mu: float) -> Tensor:
        raise NotImplementedError

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        _check_positive("mu", mu)
        return {"weights": _split(self.shrink(_flat(weights), mu), weights)}


@register_cstep("prune_l0_penalty")
class L0PenaltyPruning(_PenaltyPruning):
    """l0-penalty pruning: min_theta alpha ||theta||_0 + mu/2 ||w - theta||^2 (seed 002 section 3.3).

    Separable; the exact solution keeps w_i iff w_i^2 > 2 alpha / mu (hard thresholding).
    """

    def shrink(self, flat: Tensor, mu: float) -> Tensor:
        return torch.where(flat ** 2 > 2 * self.alpha / mu, flat, 0.0)


@register_cstep("prune_l1_penalty")
class L1PenaltyPruning(_PenaltyPruning):
    """l1-penalty pruning: min_theta alpha ||theta||_1 + mu/2 ||w - theta||^2 (seed 002 section 3.3).

    Separable; the exact solution is soft thresholding at alpha / mu.
    """

    def shrink(self, flat: Tensor, mu: float) -> Tensor:
        return flat.sign() * (flat.abs() - self.alpha / mu).clamp(min=0)


# ----------------------------------------------------------------------------- low rank


class _FactorStep(CStep):
    """Theta = {"factors": [(U, V) per weight], "shapes", "dtypes"}; Delta = reshape(U V^T).

    Low-rank compression (seed 002 section 3.2): each weight as a matrix W (conv weights
    out x (in*kh*kw)), U = U_r S_r of m x r and V = V_r of n x r from the SVD of W, which gives
    the best rank-r approximation (Eckart-Young).  Storage: r (m + n) floats per weight.
    """

    factor_form = True

    def _rank(self, singular_values: Tensor, m: int, n: int, mu: float) -> int:
        raise NotImplementedError

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        if not weights:
            raise ValueError("a C step needs at least one weight tensor")
        factors = []
        for w in weights:
            m, n = _matrix_shape(w.shape)
            u, s, vh = torch.linalg.svd(w.detach().reshape(m, n).to(torch.float64), full_matrices=False)
            r = self._rank(s, m, n, mu)
            factors.append((u[:, :r] * s[:r], vh[:r].T.contiguous()))
        return {"factors": factors, "shapes": [list(w.shape) for w in weights],
                "dtypes": [str(w.dtype) for w in weights]}

    def decompress(self, theta: dict) -> list[Tensor]:
        return [(u @ v.T).reshape(shape).to(_dtype(dt))
                for (u, v), shape, dt in zip(theta["factors"], theta["shapes"], theta["dtypes"])]

    def storage_bits(self, theta: dict) -> int:
        return sum((u.numel() + v.numel()) * FLOAT_BITS for u, v in theta["factors"])


@register_cstep("low_rank")
class LowRank(_FactorStep):
    """Low rank with a fixed `rank` per weight matrix: truncated SVD (exact projection)."""

    def __init__(self, *, rank: int):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"option 'rank' must be an integer >= 0, got {rank!r}")
        self.rank = rank

    def _rank(self, singular_values: Tensor, m: int, n: int, mu: float) -> int:
        return min(self.rank, singular_values.numel())


@register_cstep("low_rank_auto")
class LowRankSelection(_FactorStep):
    """Low rank with the rank selected per weight: min_r alpha C(r) + mu/2 sum_{i>r} s_i^2.

    A penalty form (seed 002 section 3.3) where C(r) = r (m + n) is the number of stored values
    at rank r and the second term is the best rank-r error (Eckart-Young), so enumerating
    r = 0..min(m, n, max_rank) solves the C step exactly.
    """

    penalty_form = True

    def __init__(self, *, alpha: float, max_rank: int | None = None):
        _check_positive("alpha", alpha, allow_zero=True)
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0):
            raise ValueError(f"option 'max_rank' must be an integer >= 0, got {max_rank!r}")
        self.alpha, self.max_rank = float(alpha), max_rank

    def _rank(self, singular_values: Tensor, m: int, n: int, mu: float) -> int:
        _check_positive("mu", mu)
        top = singular_values.numel() if self.max_rank is None else min(self.max_rank, singular_values.numel())
        sq = singular_values.square()
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])[: top + 1]
        ranks = torch.arange(top + 1, dtype=torch.float64)
        return int(torch.argmin(self.alpha * ranks * (m + n) + mu / 2 * tail))


# ----------------------------------------------------------------------------- combinations


@register_cstep("additive")
class Additive(CStep):
    """Additive combination Delta(Theta_1, ..., Theta_p) = sum_i Delta_i(Theta_i) on the same weights.

    E.g. quantization plus a sparse correction (seed 002 section 3.2, "combine several compression
    techniques").  APPROXIMATE: the C step is solved by alternating optimization (block coordinate
    descent) over the summands, Theta_i = Pi_i(w - sum_{j != i} Delta_j(Theta_j)), for `iterations`
    sweeps from all summands at zero.  Each sweep cannot increase ||w - Delta(Theta)||^2 when the
    parts are exact projections, but the result is in general a local solution that depends on
    the order of `parts`: the first part sees w itself, so list the part meant to absorb outliers
    (e.g. the sparse one) first.  `parts` is a list of {"name": C step name, **options}.
    """

    def __init__(self, *, parts: list[dict], iterations: int = 5):
        if not isinstance(parts, (list, tuple)) or len(parts) < 2:
            raise ValueError("option 'parts' must list at least two C steps, e.g. "
                             "[{name: quantize, k: 2}, {name: prune_l0, keep: 0.01}]")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"option 'iterations' must be an integer >= 1, got {iterations!r}")
        steps = []
        for spec in parts:
            if not isinstance(spec, dict) or "name" not in spec:
                raise ValueError(f"each entry of 'parts' must be a mapping with a 'name', got {spec!r}")
            options = {key: value for key, value in spec.items() if key != "name"}
            steps.append(make_cstep(spec["name"], **options))
        self.parts, self.iterations = steps, iterations
        self.penalty_form = any(step.penalty_form for step in steps)

    def compress(self, weights: list[Tensor], mu: float) -> dict:
        target = [w.detach().to(torch.float64) for w in weights]
        contributions = [[torch.zeros_like(t) for t in target] for _ in self.parts]
        thetas: list[dict] = [{} for _ in self.parts]
        for _ in range(self.iterations):
            for i, step in enumerate(self.parts):
                residual = [t - sum(c[b] for j, c in enumerate(contributions) if j != i)
                            for b, t in enumerate(target)]
                thetas[i] = step.compress(residual, mu)
                contributions[i] = [d.to(torch.float64) for d in step.decompress(thetas[i])]
        return {"parts": thetas, "dtypes": [str(w.dtype) for w in weights]}

    def decompress(self, theta: dict) -> list[Tensor]:
        pieces = [step.decompress(t) for step, t in zip(self.parts, theta["parts"])]
        return [sum(p[b].to(torch.float64) for p in pieces).to(_dtype(dt))
                for b, dt in enumerate(theta["dtypes"])]

    def storage_bits(self, theta: dict) -> int:
        return sum(step.storage_bits(t) for step, t in zip(self.parts, theta["parts"]))
