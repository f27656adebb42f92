"""Behaviour of fxcompress.solvers.randomized_svd (seed 001, HMT algorithms 2-6)."""

import math

import pytest
import torch

from fxcompress.solvers.randomized_svd import (
    adaptive_range_finder,
    breaks_even,
    gaussian_range_finder,
    randomized_svd,
    rank_for_energy,
    rank_for_ratio,
    svd_to_tolerance,
    truncated_svd,
)

M, N = 500, 400
SEEDS = range(5)


def _matrix_with_spectrum(m, n, sigma, seed=0, dtype=torch.float64):
    """U diag(sigma) V^T with Haar-like random orthonormal U (m x r) and V (n x r)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    r = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    return ((U * sigma) @ V.T).to(dtype)


def _harmonic(count):
    """Polynomially decaying singular values 1, 1/2, 1/3, ..."""
    return 1.0 / torch.arange(1, count + 1, dtype=torch.float64)


def _geometric(count, ratio):
    """Exponentially decaying singular values ratio^i, i = 0, 1, ..."""
    return ratio ** torch.arange(count, dtype=torch.float64)


@pytest.fixture(scope="module")
def slow():
    """500 x 400 matrix with singular values i^-1 and its exact spectrum."""
    sigma = _harmonic(N)
    return _matrix_with_spectrum(M, N, sigma), sigma


@pytest.fixture(scope="module")
def fast():
    """500 x 400 matrix with singular values 0.8^i and its exact spectrum."""
    sigma = _geometric(N, 0.8)
    return _matrix_with_spectrum(M, N, sigma, seed=1), sigma


def _errors(A, U, S, Vh):
    """(spectral, Frobenius) norm of A - U diag(S) Vh."""
    E = A - (U * S) @ Vh
    return torch.linalg.matrix_norm(E, 2).item(), torch.linalg.matrix_norm(E).item()


def _optimal(sigma, k):
    """Eckart-Young errors of the best rank-k approximation: (sigma_{k+1}, tail norm)."""
    return sigma[k].item(), sigma[k:].norm().item()


def _assert_orthonormal_columns(Q, atol):
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    torch.testing.assert_close(Q.T @ Q, eye, atol=atol, rtol=0)


# ------------------------------------------------------------ fixed rank


@pytest.mark.parametrize("rank", [10, 25, 50])
def test_power_iterations_reach_optimal_error(slow, rank):
    A, sigma = slow
    opt_2, opt_f = _optimal(sigma, rank)
    for seed in range(3):
        U, S, Vh = randomized_svd(A, rank, power_iters=2, seed=seed)
        assert U.shape == (M, rank) and S.shape == (rank,) and Vh.shape == (rank, N)
        err_2, err_f = _errors(A, U, S, Vh)
        assert err_2 <= 1.1 * opt_2
        assert err_f <= 1.1 * opt_f


def test_more_power_iterations_help_on_average(slow):
    A, sigma = slow
    rank = 25
    mean = {}
    for q in (0, 1, 2):
        errs = [_errors(A, *randomized_svd(A, rank, power_iters=q, seed=s)) for s in SEEDS]
        mean[q] = [sum(e[i] for e in errs) / len(errs) for i in range(2)]
    for norm in range(2):
        assert mean[2][norm] <= mean[1][norm] <= mean[0][norm]
    # Without power iterations the slow spectrum is visibly suboptimal.
    assert mean[0][0] > 1.3 * _optimal(sigma, rank)[0]


def test_factors_are_orthonormal_and_sorted(slow):
    A, _ = slow
    U, S, Vh = randomized_svd(A, 30)
    _assert_orthonormal_columns(U, 1e-12)
    _assert_orthonormal_columns(Vh.T, 1e-12)
    assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)


@pytest.mark.parametrize("power_iters", [1, 2])
def test_srft_near_optimal(slow, power_iters):
    A, sigma = slow
    rank = 25
    opt_2, opt_f = _optimal(sigma, rank)
    U, S, Vh = randomized_svd(A, rank, power_iters=power_iters, test_matrix="srft")
    assert U.dtype == torch.float64 and not U.is_complex()
    err_2, err_f = _errors(A, U, S, Vh)
    assert err_2 <= 1.1 * opt_2
    assert err_f <= 1.1 * opt_f


def test_srft_without_power_iterations_matches_gaussian(slow):
    A, _ = slow
    rank = 25
    gauss = [_errors(A, *randomized_svd(A, rank, power_iters=0, seed=s))[1] for s in SEEDS]
    srft = [
        _errors(A, *randomized_svd(A, rank, power_iters=0, test_matrix="srft", seed=s))[1]
        for s in SEEDS
    ]
    assert sum(srft) <= 1.1 * sum(gauss)


@pytest.mark.parametrize("n", [399, 400])
def test_srft_range_finder_odd_and_even_width(n):
    sigma = _geometric(n, 0.9)
    A = _matrix_with_spectrum(M, n, sigma, seed=2)
    Q = gaussian_range_finder(A, 20, oversample=15, power_iters=0, test_matrix="srft")
    assert Q.shape == (M, 35)
    _assert_orthonormal_columns(Q, 1e-12)
    residual = torch.linalg.matrix_norm(A - Q @ (Q.T @ A), 2).item()
    assert residual <= 10 * sigma[20].item()


def test_range_finder_width_is_clamped(slow):
    A, _ = slow
    assert gaussian_range_finder(A, 20, oversample=7).shape == (M, 27)
    Q = gaussian_range_finder(A, 395, oversample=10)
    assert Q.shape == (M, N)
    _assert_orthonormal_columns(Q, 1e-12)


def test_wide_matrix(slow):
    A, sigma = slow
    At = A.T.contiguous()
    U, S, Vh = randomized_svd(At, 25)
    assert U.shape == (N, 25) and Vh.shape == (25, M)
    assert _errors(At, U, S, Vh)[1] <= 1.1 * _optimal(sigma, 25)[1]


# ------------------------------------------------------- fixed precision


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("power_iters", [0, 1])
def test_adaptive_range_finder_meets_tolerance(fast, tol, power_iters):
    A, sigma = fast
    optimal_rank = int((sigma > tol).sum())
    for seed in range(2):
        Q = adaptive_range_finder(A, tol, power_iters=power_iters, seed=seed)
        _assert_orthonormal_columns(Q, 1e-12)
        error = torch.linalg.matrix_norm(A - Q @ (Q.T @ A), 2).item()
        assert error <= tol
        # The estimator overstates the error by 10 sqrt(2/pi) times the tail's
        # Frobenius/spectral ratio, about 20-100 here; at decay 0.8 per index
        # that costs log(100) / log(1.25) ~ 21 directions, not more.
        assert optimal_rank <= Q.shape[1] <= optimal_rank + 25


def test_adaptive_range_finder_respects_max_rank(slow):
    A, _ = slow
    Q = adaptive_range_finder(A, 1e-3, max_rank=37, block=10)
    assert Q.shape == (M, 37)
    _assert_orthonormal_columns(Q, 1e-12)


def test_adaptive_range_finder_on_exactly_low_rank_matrix():
    sigma = _geometric(7, 0.5)
    A = _matrix_with_spectrum(M, N, sigma, seed=3)
    Q = adaptive_range_finder(A, 1e-8, block=16)
    assert Q.shape[1] == 7
    assert torch.linalg.matrix_norm(A - Q @ (Q.T @ A), 2).item() <= 1e-8


@pytest.mark.parametrize("matrix", ["fast", "slow"])
@pytest.mark.parametrize("rel_tol", [1e-1, 1e-2])
def test_svd_to_tolerance(request, matrix, rel_tol):
    A, sigma = request.getfixturevalue(matrix)
    tol = rel_tol * sigma[0].item()
    U, S, Vh = svd_to_tolerance(A, tol)
    assert _errors(A, U, S, Vh)[0] <= tol
    # Near-optimal rank: at most the optimal rank for half the tolerance.
    assert int((sigma > tol).sum()) <= S.numel() <= max(int((sigma > tol / 2).sum()), 1) + 2


def test_svd_to_tolerance_stops_at_max_rank(slow):
    A, _ = slow
    U, S, Vh = svd_to_tolerance(A, 1e-6, max_rank=20, power_iters=1)
    assert U.shape == (M, 20) and S.shape == (20,) and Vh.shape == (20, N)


# ---------------------------------------------------------- exact fallback


def test_exact_truncated_svd_matches_torch(slow):
    A, _ = slow
    U, S, Vh = truncated_svd(A, 12, method="exact")
    U_ref, S_ref, Vh_ref = torch.linalg.svd(A, full_matrices=False)
    assert torch.equal(S, S_ref[:12])
    assert torch.equal(U, U_ref[:, :12]) and torch.equal(Vh, Vh_ref[:12])
    U, S_wide, Vh = truncated_svd(A.T, 12, method="exact")
    assert U.shape == (N, 12) and Vh.shape == (12, M)
    torch.testing.assert_close(S_wide, S_ref[:12], rtol=1e-12, atol=0)
    torch.testing.assert_close((U * S_wide) @ Vh, ((U_ref * S_ref)[:, :12] @ Vh_ref[:12]).T)


def test_randomized_falls_back_to_exact_when_sketch_is_full(slow):
    A, _ = slow
    exact = truncated_svd(A, 391, method="exact")
    fallback = truncated_svd(A, 391, oversample=10, power_iters=1)
    assert all(torch.equal(a, b) for a, b in zip(exact, fallback))
    U, S, Vh = truncated_svd(A, 20, power_iters=2)
    assert U.shape == (M, 20) and S.shape == (20,) and Vh.shape == (20, N)


def test_truncated_svd_rejects_unknown_options(slow):
    A, _ = slow
    with pytest.raises(TypeError, match="power_iter"):
        truncated_svd(A, 5, power_iter=2)
    with pytest.raises(ValueError, match="method"):
        truncated_svd(A, 5, method="lanczos")


# ---------------------------------------------------------- rank selection


def test_rank_for_energy_is_the_smallest_sufficient_rank():
    gen = torch.Generator().manual_seed(0)
    S = torch.sort(torch.rand(64, generator=gen, dtype=torch.float64), descending=True).values
    energy_of = torch.cumsum(S**2, 0) / (S**2).sum()
    for energy in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        r = rank_for_energy(S, energy)
        assert energy_of[r - 1] >= energy
        assert r == 1 or energy_of[r - 2] < energy
    assert rank_for_energy(S, 1.0) == 64
    assert rank_for_energy(S[torch.randperm(64, generator=gen)], 0.9) == rank_for_energy(S, 0.9)
    assert rank_for_energy(torch.tensor([3.0, 4.0]), 0.64) == 1  # 16/25 = 0.64
    assert rank_for_energy(torch.tensor([3.0, 4.0]), 0.65) == 2


def test_rank_for_energy_validates():
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        rank_for_energy(torch.tensor([1.0, -1.0]), 0.5)


def test_rank_for_ratio_arithmetic():
    assert rank_for_ratio(100, 100, 0.5) == 25  # 25 * 200 = 5000 = 0.5 * 10^4
    assert rank_for_ratio(512, 256, 0.25) == 42  # 42 * 768 <= 32768 < 43 * 768
    assert rank_for_ratio(12, 15, 0.3) == 2  # exactly 54 <= 54: no float round-down
    assert rank_for_ratio(6, 30, 0.6) == 3
    assert rank_for_ratio(1000, 10, 1e-6) == 1  # at least one
    assert rank_for_ratio(40, 30, 10.0) == 30  # at most min(m, n)
    for m, n, ratio in [(784, 512, 0.1), (300, 7, 0.9), (33, 65, 0.37)]:
        r = rank_for_ratio(m, n, ratio)
        assert r * (m + n) <= ratio * m * n + 1e-9 or r == 1
        assert (r + 1) * (m + n) > ratio * m * n


def test_breaks_even_arithmetic():
    assert breaks_even(4, 4, 2)  # 2 * 8 == 16
    assert not breaks_even(4, 4, 1)
    assert not breaks_even(1024, 1024, 511)
    assert breaks_even(1024, 1024, 512)
    assert breaks_even(10, 1000, 10)
    assert not breaks_even(10, 1000, 9)
    r = rank_for_ratio(300, 200, 1.0)
    assert not breaks_even(300, 200, r - 1) and breaks_even(300, 200, r + 1)


# ---------------------------------------------------- determinism, dtypes


@pytest.mark.parametrize("test_matrix", ["gaussian", "srft"])
def test_same_seed_same_bits(slow, test_matrix):
    A, _ = slow
    first = randomized_svd(A, 20, test_matrix=test_matrix, seed=7)
    again = randomized_svd(A, 20, test_matrix=test_matrix, seed=7)
    other = randomized_svd(A, 20, test_matrix=test_matrix, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_adaptive_is_deterministic(fast):
    A, _ = fast
    first = adaptive_range_finder(A, 1e-4, seed=3)
    assert torch.equal(first, adaptive_range_finder(A, 1e-4, seed=3))


@pytest.mark.parametrize("test_matrix", ["gaussian", "srft"])
def test_float32(slow, test_matrix):
    A64, sigma = slow
    A = A64.float()
    U, S, Vh = randomized_svd(A, 25, test_matrix=test_matrix)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    _assert_orthonormal_columns(U, 1e-5)
    err_2, err_f = _errors(A64, U.double(), S.double(), Vh.double())
    opt_2, opt_f = _optimal(sigma, 25)
    assert err_2 <= 1.1 * opt_2 and err_f <= 1.1 * opt_f


def test_float32_adaptive(fast):
    A64, sigma = fast
    tol = 1e-3
    Q = adaptive_range_finder(A64.float(), tol)
    assert Q.dtype == torch.float32
    assert torch.linalg.matrix_norm(A64 - Q.double() @ (Q.double().T @ A64), 2).item() <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_behaviour(slow):
    A64, sigma = slow
    A = A64.cuda()
    U, S, Vh = randomized_svd(A, 25, seed=4)
    assert U.device.type == S.device.type == Vh.device.type == "cuda"
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), randomized_svd(A, 25, seed=4)))
    assert _errors(A64, U.cpu(), S.cpu(), Vh.cpu())[1] <= 1.1 * _optimal(sigma, 25)[1]
    Q = gaussian_range_finder(A.float(), 25, test_matrix="srft")
    assert Q.device.type == "cuda" and Q.dtype == torch.float32
    Q = adaptive_range_finder(A, 1e-2)
    assert torch.linalg.matrix_norm(A - Q @ (Q.T @ A), 2).item() <= 1e-2


# -------------------------------------------------------------- validation


@pytest.mark.parametrize("rank", [0, -3, 401])
@pytest.mark.parametrize(
    "call",
    [
        randomized_svd,
        gaussian_range_finder,
        lambda A, rank: truncated_svd(A, rank, method="exact"),
        lambda A, rank: adaptive_range_finder(A, 0.1, max_rank=rank),
    ],
)
def test_bad_rank_names_rank_and_shape(slow, call, rank):
    A, _ = slow
    with pytest.raises(ValueError) as info:
        call(A, rank)
    message = str(info.value)
    assert f"rank={rank}" in message and "500x400" in message
    assert "rank <= min(m, n) = 400" in message
    with pytest.raises(ValueError, match="400x500"):
        call(A.T, rank)


def test_bad_inputs(slow):
    A, _ = slow
    with pytest.raises(TypeError, match="int"):
        randomized_svd(A, 2.5)
    with pytest.raises(ValueError, match="test_matrix"):
        randomized_svd(A, 5, test_matrix="hadamard")
    with pytest.raises(ValueError, match="oversample"):
        randomized_svd(A, 5, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        randomized_svd(A, 5, power_iters=-1)
    with pytest.raises(ValueError, match="2-D"):
        randomized_svd(A[0], 1)
    with pytest.raises(TypeError, match="float16"):
        randomized_svd(A.half(), 5)
    with pytest.raises(ValueError, match="NaN"):
        randomized_svd(torch.full((4, 3), math.nan), 1)
    with pytest.raises(ValueError, match="tol"):
        adaptive_range_finder(A, 0.0)
    with pytest.raises(ValueError, match="tol"):
        svd_to_tolerance(A, -1.0)
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(10, 10, 0)
    with pytest.raises(ValueError, match="r must"):
        breaks_even(10, 10, 0)
