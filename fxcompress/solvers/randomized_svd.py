"""Randomized low-rank SVD after Halko, Martinsson and Tropp (HMT).

Algorithm numbers follow the restatement in seed 001 (P. Kant, *Compression of
Neural Networks*, Part I):

* Stage A, range finding (seed section 3): Alg. 2 (Gaussian range finder),
  Alg. 4 (randomized subspace iteration), Alg. 5 (SRFT test matrix) and
  Alg. 3 (adaptive range finder with the a-posteriori estimator of Lemma 1).
* Stage B, post-processing (seed section 4.1.1): Alg. 6 (direct SVD).

Unlike the seed's notebooks (Part II, section 10.1.2), subspace iteration
re-orthonormalises after *every* application of A and A^T, as Part I
(section 3.4 and section 6, "Power iteration care") requires for stability.

All functions are pure tensor code.  They compute in the dtype (float32 or
float64) and on the device of ``A``, and draw their randomness from a
``torch.Generator`` seeded with ``seed`` on that device: the same seed gives
bitwise the same result on CPU (and on CUDA as far as cuBLAS/cuSOLVER are
deterministic, which they were in our tests).
"""

import math
import numbers
from fractions import Fraction

import torch

__all__ = [
    "gaussian_range_finder",
    "adaptive_range_finder",
    "randomized_svd",
    "svd_to_tolerance",
    "truncated_svd",
    "rank_for_energy",
    "rank_for_ratio",
    "breaks_even",
]

_TEST_MATRICES = ("gaussian", "srft")
_RANDOMIZED_OPTIONS = frozenset({"oversample", "power_iters", "test_matrix", "seed"})
_ESTIMATOR_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------- validation


def _check_matrix(A):
    """Reject anything but a non-empty float32/float64 matrix.

    Finiteness is checked on the (much smaller) random sketch of A instead, see
    ``_check_finite``: a NaN or Inf entry of A spoils every sample that touches it.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(
            f"A must be a 2-D matrix, got shape {tuple(A.shape)}; "
            "reshape it (e.g. A.flatten(1)) before factorising"
        )
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"A has dtype {A.dtype}; only float32 and float64 are supported: "
            "convert it first (A.float() or A.double())"
        )
    m, n = A.shape
    if m == 0 or n == 0:
        raise ValueError(f"A is an empty {m}x{n} matrix; there is nothing to factorise")


def _check_finite(T):
    """Raise if ``T`` (A itself or a sketch of A) holds NaN or Inf."""
    if not bool(torch.isfinite(T).all()):
        raise ValueError(
            "A contains NaN or Inf entries (or overflows its dtype when multiplied): "
            "clean or rescale the matrix before factorising"
        )


def _check_rank(rank, shape, name="rank"):
    """``rank`` must be an integer in [1, min(m, n)] for an m x n matrix."""
    m, n = shape
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"{name}={rank} is invalid for a {m}x{n} matrix: choose 1 <= {name} <= "
            f"min(m, n) = {min(m, n)}"
        )


def _check_count(name, value, minimum=0):
    """Integer option (oversampling, iteration count, ...) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name, value):
    """Finite real number > 0 (tolerances, ratios)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_test_matrix(test_matrix):
    if test_matrix not in _TEST_MATRICES:
        raise ValueError(
            f"test_matrix must be one of {_TEST_MATRICES}, got {test_matrix!r}"
        )


# ------------------------------------------------------------ small kernels


def _generator(A, seed):
    """A ``torch.Generator`` on ``A``'s device, seeded with ``seed``."""
    return torch.Generator(device=A.device).manual_seed(int(seed))


def _gaussian(rows, cols, like, gen):
    """i.i.d. N(0, 1) matrix with ``like``'s dtype and device."""
    return torch.randn(rows, cols, generator=gen, dtype=like.dtype, device=like.device)


