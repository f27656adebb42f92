"""Tests of fxcompress.solvers.group_lasso (Gram-form group-lasso reconstruction, seeds 003/000)."""
import math
import time

import numpy as np
import pytest
import torch

from fxcompress.solvers.group_lasso import (
    _descent_factor,
    _stalled,
    GroupLassoResult,
    debias,
    group_lasso,
    group_norms,
    lambda_max,
    prox_group_l21,
    search_lambda,
    support_columns,
)

SOLVERS = ["newton", "bcd", "fista", "pgd", "altmin"]


def samples(n=300, d=24, h=10, seed=0, bias=False, noise=0.3, shared=0.5, rank=None):
    """Raw samples: correlated inputs (a shared factor; of rank ``rank`` if given), Y = X W^T + noise."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        X = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    X = X + shared * torch.randn(n, 1, generator=g, dtype=torch.float64)
    if bias:
        X = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    W = torch.randn(h, X.shape[1], generator=g, dtype=torch.float64)
    Y = X @ W.T + noise * torch.randn(n, h, generator=g, dtype=torch.float64)
    return X, Y


def gram(X, Y):
    n = X.shape[0]
    return X.T @ X / n, Y.T @ X / n, float((Y * Y).sum() / n)


def objective(M, X, Y, lam, groups):
    """F(M) = 1/(2n) ||Y - X M^T||^2 + lam sum_g ||M_g||, straight from the samples."""
    return float(((Y - X @ M.T) ** 2).sum() / (2 * X.shape[0]) + lam * group_norms(M, groups).sum())


@pytest.fixture(scope="module")
def grouped_problem():
    X, Y = samples(d=24, bias=True, seed=1)
    groups = torch.cat([torch.arange(24) // 3, torch.tensor([-1])])
    return X, Y, groups


# ---------------------------------------------------------------------------------------------
# prox and norms


def test_prox_matches_closed_form_block_soft_threshold():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 7, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, -1])
    t = 1.3
    out = prox_group_l21(M, groups, t)
    for gid, cols in ((0, [0, 1]), (1, [2, 3, 4]), (2, [5])):
        block = M[:, cols]
        norm = float(block.norm())
        expected = block * max(0.0, 1 - t / norm)
        torch.testing.assert_close(out[:, cols], expected)
    torch.testing.assert_close(out[:, 6], M[:, 6])  # unpenalised column untouched


def test_prox_is_the_argmin_of_its_objective():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(4, 6, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    t = 0.8
    P = prox_group_l21(M, groups, t)

    def phi(U):
        return float(t * group_norms(U, groups).sum() + 0.5 * ((U - M) ** 2).sum())

    best = phi(P)
    for _ in range(200):
        assert phi(P + 1e-3 * torch.randn(4, 6, generator=g, dtype=torch.float64)) >= best - 1e-12


def test_prox_zeroes_small_groups_and_zero_threshold_is_identity():
    M = torch.tensor([[0.3, 0.4, 3.0], [0.0, 0.0, 4.0]], dtype=torch.float64)  # norms 0.5, 0.4, 5
    out = prox_group_l21(M, None, 0.5)
    assert torch.all(out[:, :2] == 0)
    torch.testing.assert_close(out[:, 2], M[:, 2] * 0.9)
    torch.testing.assert_close(prox_group_l21(M, None, 0.0), M)


def test_group_norms_ignore_unpenalised_columns():
    M = torch.tensor([[3.0, 4.0, 100.0, 1.0]])
    norms = group_norms(M, torch.tensor([0, 0, -1, 2]))
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# solvers reach the same optimum


@pytest.mark.parametrize("seed,grouped,fraction", [(0, False, 0.3), (1, True, 0.6)])
def test_all_solvers_reach_the_same_optimum(seed, grouped, fraction, grouped_problem):
    if grouped:
        X, Y, groups = grouped_problem
    else:
        X, Y = samples(seed=seed)
        groups = None
    R, B, ryy = gram(X, Y)
    lam = fraction * lambda_max(R, B, groups)
    results = {s: group_lasso(R, B, lam, groups, ryy=ryy, solver=s, tol=1e-11) for s in SOLVERS}
    results["fista+altmin"] = group_lasso(
        R, B, lam, groups, ryy=ryy, solver="fista", warm_start="altmin", tol=1e-11
    )
    reference = results["newton"].objective
    assert 0 < results["newton"].support.sum() < results["newton"].support.numel()
    for name, res in results.items():
        assert res.converged, name
        assert abs(res.objective - reference) <= 1e-8 * reference, name
        # the reported objective is F(M) computed from the raw samples
        assert abs(objective(res.M, X, Y, lam, groups) - res.objective) <= 1e-9 * reference, name
    for name in ("bcd", "fista", "pgd"):  # exact-zero solvers find the same support
        assert torch.equal(results[name].support, results["newton"].support), name
        torch.testing.assert_close(results[name].M, results["newton"].M, atol=1e-4, rtol=0)


def test_auto_is_newton_and_reaches_tolerance():
    X, Y = samples(seed=2)
    R, B, _ = gram(X, Y)
    res = group_lasso(R, B, 0.2 * lambda_max(R, B))
    assert isinstance(res, GroupLassoResult)
    assert res.solver == "newton" and res.converged and res.rel_gap <= 1e-6


def test_newton_hands_over_to_bcd_when_its_hessian_turns_indefinite(monkeypatch):
    from fxcompress.solvers import group_lasso as module
    X, Y = samples(seed=2)
    R, B, ryy = gram(X, Y)
    lam = 0.2 * lambda_max(R, B)
    reference = group_lasso(R, B, lam, ryy=ryy, solver="fista", tol=1e-9)
    steps = []

    def indefinite_after_one_step(point, lam):
        steps.append(1)
        if len(steps) > 1:
            raise module._Indefinite("matrix is not positive definite, even with jitter")
        return real_step(point, lam)

    real_step = module._newton_step
    monkeypatch.setattr(module, "_newton_step", indefinite_after_one_step)
    res = group_lasso(R, B, lam, ryy=ryy)
    assert len(steps) == 2 and res.solver == "bcd" and res.converged
    assert res.objective == pytest.approx(reference.objective, rel=1e-6)
    assert torch.equal(res.support, reference.support)


def test_duality_gap_bounds_the_suboptimality():
    X, Y = samples(d=24, bias=True, seed=3)
    R, B, ryy = gram(X, Y)
    lam = 0.2 * lambda_max(R, B)
    best = group_lasso(R, B, lam, ryy=ryy, tol=1e-14).objective
    for solver, iters in (("fista", 10), ("pgd", 3), ("bcd", 1), ("altmin", 4)):
        res = group_lasso(R, B, lam, ryy=ryy, solver=solver, max_iter=iters, tol=1e-14)
        assert not res.converged
        assert res.objective - best <= res.gap * (1 + 1e-9) + 1e-12, solver
        assert res.gap > 0
    # without ryy the objective is shifted by a constant, the gap still bounds F - F*
    res = group_lasso(R, B, lam, solver="fista", max_iter=10, tol=1e-14)
    best_shifted = group_lasso(R, B, lam, tol=1e-14).objective
    assert res.objective - best_shifted <= res.gap * (1 + 1e-9) + 1e-12


def test_newton_converges_along_the_path_on_correlated_groups():
    # regression: strongly correlated inputs in groups of 4, from far above to far below the
    # support-size range, cold and warm-started from a denser solution (groups must leave)
    X, Y = samples(n=300, d=120, h=20, seed=14, shared=2.0)
    R, B, _ = gram(X, Y)
    groups = torch.arange(120) // 4
    lmax = lambda_max(R, B, groups)
    dense = group_lasso(R, B, 0.02 * lmax, groups, tol=1e-10)
    for fraction in (0.9, 0.5, 0.2, 0.05):
        cold = group_lasso(R, B, fraction * lmax, groups, tol=1e-10)
        warm = group_lasso(R, B, fraction * lmax, groups, M0=dense.M, tol=1e-10)
        assert cold.converged and warm.converged and cold.iterations <= 30, fraction
        assert abs(cold.objective - warm.objective) <= 1e-9 * cold.objective
        assert torch.equal(cold.support, warm.support)


def test_max_time_stops_a_slow_solver():
    X, Y = samples(n=300, d=120, h=20, seed=14, shared=2.0)
    R, B, _ = gram(X, Y)
    start = time.perf_counter()
    res = group_lasso(R, B, 0.05 * lambda_max(R, B), solver="pgd", tol=1e-14, max_time=0.2)
    assert time.perf_counter() - start < 2.0
    assert not res.converged and res.gap > 0


def test_lam_zero_gives_w_when_rxx_full_rank():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(500, 12, generator=g, dtype=torch.float64)
    W = torch.randn(7, 12, generator=g, dtype=torch.float64)
    R = X.T @ X / 500
    for solver in ("auto", "fista"):
        res = group_lasso(R, W @ R, 0.0, solver=solver)
        torch.testing.assert_close(res.M, W, atol=1e-10, rtol=0)
        assert res.support.all()


def test_lambda_max_is_the_zero_threshold(grouped_problem):
    X, Y, groups = grouped_problem
    R, B, _ = gram(X, Y)
    lmax = lambda_max(R, B, groups)
    for solver in ("newton", "bcd", "fista"):
        at = group_lasso(R, B, lmax, groups, solver=solver)
        assert not at.support.any(), solver
        assert torch.all(at.M[:, :-1] == 0)
        below = group_lasso(R, B, 0.999 * lmax, groups, solver=solver, tol=1e-9)
        assert below.support.sum() >= 1, solver
        assert at.lam_max == below.lam_max == pytest.approx(lmax, rel=1e-12)
    assert search_lambda(R, B, 3, groups).lam_max == pytest.approx(lmax, rel=1e-12)


def test_unpenalised_column_is_never_zeroed(grouped_problem):
    X, Y, groups = grouped_problem
    R, B, ryy = gram(X, Y)
    lmax = lambda_max(R, B, groups)
    for solver in SOLVERS:
        res = group_lasso(R, B, 2 * lmax, groups, solver=solver)
        assert not res.support.any()
        torch.testing.assert_close(res.M[:, -1], Y.mean(0))  # the best constant: the mean output
        mid = group_lasso(R, B, 0.6 * lmax, groups, solver=solver, tol=1e-8)
        assert torch.all(mid.M[:, -1] != 0)


def test_dead_inputs_and_singular_statistics():
    g = torch.Generator().manual_seed(5)
    X = torch.relu(torch.randn(30, 40, generator=g, dtype=torch.float64))  # n < d: singular
    X[:, 7] = 0.0  # a dead unit
    W = torch.randn(6, 40, generator=g, dtype=torch.float64)
    R = X.T @ X / 30
    res = group_lasso(R, W @ R, 0.05 * lambda_max(R, W @ R), tol=1e-9)
    assert res.converged
    assert torch.all(res.M[:, 7] == 0) and not res.support[7]
    fista = group_lasso(R, W @ R, 0.05 * lambda_max(R, W @ R), solver="fista", tol=1e-9)
    assert abs(fista.objective - res.objective) <= 1e-7 * res.objective


def test_float32_inputs_and_progress_callback():
    X, Y = samples(seed=6)
    R, B, _ = gram(X, Y)
    lam = 0.25 * lambda_max(R, B)
    seen = []
    res64 = group_lasso(R, B, lam, progress=seen.append)
    res32 = group_lasso(R.float(), B.float(), lam)
    assert res32.M.dtype == torch.float32 and res64.M.dtype == torch.float64
    torch.testing.assert_close(res32.M.double(), res64.M, atol=1e-4, rtol=1e-4)
    assert seen and set(seen[0]) == {"solver", "iteration", "objective", "gap", "rel_gap", "support"}
    assert seen[-1]["rel_gap"] <= 1e-6 and seen[-1]["iteration"] == res64.iterations


@pytest.mark.parametrize("threads, small_below, expected", [(1, 0, 1), (2, 0, 2), (2, 10**6, 1)])
def test_scipy_blas_runs_on_torchs_thread_count(threads, small_below, expected, monkeypatch):
    """Inside the solvers scipy's BLAS and torch use torch.get_num_threads() threads (not every core), and one
    thread on problems below SINGLE_THREAD_BELOW columns."""
    import fxcompress.solvers.group_lasso as gl
    from threadpoolctl import threadpool_info
    monkeypatch.setattr(gl, "SINGLE_THREAD_BELOW", small_below)
    X, Y = samples(seed=6)
    R, B, _ = gram(X, Y)
    previous = torch.get_num_threads()
    seen = []

    def record(_):
        seen.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} |
                    {torch.get_num_threads()})
    torch.set_num_threads(threads)
    try:
        search_lambda(R, B, 5, progress=record)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    assert seen and all(counts == {expected} for counts in seen)


def test_warm_start_m0_converges_faster():
    X, Y = samples(seed=7, d=30)
    R, B, _ = gram(X, Y)
    lam = 0.2 * lambda_max(R, B)
    near = group_lasso(R, B, 1.05 * lam)
    cold = group_lasso(R, B, lam, solver="pgd")
    warm = group_lasso(R, B, lam, solver="pgd", M0=near.M)
    assert warm.converged and warm.iterations < cold.iterations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, Y = samples(seed=8)
    R, B, _ = gram(X, Y)
    lam = 0.3 * lambda_max(R, B)
    cpu = group_lasso(R, B, lam)
    gpu = group_lasso(R.cuda().float(), B.cuda().float(), lam)
    assert gpu.M.device.type == "cuda" and gpu.M.dtype == torch.float32
    torch.testing.assert_close(gpu.M.cpu().double(), cpu.M, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# comparison with scikit-learn


def test_objective_matches_sklearn_multitask_lasso():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    X, Y = samples(n=200, d=15, h=6, seed=9)
    R, B, ryy = gram(X, Y)
    lam = 0.2 * lambda_max(R, B)
    # sklearn: (1/(2n)) ||Y - X C^T||_F^2 + alpha sum_j ||C[:, j]||_2, i.e. exactly F with
    # Rxx = X^T X / n, Ryx = Y^T X / n, ryy = ||Y||^2 / n and alpha = lam (no intercept).
    sk = sklearn_linear.MultiTaskLasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=100000)
    sk.fit(X.numpy(), Y.numpy())
    sk_M = torch.from_numpy(sk.coef_)
    ours = group_lasso(R, B, lam, ryy=ryy, tol=1e-12)
    sk_obj = objective(sk_M, X, Y, lam, None)
    assert ours.objective <= sk_obj * (1 + 1e-10)
    assert abs(ours.objective - sk_obj) <= 1e-8 * sk_obj
    torch.testing.assert_close(ours.M, sk_M, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# debias


def test_debias_equals_least_squares_on_the_support():
    X, Y = samples(n=150, d=12, h=5, seed=10)
    R, B, _ = gram(X, Y)
    keep = torch.tensor([True, False, True, True, False, False, True, False, True, True, False, True])
    M = debias(R, B, keep)
    coef, *_ = np.linalg.lstsq(X[:, keep].numpy(), Y.numpy(), rcond=None)
    torch.testing.assert_close(M[:, keep], torch.from_numpy(coef.T), atol=1e-10, rtol=0)
    assert torch.all(M[:, ~keep] == 0)
    torch.testing.assert_close(debias(R, B, torch.nonzero(keep).flatten()), M)


def test_debias_singular_support_gives_min_norm_solution():
    X, Y = samples(n=100, d=6, h=3, seed=11)
    X = torch.cat([X, X[:, :1]], 1)  # column 6 duplicates column 0
    R, B, _ = gram(X, Y)
    M = debias(R, B, torch.ones(7, dtype=torch.bool))
    coef = np.linalg.pinv(X.numpy()) @ Y.numpy()
    torch.testing.assert_close(M, torch.from_numpy(coef.T), atol=1e-8, rtol=0)


def test_support_columns_feeds_debias(grouped_problem):
    X, Y, groups = grouped_problem
    R, B, _ = gram(X, Y)
    res = group_lasso(R, B, 0.7 * lambda_max(R, B, groups), groups)
    assert 0 < res.support.sum() < 8
    cols = support_columns(res.support, groups)
    assert cols[-1] and cols.sum() == 3 * res.support.sum() + 1
    refit = debias(R, B, cols)
    assert torch.equal(group_norms(refit, groups) > 0, res.support)


# ---------------------------------------------------------------------------------------------
# lambda search


@pytest.mark.parametrize("keep", [0, 1, 4, 9, 15, 23, 24])
def test_search_lambda_hits_the_keep_count_exactly(keep):
    X, Y = samples(d=24, seed=12)
    R, B, _ = gram(X, Y)
    res = search_lambda(R, B, keep)
    assert int(res.support.sum()) == keep
    assert int((group_norms(res.M) > 0).sum()) == keep
    assert not res.tie_broken and res.converged


def test_search_lambda_with_groups_and_other_solver(grouped_problem):
    X, Y, groups = grouped_problem
    R, B, _ = gram(X, Y)
    for keep in (2, 5):
        res = search_lambda(R, B, keep, groups, solver="fista", tol=1e-8)
        assert int(res.support.sum()) == keep and res.solver == "fista"
        torch.testing.assert_close(group_lasso(R, B, res.lam, groups).M, res.M, atol=1e-4, rtol=0)


def test_search_lambda_count_tolerance_completes_keep_by_tie_break():
    # 200 one-column groups, keep 150: a 10% tolerance may stop the bracketing up to 15 groups above
    # keep; the result still has exactly keep groups, and they are the exact search's when it lands
    # on the path, else the largest at the stopping lam (re-solved on them alone).
    X, Y = samples(n=400, d=200, h=12, seed=31)
    R, B, _ = gram(X, Y)
    exact = search_lambda(R, B, 150, count_tol=0.0)
    loose = search_lambda(R, B, 150, count_tol=0.1)
    assert int(exact.support.sum()) == 150 and not exact.tie_broken
    assert int(loose.support.sum()) == 150 == int((group_norms(loose.M) > 0).sum())
    assert loose.tie_broken or torch.equal(loose.support, exact.support)
    assert int((loose.support & exact.support).sum()) >= 135


def test_descent_factor_follows_the_count_growth():
    assert _descent_factor([], [], 128) == 2.0
    assert _descent_factor([8.0, 4.0], [3, 3], 128) == 2.0            # flat: plain halving
    assert _descent_factor([8.0, 4.0], [3, 4], 128) == 8.0            # slow growth: the cap
    assert _descent_factor([8.0, 1e-300], [3, 4], 10**6) == 8.0       # no overflow on a flat fit
    # count ~ lam^-1 through (4, 10), (2, 20): 40 is reached at lam 1, a factor 2 below lam 2
    assert _descent_factor([4.0, 2.0], [10, 20], 40) == pytest.approx(2.0)
    assert _descent_factor([4.0, 2.0], [10, 20], 60) == pytest.approx(3.0)


def test_stall_is_a_count_near_keep_that_one_largest_descent_is_predicted_not_to_complete():
    assert not _stalled([8.0], [100], 128)                             # one solve: no growth rate yet
    assert not _stalled([8.0, 1.0], [3, 6], 128)                       # slow, but far from keep (near lambda_max)
    assert not _stalled([2.0, 1.0], [0, 100], 128)                     # up from nothing
    assert _stalled([2.28, 1.0], [117, 119], 128)                      # 128 predicted ~35x lower
    assert not _stalled([2.6, 1.0], [116, 121], 128)                   # 128 predicted 3.6x lower
    assert _stalled([2.0, 1.0], [90, 90], 128)                         # no growth over the last step
    # count ~ lam^-0.152 through (2, 90), (1, 100): 128 a factor 5 lower, 190 a factor 68 lower (past 8)
    assert not _stalled([2.0, 1.0], [90, 100], 128) and _stalled([2.0, 1.0], [90, 100], 190)


def test_search_stops_descending_once_the_count_stalls():
    """16 rows, 9 columns per channel: the support grows 13, 19, 23, 25 towards 32 and stalls.  The
    search tie-breaks there instead of descending to the plateau (7 more solves, each adding at most
    one channel)."""
    R, B, groups = _few_sample_conv_problem(n=16, channels=64, per_channel=9, h=32, seed=1)
    calls = []
    res = search_lambda(R, B, 32, groups, progress=lambda info: calls.append(info["iteration"]))
    assert int(res.support.sum()) == 32 and res.tie_broken
    assert calls.count(0) <= 5


def test_search_lambda_breaks_ties_by_norm():
    # Orthogonal design: M_g = B_g (1 - lam / ||B_g||)_+, unique; columns 1 and 2 have equal norms
    # so they vanish at the same lam and keep=2 is reachable only by breaking the tie.
    R = torch.eye(4, dtype=torch.float64)
    B = torch.tensor([[3.0, 2.0, 0.0, 0.5], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    res = search_lambda(R, B, 2)
    assert res.tie_broken
    assert int(res.support.sum()) == 2 and int((group_norms(res.M) > 0).sum()) == 2
    assert res.support[0] and not res.support[3]
    exact = search_lambda(R, B, 3)
    assert not exact.tie_broken and torch.equal(exact.support, torch.tensor([True, True, True, False]))


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors():
    R = torch.eye(4, dtype=torch.float64)
    B = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="Ryx must have shape"):
        group_lasso(R, torch.ones(3, 5), 0.1)
    with pytest.raises(ValueError, match="square"):
        group_lasso(torch.ones(4, 3), B, 0.1)
    with pytest.raises(ValueError, match="lam must be"):
        group_lasso(R, B, -1.0)
    with pytest.raises(ValueError, match="lam must be"):
        group_lasso(R, B, float("nan"))
    with pytest.raises(ValueError, match="unknown solver 'lbfgs'"):
        group_lasso(R, B, 0.1, solver="lbfgs")
    with pytest.raises(ValueError, match="finite"):
        group_lasso(R * float("nan"), B, 0.1)
    with pytest.raises(ValueError, match="groups must be"):
        group_lasso(R, B, 0.1, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=">= 0, or -1"):
        group_lasso(R, B, 0.1, torch.tensor([0, 1, 2, -3]))
    with pytest.raises(ValueError, match="M0 must"):
        group_lasso(R, B, 0.1, M0=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="warm_start"):
        group_lasso(R, B, 0.1, warm_start="lasso")
    with pytest.raises(ValueError, match="ryy"):
        group_lasso(R, B, 0.1, ryy=-2.0)
    with pytest.raises(ValueError, match="tol"):
        group_lasso(R, B, 0.1, tol=0)
    with pytest.raises(ValueError, match="max_time"):
        group_lasso(R, B, 0.1, max_time=0)
    with pytest.raises(ValueError, match="keep must be"):
        search_lambda(R, B, 5)
    with pytest.raises(ValueError, match="unknown option"):
        search_lambda(R, B, 2, step=3)
    with pytest.raises(ValueError, match="count_tol"):
        search_lambda(R, B, 2, count_tol=1.5)
    with pytest.raises(ValueError, match="threshold"):
        prox_group_l21(B, None, -0.5)
    with pytest.raises(ValueError, match="keep_columns"):
        debias(R, B, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="Ryx must have shape"):
        lambda_max(R, torch.ones(4))
    assert math.isclose(lambda_max(R, B), math.sqrt(3))


def _low_rank_joint_problem(seed=0):
    """Two consumers of one 12-channel stream (3 columns per channel plus a bias column each), from 12
    samples: a block-diagonal, rank-deficient Rxx like the joint statistics of a deep conv layer."""
    g = torch.Generator().manual_seed(seed)
    blocks, targets, groups = [], [], []
    for _ in range(2):
        X = torch.cat([torch.randn(12, 36, generator=g, dtype=torch.float64), torch.ones(12, 1, dtype=torch.float64)], 1)
        W = torch.randn(5, 37, generator=g, dtype=torch.float64)
        R = X.T @ X / 12
        blocks.append(R)
        targets.append(W @ R)
        groups.append(torch.cat([torch.arange(36) // 3, torch.tensor([-1])]))
    return torch.block_diag(*blocks), torch.block_diag(*targets), torch.cat(groups)


def test_blockwise_low_rank_pseudo_inverse_matches_dense_eigh():
    import fxcompress.solvers.group_lasso as gl
    R, B, _ = _low_rank_joint_problem()
    w, V = torch.linalg.eigh(R)
    cutoff = R.shape[0] * torch.finfo(R.dtype).eps * float(w.max())
    inv = torch.where(w > cutoff, 1.0 / w.clamp_min(cutoff), torch.zeros_like(w))
    reference = V @ (inv[:, None] * (V.T @ B.T))
    assert len(gl._diagonal_blocks(R)) == 2
    assert torch.allclose(gl._psd_solve(R, B.T), reference, rtol=1e-8, atol=1e-10 * float(reference.abs().max()))


def test_blockwise_low_rank_path_reaches_the_reference_optimum(monkeypatch):
    """The solver on the block-wise pivoted-Cholesky pseudo-inverse reaches the optimum of the
    reference (one dense eigendecomposition) within 1e-6 relative, with or without a keep count."""
    import fxcompress.solvers.group_lasso as gl
    R, B, groups = _low_rank_joint_problem(seed=3)
    lam = 0.2 * lambda_max(R, B, groups)
    fast = group_lasso(R, B, lam, groups, tol=1e-9)
    fast_keep = search_lambda(R, B, 6, groups, tol=1e-9)
    monkeypatch.setattr(gl, "_diagonal_blocks", lambda A: [slice(0, A.shape[0])])
    monkeypatch.setattr(gl, "_range_eigh", torch.linalg.eigh)
    ref = group_lasso(R, B, lam, groups, tol=1e-9)
    ref_keep = search_lambda(R, B, 6, groups, tol=1e-9)
    assert abs(fast.objective - ref.objective) <= 1e-6 * ref.objective
    assert torch.equal(fast.support, ref.support) and torch.equal(fast_keep.support, ref_keep.support)
    assert abs(fast_keep.objective - ref_keep.objective) <= 1e-6 * ref_keep.objective


def _few_sample_conv_problem(n=20, channels=30, per_channel=4, h=40, seed=0):
    """The statistics of a convolution seen on few rows: d = channels * per_channel + 1 columns (a bias
    column last) from n < d/2 rows, so Rxx has rank <= n; the target is the layer's own output (B = W R)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, channels * per_channel, generator=g, dtype=torch.float64).relu()
    X = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    W = torch.randn(h, X.shape[1], generator=g, dtype=torch.float64)
    R = X.T @ X / n
    groups = torch.cat([torch.arange(channels * per_channel) // per_channel, torch.tensor([-1])])
    return R, W @ R, groups


@pytest.mark.parametrize("route", ["factor", "dense where safe"])
@pytest.mark.parametrize("fraction", [0.3, 0.05])
def test_low_rank_newton_reaches_the_dense_and_fista_optimum(fraction, route, monkeypatch):
    """With rank Rxx < d/2 Newton works on the factor R = F F^T and on the k <= rank output
    directions of B (reductions 3-4); it reaches the optimum of dense Newton and of FISTA, whether its
    points go through the factor (QR + SVD) or, where lam allows, through a Cholesky of S R S + lam I."""
    import fxcompress.solvers.group_lasso as gl
    if route == "factor":
        monkeypatch.setattr(gl, "_DENSE_LAM", math.inf)
    else:
        monkeypatch.setattr(gl, "_DENSE_WIDTH", 10**9)
    R, B, groups = _few_sample_conv_problem()
    prob = gl._prepare(R, B, groups, None)
    assert len(prob.parts) == 1 and prob.parts[0].F is not None and prob.parts[0].F.shape[1] <= 20
    assert prob.outputs is not None and prob.B.shape[0] <= 21 < B.shape[0]
    lam = fraction * lambda_max(R, B, groups)
    fast = group_lasso(R, B, lam, groups, tol=1e-10)
    fista = group_lasso(R, B, lam, groups, solver="fista", tol=1e-10, max_iter=200000)
    monkeypatch.setattr(gl, "_pivoted_factor", lambda A: None)
    dense = group_lasso(R, B, lam, groups, tol=1e-10)
    assert fast.converged and dense.converged and fista.converged
    for other in (dense, fista):
        assert abs(fast.objective - other.objective) <= 1e-8 * other.objective
        assert torch.equal(fast.support, other.support)
    assert 0 < int(fast.support.sum()) < 30
    torch.testing.assert_close(fast.M, dense.M, atol=1e-5 * float(dense.M.abs().max()), rtol=0)


@pytest.mark.parametrize("shape, alive, route", [
    ((24, None, 30), 0.6, (False, True)),  # dense R: Cholesky of S R S + lam I
    ((60, 6, 40), 0.9, (True, False)),     # R = F F^T, support p > 3r: QR + SVD of S F
    ((60, 12, 40), 0.5, (True, True)),     # R = F F^T, support p <= 3r: Cholesky of F^T S^2 F + lam I
])
def test_newton_hessian_is_the_derivative_of_the_gradient_in_eta(shape, alive, route):
    """The Hessian of ``psi(eta)`` that Newton assembles from lower triangles (dsyrk) matches central
    differences of ``dpsi = lam/2 (1 - ||G_g||^2 / lam^2)`` on every curvature route."""
    import fxcompress.solvers.group_lasso as gl
    d, rank, h = shape
    R, B, _ = gram(*samples(n=400, d=d, h=h, seed=d + h, noise=0.1, shared=0.0, rank=rank))
    prob = gl._prepare(R, B, torch.arange(d) // 2, None)
    lam = 0.05 * prob.lambda_max
    g = torch.Generator().manual_seed(5)
    eta = torch.rand(prob.n_groups, generator=g, dtype=torch.float64) + 0.1
    eta[torch.rand(prob.n_groups, generator=g) > alive] = 0
    point = gl._EtaPoint(prob, eta, lam)
    assert [(p.part.F is not None, p.L is not None) for p in point.points] == [route]
    if route == (True, True):
        assert point.points[0].part.F.shape[1] < point.points[0].pcols.numel()

    def dpsi(eta):
        return 0.5 * lam * (1.0 - prob.group_sq(gl._EtaPoint(prob, eta, lam).grad) / lam**2)

    free = eta > 0
    free_cols = torch.nonzero(free[prob.grp]).flatten()
    free_grp = (torch.cumsum(free.long(), 0) - 1)[prob.grp[free_cols]]
    H = point.hessian(free_cols, free_grp, int(free.sum()))
    idx = torch.nonzero(free).flatten()
    step = 1e-6
    central = torch.stack([(dpsi(eta + step * e) - dpsi(eta - step * e))[idx] / (2 * step)
                           for e in torch.eye(eta.numel(), dtype=torch.float64)[idx]], 1)
    assert torch.equal(H, H.T)
    assert float((H - central).abs().max()) <= 1e-6 * float(central.abs().max())


def test_search_completes_keep_where_the_path_saturates():
    """With 12 rows and 3 columns per channel the path's support stops growing long before 25 of 40
    channels: the search stops there (no solves at rounding-level lam) and completes the support by
    the least-squares fit's norms, marking the result tie-broken."""
    R, B, groups = _few_sample_conv_problem(n=12, channels=40, per_channel=3, h=20, seed=4)
    calls = []
    res = search_lambda(R, B, 25, groups, progress=lambda info: calls.append(info["iteration"]))
    assert int(res.support.sum()) == 25 and res.tie_broken
    assert res.lam > 1e-8 * lambda_max(R, B, groups)
    assert calls.count(0) < 40


def test_joint_problem_is_solved_per_block_and_reaches_the_dense_optimum(monkeypatch):
    """Two consumers of one stream (block-diagonal Rxx and Ryx, channel j's columns of both in group
    j): Newton works per diagonal block ("parts", each low rank, outputs reduced per block) and
    reaches the optimum of one dense part, and the keep search picks the same channels."""
    import fxcompress.solvers.group_lasso as gl
    first, second = _few_sample_conv_problem(seed=5, h=60), _few_sample_conv_problem(seed=6, h=50)
    R, B = torch.block_diag(first[0], second[0]), torch.block_diag(first[1], second[1])
    groups = torch.cat([first[2], second[2]])
    prob = gl._prepare(R, B, groups, None)
    assert len(prob.parts) == 2 and all(part.F is not None for part in prob.parts)
    assert prob.outputs is not None and prob.B.shape[0] <= 42
    lam = 0.1 * lambda_max(R, B, groups)
    fast, fast_keep = group_lasso(R, B, lam, groups, tol=1e-10), search_lambda(R, B, 12, groups, tol=1e-10)
    monkeypatch.setattr(gl, "_parts", lambda Rp, Bp: [gl._Part(torch.arange(Rp.shape[0]), None, None)])
    dense, dense_keep = group_lasso(R, B, lam, groups, tol=1e-10), search_lambda(R, B, 12, groups, tol=1e-10)
    assert abs(fast.objective - dense.objective) <= 1e-8 * dense.objective
    assert torch.equal(fast.support, dense.support) and torch.equal(fast_keep.support, dense_keep.support)
    torch.testing.assert_close(fast.M, dense.M, atol=1e-5 * float(dense.M.abs().max()), rtol=0)


def test_joint_problem_rows_are_compacted_without_changing_the_solution(monkeypatch):
    """Three consumers of one 10-channel stream with full-rank statistics (dense parts) and 20, 30 and
    40 outputs: B (90 rows, block-diagonal) is solved on 40 compact rows; every solver, the keep
    search and a warm start reach what the uncompacted problem gives."""
    import fxcompress.solvers.group_lasso as gl
    g = torch.Generator().manual_seed(8)
    Rs, Bs, groups = [], [], []
    for h in (20, 30, 40):
        X = torch.cat([torch.randn(400, 20, generator=g, dtype=torch.float64), torch.ones(400, 1, dtype=torch.float64)], 1)
        X[:, :20] += X[:, :10].repeat(1, 2)  # channel j's two columns are correlated
        R = X.T @ X / 400
        Rs.append(R)
        Bs.append(torch.randn(h, 21, generator=g, dtype=torch.float64) @ R)
        groups.append(torch.cat([torch.arange(20) % 10, torch.tensor([-1])]))
    R, B, groups = torch.block_diag(*Rs), torch.block_diag(*Bs), torch.cat(groups)
    prob = gl._prepare(R, B, groups, None)
    assert prob.spread is not None and prob.B.shape[0] == 40 and all(part.F is None for part in prob.parts)
    lam = 0.2 * lambda_max(R, B, groups)
    compact = {solver: group_lasso(R, B, lam, groups, solver=solver, tol=1e-10) for solver in ("newton", "fista")}
    compact_keep = search_lambda(R, B, 4, groups, tol=1e-10)
    warm = group_lasso(R, B, lam, groups, tol=1e-10, M0=compact["newton"].M)
    monkeypatch.setattr(gl, "_compact_rows", lambda *args: None)
    assert gl._prepare(R, B, groups, None).B.shape[0] == 90
    full = group_lasso(R, B, lam, groups, tol=1e-10)
    full_keep = search_lambda(R, B, 4, groups, tol=1e-10)
    for res in (*compact.values(), warm):
        assert abs(res.objective - full.objective) <= 1e-7 * full.objective
        assert torch.equal(res.support, full.support)
        torch.testing.assert_close(res.M, full.M, atol=1e-4 * float(full.M.abs().max()), rtol=0)
    assert warm.iterations <= 2
    assert torch.equal(compact_keep.support, full_keep.support)
    torch.testing.assert_close(compact_keep.M, full_keep.M, atol=1e-6 * float(full_keep.M.abs().max()), rtol=0)


def test_search_lambda_with_the_data_energy_matches_the_consistent_one(monkeypatch):
    # select_neurons passes ryy = E||y||^2, which for y = W x equals the least-squares energy the solver
    # otherwise computes (an eigendecomposition of R on singular statistics): same lam, support and M; and
    # the search's first solve starts at eta = 0 without forming the least-squares fit at all.
    import fxcompress.solvers.group_lasso as gl
    R, B, groups = _low_rank_joint_problem(seed=3)
    W = torch.linalg.lstsq(R, B.T).solution.T
    ryy = float((W @ R * W).sum())
    without = search_lambda(R, B, 6, groups)
    fits = []
    monkeypatch.setattr(gl._LeastSquares, "W", property(lambda self: fits.append(1) or gl._psd_solve(self._R, self._B.T).T))
    given = search_lambda(R, B, 6, groups, ryy=ryy)
    assert fits == [] and not given.tie_broken
    assert torch.equal(given.support, without.support) and math.isclose(given.lam, without.lam, rel_tol=1e-9)
    torch.testing.assert_close(given.M, without.M, atol=1e-9, rtol=1e-7)
