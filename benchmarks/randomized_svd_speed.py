"""Speed and accuracy of fxcompress's randomized SVD against torch's SVDs.

For matrices with singular values i^-1 (built from random orthonormal factors,
so the optimal rank-k error ||A - A_k||_F = sqrt(sum_{i>k} sigma_i^2) is known
exactly), times three rank-k approximations and reports their Frobenius errors
relative to that optimum:

* ``svd``:     torch.linalg.svd, truncated to rank k (the exact fallback);
* ``lowrank``: torch.svd_lowrank with q = k + oversample, niter = power_iters;
* ``ours``:    fxcompress.solvers.randomized_svd.randomized_svd with the same
               oversampling and power iterations (seed 001, Alg. 4 + Alg. 6).

Usage::

    python benchmarks/randomized_svd_speed.py            # 4096x4096, 1024x4096
    python benchmarks/randomized_svd_speed.py --quick    # small sizes
    python benchmarks/randomized_svd_speed.py --device cuda
"""

import argparse
import time

import torch

from fxcompress.solvers.randomized_svd import randomized_svd

FULL = {"shapes": [(4096, 4096), (1024, 4096)], "ranks": [32, 128, 512]}
QUICK = {"shapes": [(1024, 1024), (256, 1024)], "ranks": [16, 32, 64]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--test-matrix", default="gaussian", choices=["gaussian", "srft"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    return parser.parse_args()


def harmonic_matrix(m, n, dtype, device, seed=0):
    """A = U diag(1/i) V^T with random orthonormal U, V; returns A and sigma."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    sigma = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    A = (U * sigma) @ V.T
    return A.to(dtype=dtype, device=device), sigma


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Run ``fn`` once to warm up, then return (best seconds, last result).

    The best of ``repeats`` runs is the least disturbed by other load.
    """
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def frobenius_error(A, U, S, Vh):
    """||A - U diag(S) Vh||_F, evaluated in float64 so that rounding in the
    residual does not blur ratios close to 1."""
    A, U, S, Vh = (t.double() for t in (A, U, S, Vh))
    return torch.linalg.matrix_norm(A - (U * S) @ Vh).item()


def exact_svd(A):
    return torch.linalg.svd(A, full_matrices=False)


def lowrank_svd(A, rank, args):
    torch.manual_seed(0)
    U, S, V = torch.svd_lowrank(A, q=rank + args.oversample, niter=args.power_iters)
    return U[:, :rank], S[:rank], V[:, :rank].mT


def our_svd(A, rank, args):
    return randomized_svd(
        A,
        rank,
        oversample=args.oversample,
        power_iters=args.power_iters,
        test_matrix=args.test_matrix,
    )


def benchmark_shape(m, n, ranks, args, dtype):
    """Rows of the table for one matrix shape."""
    A, sigma = harmonic_matrix(m, n, dtype, args.device)
    t_svd, (U_all, S_all, Vh_all) = timed(lambda: exact_svd(A), args.device, 1)
    rows = []
    for rank in ranks:
        optimal = sigma[rank:].norm().item()
        t_low, low = timed(lambda: lowrank_svd(A, rank, args), args.device, args.repeats)
        t_our, our = timed(lambda: our_svd(A, rank, args), args.device, args.repeats)
        exact = (U_all[:, :rank], S_all[:rank], Vh_all[:rank])
        rows.append(
            {
                "shape": f"{m}x{n}",
                "rank": rank,
                "t_svd": t_svd,
                "t_low": t_low,
                "t_our": t_our,
                "e_svd": frobenius_error(A, *exact) / optimal,
                "e_low": frobenius_error(A, *low) / optimal,
                "e_our": frobenius_error(A, *our) / optimal,
            }
        )
    return rows


HEADER = (
    f"{'shape':>10} {'rank':>5} | {'svd s':>8} {'lowrank s':>9} {'ours s':>8} | "
    f"{'svd/ours':>8} {'lowrank/ours':>12} | "
    f"{'err svd':>8} {'err lowrank':>11} {'err ours':>9} {'ours/lowrank':>12}"
)


def format_row(row):
    return (
        f"{row['shape']:>10} {row['rank']:>5} | "
        f"{row['t_svd']:>8.3f} {row['t_low']:>9.3f} {row['t_our']:>8.3f} | "
        f"{row['t_svd'] / row['t_our']:>7.1f}x {row['t_low'] / row['t_our']:>11.2f}x | "
        f"{row['e_svd']:>8.4f} {row['e_low']:>11.4f} {row['e_our']:>9.4f} "
        f"{row['e_our'] / row['e_low']:>12.4f}"
    )


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    sizes = QUICK if args.quick else FULL
    device_name = (
        torch.cuda.get_device_name(args.device)
        if torch.device(args.device).type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {device_name}, dtype: {args.dtype}, torch {torch.__version__}, "
        f"singular values i^-1, oversample={args.oversample}, "
        f"power_iters={args.power_iters}, test_matrix={args.test_matrix}"
    )
    print(
        f"times: best of {args.repeats} runs after a warm-up "
        "(exact svd: 1 run, shared by all ranks)"
    )
    print("errors: ||A - A_k||_F / optimal ||A - A_k||_F (1.0000 = Eckart-Young optimum)")
    print(HEADER)
    print("-" * len(HEADER))
    for m, n in sizes["shapes"]:
        for row in benchmark_shape(m, n, sizes["ranks"], args, dtype):
            print(format_row(row), flush=True)


if __name__ == "__main__":
    main()
