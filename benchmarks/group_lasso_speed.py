"""Speed of the group-lasso reconstruction solvers (fxcompress.solvers.group_lasso).

Not a test: prints side-by-side tables.

1. The product target, on a realistic layer: X = ReLU activations of a random 2-layer MLP
   (784 -> 800 -> 500) on 20,000 Gaussian inputs, d=800, h=500, lam leaving 400 of 800 inputs.
   Target: relative duality gap 1e-6 in < 5 s, and the lam search for keep=400 in < 20 s.
   Every solver starts from zero at the same lam; the first-order ones are capped at --cap s.
2. scikit-learn MultiTaskLasso on the raw samples of a smaller layer (d=100, h=200, n=20,000),
   against ours on the Gram statistics of the same samples (Gram time counted).
   sklearn minimises (1/(2n)) ||Y - X C^T||_F^2 + alpha sum_j ||C[:, j]||, which is our F with
   Rxx = X^T X / n, Ryx = Y^T X / n, ryy = ||Y||^2 / n: alpha = lam, fit_intercept=False.
3. Scaling with d (h = d/2): one solve at lam = 0.1 lam_max and a search for keep = d/4.

    python benchmarks/group_lasso_speed.py [--quick] [--cap 60] [--sizes 256 1024 4096]
"""
from __future__ import annotations

import argparse
import time

import torch

from fxcompress.solvers.group_lasso import group_lasso, lambda_max, search_lambda

DTYPE = torch.float64