def _orth(Y):
    """Orthonormal basis of range(Y) by Householder QR (seed section 3.1.2, remarks)."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _project_out(Q, Y):
    """(I - Q Q^T) Y, applied twice ("twice is enough") to keep Y orthogonal to Q."""
    if Q.shape[1] == 0:
        return Y
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    return Y


def _srft_sample(A, ell, gen):
    """Y = A D F R for a real subsampled randomized Fourier transform (Alg. 5).

    D is a diagonal of random signs (the real analogue of random phases), F the
    real n x n Fourier basis -- the cosine and sine columns that ``rfft``
    returns as real and imaginary parts, which are mutually orthogonal -- and R
    keeps ``ell`` of those n columns uniformly without replacement.  The
    product costs one FFT of every row of A, O(m n log n), and Y is real.
    The sqrt(n / ell) scale of the seed is omitted: Y is orthonormalised next.
    """
    n = A.shape[1]
    signs = torch.randint(0, 2, (n,), generator=gen, device=A.device).to(A.dtype) * 2 - 1
    spectrum = torch.fft.rfft(A * signs, dim=1)
    cols = torch.randperm(n, generator=gen, device=A.device)[:ell]
    bins = n // 2 + 1
    cosine = spectrum.real[:, cols[cols < bins]]
    sine = spectrum.imag[:, cols[cols >= bins] - bins + 1]
    return torch.cat([cosine, sine], dim=1)


def _subspace_iteration(A, Q, power_iters):
    """q steps of Alg. 4: QR after every product with A^T and with A."""
    for _ in range(power_iters):
        Q = _orth(A @ _orth(A.T @ Q))
    return Q


def _direct_svd(A, Q):
    """Alg. 6 (seed section 4.1.1): B = Q^T A = U~ S V^T, U = Q U~.

    The SVD is taken of the tall n x l matrix B^T = A^T Q (LAPACK and cuSOLVER
    are markedly faster on tall than on wide input): B^T = V S U~^T.
    """
    V, S, U_small_t = torch.linalg.svd(A.T @ Q, full_matrices=False)
    return Q @ U_small_t.T, S, V.T


def _truncate(U, S, Vh, rank):
    """Leading ``rank`` triplets, as fresh contiguous tensors (the full factors can be freed)."""
    return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()


# --------------------------------------------------------- Stage A: fixed rank


def gaussian_range_finder(
    A, rank, *, oversample=10, power_iters=2, test_matrix="gaussian", seed=0
):
    """Orthonormal Q (m x l) with range(Q) ~ range of the top ``rank`` of A.

    Fixed-rank Stage A (seed sections 3.1-3.5).  Draws an n x l test matrix,
    l = min(rank + oversample, m, n), forms Y = A Omega and orthonormalises it
    (Alg. 2), then runs ``power_iters`` steps of randomized subspace iteration
    (Alg. 4) with a QR after every application of A^T and of A, so the basis
    tracks (A A^T)^q A Omega without the loss of accuracy of the unorthogonalised
    power scheme.

    Args:
        A: m x n float32/float64 matrix, on any device.
        rank: target rank k, 1 <= k <= min(m, n).
        oversample: extra samples p >= 0 (seed section 3.2: 5-10 for Gaussian,
            10-20 for SRFT).
        power_iters: subspace iterations q >= 0 (seed section 6: 1-2 for
            slowly decaying spectra).
        test_matrix: ``"gaussian"`` (Alg. 2) or ``"srft"`` (Alg. 5, a real
            subsampled randomized Fourier transform applied by FFT).
        seed: seed of the generator on A's device.

    Returns:
        Q with orthonormal columns, shape m x l, dtype and device of A.

    Raises:
        ValueError: bad rank, options or matrix.  TypeError: wrong types.
    """
    _check_matrix(A)
    _check_rank(rank, A.shape)
    _check_count("oversample", oversample)
    _check_count("power_iters", power_iters)
    _check_test_matrix(test_matrix)
    m, n = A.shape
    ell = min(rank + oversample, m, n)
    gen = _generator(A, seed)
    if test_matrix == "srft":
        Y = _srft_sample(A, ell, gen)
    else:
        Y = A @ _gaussian(n, ell, A, gen)
    _check_finite(Y)
    return _subspace_iteration(A, _orth(Y), power_iters)


# ------------------------------------------------------ Stage A: fixed precision


def _adaptive_basis(A, tol, block, probes, max_rank, power_iters, seed):
    """Blocked Alg. 3; returns Q and its certified error bound.

    The bound is 10 sqrt(2/pi) max_i ||(I - Q Q^T) A w_i|| over ``probes``
    Gaussian vectors w_i drawn once up front (Lemma 1, alpha = 10): it holds
    with probability at least 1 - 10^-probes.  Each step samples a Gaussian
    block of the residual (I - Q Q^T) A, optionally sharpened by subspace
    iteration, orthonormalises it against Q, orders its directions by an SVD
    and keeps the shortest prefix that meets the tolerance.
    """
    m, n = A.shape
    gen = _generator(A, seed)
    threshold = tol / _ESTIMATOR_FACTOR
    residual = A @ _gaussian(n, probes, A, gen)
    _check_finite(residual)
    Q = A.new_empty(m, 0)
    while Q.shape[1] < max_rank and _worst(residual) > threshold:
        width = min(block, max_rank - Q.shape[1])
        new = _residual_block(A, Q, _gaussian(n, width, A, gen), power_iters)
        new = new[:, : _prefix_meeting(new, residual, threshold)]
        Q = torch.cat([Q, new], dim=1)
        residual = _project_out(new, residual)
    return Q, _ESTIMATOR_FACTOR * _worst(residual)


def _worst(residual):
    """Largest column norm of the probe residuals (the Alg. 3 loop test)."""
    return float(torch.linalg.vector_norm(residual, dim=0).max())


def _residual_block(A, Q, omega, power_iters):
    """Orthonormal block for the range of (I - Q Q^T) A, ordered by importance.

    Samples Y = (I - Q Q^T) A Omega, applies ``power_iters`` subspace
    iterations to the residual operator (re-orthonormalising after every
    product, Alg. 4), then orders the block's directions by the SVD of Y so
    that leading columns capture the most residual (this makes prefix
    truncation meaningful).  The result is orthogonal to Q to working
    precision: block Gram-Schmidt is applied twice.
    """
    Y = _project_out(Q, A @ omega)
    for _ in range(power_iters):
        Y = _project_out(Q, A @ _orth(A.T @ _orth(Y)))
    U = torch.linalg.svd(Y, full_matrices=False).U
    return _orth(_project_out(Q, U))


def _prefix_meeting(new, residual, threshold):
    """Fewest leading columns of ``new`` that bring every probe residual under threshold."""
    coeffs = new.T @ residual
    for keep in range(1, new.shape[1]):
        remaining = residual - new[:, :keep] @ coeffs[:keep]
        if _worst(remaining) <= threshold:
            return keep
    return new.shape[1]


def adaptive_range_finder(
    A, tol, *, block=16, probes=10, max_rank=None, power_iters=0, seed=0
):
    """Orthonormal Q with ||(I - Q Q^T) A||_2 <= tol, rank chosen on the fly.

    Fixed-precision Stage A: a blocked variant of Alg. 3 (seed section 3.3).
    The basis grows ``block`` directions at a time; the loop stops once the
    a-posteriori estimator (Lemma 1 of seed section 5, alpha = 10)

        ||(I - Q Q^T) A|| <= 10 sqrt(2/pi) max_i ||(I - Q Q^T) A w_i||,

    evaluated on ``probes`` independent Gaussian vectors w_i, certifies
    ``tol``; this holds except with probability 10^-probes.  The last block is
    trimmed to the fewest directions that meet the estimator.

    The estimator is conservative: besides the factor 10 sqrt(2/pi) ~ 8, a
    probe norm ||(I - Q Q^T) A w|| tracks the Frobenius rather than the
    spectral norm of the residual.  The rank therefore exceeds the optimal one
    for ``tol`` -- by about 20 directions for singular values decaying like
    0.8^i, and up to min(m, n) for slow polynomial decay such as i^-1.  The
    true error is then far below ``tol``; ``svd_to_tolerance`` truncates the
    excess away.

    Args:
        A: m x n float32/float64 matrix, on any device.
        tol: spectral-norm tolerance, > 0 (absolute, not relative to ||A||).
        block: directions added per step (BLAS-3 batch size), >= 1.
        probes: Gaussian probe vectors r of the estimator, >= 1 (seed
            section 6 recommends r = 10).
        max_rank: cap on the number of columns of Q, default min(m, n).  If it
            is reached first, Q has ``max_rank`` columns and the tolerance is
            not guaranteed.
        power_iters: subspace iterations applied to each new block (Alg. 4 on
            the residual), for slowly decaying spectra.
        seed: seed of the generator on A's device.

    Returns:
        Q with orthonormal columns, shape m x l, dtype and device of A.
    """
    Q, _ = _adaptive_range(A, tol, block, probes, max_rank, power_iters, seed)
    return Q


def _adaptive_range(A, tol, block, probes, max_rank, power_iters, seed):
    """Validate the options of ``adaptive_range_finder``, then run it."""
    _check_matrix(A)
    _check_positive("tol", tol)
    _check_count("block", block, 1)
    _check_count("probes", probes, 1)
    _check_count("power_iters", power_iters)
    max_rank = min(A.shape) if max_rank is None else max_rank
    _check_rank(max_rank, A.shape, "max_rank")
    return _adaptive_basis(A, tol, block, probes, max_rank, power_iters, seed)


# ---------------------------------------------------------- Stage A + Stage B


def randomized_svd(
    A, rank, *, oversample=10, power_iters=2, test_matrix="gaussian", seed=0
):
    """Rank-``rank`` SVD A ~ U diag(S) Vh by randomized range finding + Alg. 6.

    Stage A is ``gaussian_range_finder`` (Alg. 2/4, or Alg. 5 with
    ``test_matrix="srft"``); Stage B is the direct SVD of B = Q^T A (Alg. 6).
    With power iterations this is Alg. 11 of seed section 8, with the
    oversampled width l = k + p instead of 2k.  Passes over A: 2q + 2.
    A wide A (m < n) is factorised as A^T, so that the basis lives in the
    longer dimension and B has only min(m, n) columns.

    Args:
        A, rank, oversample, power_iters, test_matrix, seed: as in
            ``gaussian_range_finder``.

    Returns:
        U (m x rank, orthonormal columns), S (rank, non-increasing, >= 0) and
        Vh (rank x n, orthonormal rows), in A's dtype and on A's device.
        Exactly ``rank`` triplets are returned.

    Raises:
        ValueError: rank outside [1, min(m, n)] (the message names the rank
            and the shape), bad options, NaN/Inf in A.  TypeError: A is not a
            float32/float64 tensor.
    """
    _check_matrix(A)
    _check_rank(rank, A.shape)
    options = dict(
        oversample=oversample, power_iters=power_iters, test_matrix=test_matrix, seed=seed
    )
    if A.shape[0] < A.shape[1]:
        V, S, Uh = _randomized_svd_tall(A.T, rank, options)
        return Uh.T.contiguous(), S, V.T.contiguous()
    return _randomized_svd_tall(A, rank, options)


def _randomized_svd_tall(A, rank, options):
    """``randomized_svd`` for m >= n: Stage A on A, then Alg. 6."""
    Q = gaussian_range_finder(A, rank, **options)
    return _truncate(*_direct_svd(A, Q), rank)


def svd_to_tolerance(
    A,
    tol,
    *,
    range_share=0.5,
    block=16,
    probes=10,
    max_rank=None,
    power_iters=0,
    seed=0,
):
    """SVD A ~ U diag(S) Vh with ||A - U diag(S) Vh||_2 <= tol (w.h.p.).

    Adaptive range finder (Alg. 3, see ``adaptive_range_finder``) run at
    ``range_share * tol``, then the direct SVD B = Q^T A of Alg. 6.  Since
    ||A - Q B_k|| <= ||(I - Q Q^T) A|| + s_{k+1}(B), the result is truncated
    to the smallest k whose certified range error (the Alg. 3 estimator) plus
    s_{k+1}(B) is within ``tol``.  This removes most of the rank that the
    conservative estimator adds.

    Args:
        A: m x n float32/float64 matrix.
        tol: spectral-norm tolerance, > 0.
        range_share: fraction of ``tol`` given to the range finder, in (0, 1];
            the rest is the truncation budget.
        block, probes, max_rank, power_iters, seed: as in
            ``adaptive_range_finder``.

    Returns:
        (U, S, Vh) with at least one triplet.  If ``max_rank`` stops the range
        finder early, all of its directions are kept and ``tol`` may be missed.
    """
    _check_positive("tol", tol)
    _check_positive("range_share", range_share)
    if range_share > 1:
        raise ValueError(f"range_share must be in (0, 1], got {range_share!r}")
    Q, bound = _adaptive_range(
        A, range_share * tol, block, probes, max_rank, power_iters, seed
    )
    U, S, Vh = _direct_svd(A, Q)
    return _truncate(U, S, Vh, _rank_within(S, tol - bound))


def _rank_within(S, budget):
    """Smallest k >= 1 with s_{k+1} <= budget (k = len(S) if none)."""
    above = int((S > budget).sum())
    return min(max(above, 1), S.shape[0])


def truncated_svd(A, rank, *, method="randomized", **kw):
    """Rank-``rank`` truncated SVD by the randomized or the exact method.

    ``method="exact"`` is the deterministic fallback: ``torch.linalg.svd``
    (of A^T when A is wide, which LAPACK does several times faster) truncated
    to ``rank``.  ``method="randomized"`` calls ``randomized_svd``
    with ``kw`` (``oversample``, ``power_iters``, ``test_matrix``, ``seed``) and
    falls back to the exact SVD when rank + oversample >= min(m, n), where the
    sketch would be as large as the matrix and saves nothing.

    Returns:
        (U, S, Vh) with exactly ``rank`` triplets.
    """
    unknown = set(kw) - _RANDOMIZED_OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    if method not in ("randomized", "exact"):
        raise ValueError(f"method must be 'randomized' or 'exact', got {method!r}")
    _check_matrix(A)
    _check_rank(rank, A.shape)
    oversample = kw.get("oversample", 10)
    _check_count("oversample", oversample)
    if method == "randomized" and rank + oversample < min(A.shape):
        return randomized_svd(A, rank, **kw)
    _check_finite(A)
    return _truncate(*_exact_svd(A), rank)


def _exact_svd(A):
    """Thin ``torch.linalg.svd``, taken of the tall orientation (faster for wide A)."""
    if A.shape[0] < A.shape[1]:
        V, S, Uh = torch.linalg.svd(A.T, full_matrices=False)
        return Uh.T, S, V.T
    return torch.linalg.svd(A, full_matrices=False)


# ------------------------------------------------------------- rank selection


def rank_for_energy(S, energy):
    """Smallest r with sum_{i<r} s_i^2 >= energy * sum_i s_i^2.

    The energy (squared Frobenius norm) retention rule of seed sections 13 and
    15.  ``S`` is a 1-D tensor (or sequence) of singular values, sorted here in
    decreasing order; sums are accumulated in float64.  ``energy`` is in
    (0, 1].  Returns at least 1, also for an all-zero spectrum.
    """
    S = torch.as_tensor(S, dtype=torch.float64).detach().cpu()
    if S.dim() != 1 or S.numel() == 0:
        raise ValueError(f"S must be a non-empty 1-D tensor, got shape {tuple(S.shape)}")
    if bool((S < 0).any()) or not bool(torch.isfinite(S).all()):
        raise ValueError("S must hold finite, non-negative singular values")
    if not (isinstance(energy, numbers.Real) and 0 < energy <= 1):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    power = torch.sort(S, descending=True).values ** 2
    cumulative = torch.cumsum(power, dim=0)
    target = torch.tensor([energy * float(cumulative[-1])], dtype=torch.float64)
    r = int(torch.searchsorted(cumulative, target)) + 1
    return min(max(r, 1), S.numel())


def _check_shape(m, n):
    """Matrix dimensions are integers >= 1."""
    for name, value in (("m", m), ("n", n)):
        _check_count(name, value, 1)


def rank_for_ratio(m, n, ratio):
    """Largest r with r (m + n) <= ratio * m * n, at least 1 and at most min(m, n).

    A rank-r factorisation of an m x n matrix stores r (m + n) numbers instead
    of m n; ``ratio`` is the fraction of the dense storage to keep.  (Seed
    section 13.5 states ratio-based compression as original / compressed
    parameters, i.e. 1 / ratio.)  Exact rational arithmetic on the decimal
    value of ``ratio``, so e.g. ratio=0.3 is 3/10, not its binary
    approximation.
    """
    _check_shape(m, n)
    _check_positive("ratio", ratio)
    exact = Fraction(str(ratio)) * m * n / (m + n)
    return min(max(math.floor(exact), 1), min(m, n))


def breaks_even(m, n, r):
    """True when a rank-r factorisation of an m x n matrix saves nothing: r (m + n) >= m n."""
    _check_shape(m, n)
    _check_count("r", r, 1)
    return r * (m + n) >= m * n