def relu_layer(d: int, h: int, n: int, p: int = 784, seed: int = 0, chunk: int = 2000, samples=False):
    """Statistics (and optionally the samples) of y = W2 relu(W1 z + b1), z ~ N(0, I_p)."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(d, p, generator=g, dtype=DTYPE) / p**0.5
    b1 = 0.1 * torch.randn(d, generator=g, dtype=DTYPE)
    W2 = torch.randn(h, d, generator=g, dtype=DTYPE) / d**0.5
    R = torch.zeros(d, d, dtype=DTYPE)
    xs = []
    for start in range(0, n, chunk):
        x = torch.relu(torch.randn(min(chunk, n - start), p, generator=g, dtype=DTYPE) @ W1.T + b1)
        R.addmm_(x.T, x, alpha=1.0 / n)
        if samples:
            xs.append(x)
    B = W2 @ R
    ryy = float((B * W2).sum())  # E||W2 x||^2
    X = torch.cat(xs) if samples else None
    return R, B, ryy, X, W2


def certify(R, B, ryy, lam, M):
    """Objective and relative duality gap of any M (zero iterations of pgd only certifies M0)."""
    res = group_lasso(R, B, lam, ryy=ryy, solver="pgd", M0=M, max_iter=0)
    return res.objective, res.rel_gap


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def product_target(cap: float, tol: float) -> None:
    print("\n== 1. realistic layer: d=800, h=500, n=20000 ReLU activations, keep 400 of 800 ==")
    (R, B, ryy, _, _), t_stats = timed(lambda: relu_layer(800, 500, 20000))
    print(f"statistics: {t_stats:.2f} s")
    search, t_search = timed(lambda: search_lambda(R, B, 400, ryy=ryy, tol=tol))
    lam = search.lam
    print(f"lam search for keep=400: {t_search:.2f} s, lam={lam:.6g}, kept={int(search.support.sum())}, "
          f"{search.iterations} Newton iterations in all  [target < 20 s: {'PASS' if t_search < 20 else 'FAIL'}]")
    runs = [
        ("auto (newton)", dict(solver="auto")),
        ("fista q=10 (seed)", dict(solver="fista", q=10.0)),
        ("fista+altmin warm", dict(solver="fista", warm_start="altmin")),
        ("pgd", dict(solver="pgd")),
        ("bcd", dict(solver="bcd")),
        ("altmin (seed)", dict(solver="altmin")),
    ]
    rows, base = [], None
    for name, kw in runs:
        limit = None if kw["solver"] == "auto" else cap
        res, t = timed(lambda: group_lasso(R, B, lam, ryy=ryy, tol=tol, max_time=limit, **kw))
        base = base or t
        rows.append([name, f"{t:.2f}", res.iterations, f"{res.rel_gap:.1e}", f"{res.objective:.10f}",
                     int(res.support.sum()), "yes" if res.converged else f"no (cap {cap:g} s)", f"{t / base:.0f}x"])
        if name.startswith("auto"):
            verdict = "PASS" if res.converged and t < 5 else "FAIL"
    table(["solver", "time s", "iters", "rel gap", "objective F", "kept", "converged", "time/auto"], rows)
    print(f"target: rel gap {tol:g} in < 5 s with the default solver: {verdict}")


def versus_sklearn(tol: float, sk_max_iter: int) -> None:
    from sklearn.linear_model import MultiTaskLasso

    print("\n== 2. scikit-learn MultiTaskLasso (raw samples) vs ours (Gram): d=100, h=200, n=20000 ==")
    R, B, ryy, X, W2 = relu_layer(100, 200, 20000, samples=True)
    Y = X @ W2.T
    lam = search_lambda(R, B, 50, ryy=ryy, tol=1e-10).lam
    print(f"lam={lam:.6g} (keeps 50 of 100); sklearn alpha = lam, fit_intercept=False, tol={tol:g}")
    (Rg, Bg), t_gram = timed(lambda: (X.T @ X / X.shape[0], Y.T @ X / X.shape[0]))
    ours, t_ours = timed(lambda: group_lasso(Rg, Bg, lam, ryy=ryy, tol=tol))
    sk = MultiTaskLasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=sk_max_iter)
    _, t_sk = timed(lambda: sk.fit(X.numpy(), Y.numpy()))
    sk_obj, sk_gap = certify(R, B, ryy, lam, torch.from_numpy(sk.coef_))
    sk_kept = int((torch.from_numpy(sk.coef_).norm(dim=0) > 0).sum())
    rows = [
        ["sklearn MultiTaskLasso", f"{t_sk:.3f}", sk.n_iter_, f"{sk_gap:.1e}", f"{sk_obj:.10f}", sk_kept, "1x"],
        ["ours: Gram + auto", f"{t_gram + t_ours:.3f}", ours.iterations, f"{ours.rel_gap:.1e}",
         f"{ours.objective:.10f}", int(ours.support.sum()), f"{t_sk / (t_gram + t_ours):.0f}x faster"],
        ["ours: solve only", f"{t_ours:.3f}", ours.iterations, "", "", "", f"{t_sk / t_ours:.0f}x faster"],
    ]
    table(["method", "time s", "iters", "rel gap", "objective F", "kept", "ratio"], rows)
    print("(rel gap of the sklearn solution measured with our certificate; iters = sklearn epochs)")


def scaling(sizes, tol: float) -> None:
    print("\n== 3. scaling: h = d/2, n = 20000 ReLU activations ==")
    rows = []
    for d in sizes:
        (R, B, ryy, _, _), t_stats = timed(lambda: relu_layer(d, d // 2, 20000))
        lam = 0.1 * lambda_max(R, B)
        res, t = timed(lambda: group_lasso(R, B, lam, ryy=ryy, tol=tol))
        search, t_search = timed(lambda: search_lambda(R, B, d // 4, ryy=ryy, tol=tol))
        rows.append([d, d // 2, f"{t_stats:.1f}", f"{t:.2f}", res.iterations, int(res.support.sum()),
                     f"{res.rel_gap:.1e}", f"{t_search:.2f}", int(search.support.sum())])
    table(["d", "h", "stats s", "solve s (0.1 lam_max)", "iters", "kept", "rel gap",
           "search s (keep d/4)", "kept"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s caps, sizes 256 1024, fewer sklearn epochs")
    parser.add_argument("--cap", type=float, default=60.0, help="time cap in seconds of the slow solvers")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative duality gap target")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = 10.0 if args.quick else args.cap
    sizes = [d for d in args.sizes if d <= 1024] if args.quick else args.sizes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU")
    product_target(cap, args.tol)
    versus_sklearn(args.tol, 300 if args.quick else 5000)
    scaling(sizes, args.tol)


if __name__ == "__main__":
    main()
