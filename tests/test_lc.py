"""Tests of the LC algorithm (fxcompress.lc): C steps against brute force, the algorithm, deployment."""
from __future__ import annotations

import copy
import itertools
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.lc import algorithm
from fxcompress.lc.algorithm import run_lc, geometric_schedule
from fxcompress.lc.csteps import (CStep, available_csteps, csr_bits, kmeans1d_exact, kmeans1d_lloyd,
                                  make_cstep, register_cstep)
from fxcompress.lc.modules import CodebookConv2d, CodebookLinear, from_module




def sqerr(a, b):
    return sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kmeans_cost(values: torch.Tensor, assign) -> float:
    assign = torch.as_tensor(assign)
    return sum(float(((values[assign == c] - values[assign == c].mean()) ** 2).sum())
               for c in assign.unique())


# ----------------------------------------------------------------------------- C steps vs brute force


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_quantize_exact_is_global_kmeans_optimum(seed, k):
    weights = [rand(4, seed=seed), rand(2, 2, seed=seed + 10)]
    flat = torch.cat([w.reshape(-1) for w in weights]).double()
    best = min(kmeans_cost(flat, a) for a in itertools.product(range(k), repeat=flat.numel()))
    step = make_cstep("quantize", k=k)
    theta = step.compress(weights, mu=1.0)
    assert theta["codebook"].numel() == k
    assert sqerr(weights, step.decompress(theta)) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_quantize_exact_handles_duplicates_and_few_values():
    w = torch.tensor([0.5, 0.5, 0.5, -1.0, -1.0, 2.0])
    step = make_cstep("quantize", k=2)
    best = min(kmeans_cost(w.double(), a) for a in itertools.product(range(2), repeat=6))
    assert sqerr([w], step.decompress(step.compress([w], 1.0))) == pytest.approx(best)
    exact = make_cstep("quantize", k=5)
    assert torch.equal(exact.decompress(exact.compress([w], 1.0))[0], w)


def test_lloyd_is_seeded_and_never_beats_the_exact_dp():
    x = torch.cat([rand(500, seed=1) * 0.1 - 2, rand(300, seed=2) * 0.1, rand(200, seed=3) * 0.1 + 3])
    exact = kmeans1d_exact(x, 3)
    lloyd = kmeans1d_lloyd(x, 3, seed=5)
    assert torch.equal(lloyd, kmeans1d_lloyd(x, 3, seed=5))
    cost = lambda cb: float(((x.double()[:, None] - cb[None]) ** 2).min(1).values.sum())
    assert cost(exact) == pytest.approx(cost(lloyd), rel=1e-9)  # well separated: Lloyd finds it too
    y = rand(3000, seed=4) ** 3
    for k in (2, 5, 9):
        assert cost_y(y, kmeans1d_exact(y, k)) <= cost_y(y, kmeans1d_lloyd(y, k, seed=0)) + 1e-9
    step = make_cstep("quantize", k=3, exact=False, seed=5)
    assert sqerr([x], step.decompress(step.compress([x], 1.0))) == pytest.approx(cost(exact), rel=1e-6)


def cost_y(y, cb):
    return float(((y.double()[:, None] - cb[None]) ** 2).min(1).values.sum())


def test_exact_kmeans_scales_to_a_lenet_layer():
    w = rand(300, 784, seed=3) * 0.05
    cb = kmeans1d_exact(w, 4)
    lloyd = min(cost_y(w.reshape(-1), kmeans1d_lloyd(w, 4, seed=s)) for s in range(2))
    assert cost_y(w.reshape(-1), cb) <= lloyd + 1e-9


def test_fixed_codebook_is_nearest_value():
    cb = [-1.0, 0.25, 2.0]
    w = rand(7, seed=1) * 2
    step = make_cstep("fixed_codebook", codebook=cb)
    got = step.decompress(step.compress([w], 1.0))
    best = min(sqerr([w], [torch.tensor(c)]) for c in itertools.product(cb, repeat=7))
    assert sqerr([w], got) == pytest.approx(best)


@pytest.mark.parametrize("scale", [False, True])
def test_binarize_is_exact(scale):
    weights = [rand(5, seed=2), rand(3, seed=3)]
    flat = torch.cat(weights).double()
    best = math.inf
    for s in itertools.product([-1.0, 1.0], repeat=8):
        s = torch.tensor(s, dtype=torch.float64)
        a = float(s @ flat) / 8 if scale else 1.0  # best scale for these signs
        best = min(best, float(((flat - a * s) ** 2).sum()))
    step = make_cstep("binarize", scale=scale)
    theta = step.compress(weights, 1.0)
    assert sqerr(weights, step.decompress(theta)) == pytest.approx(best)
    assert step.storage_bits(theta) == 8 + (32 if scale else 0)


@pytest.mark.parametrize("scale", [False, True])
def test_ternarize_is_exact(scale):
    w = rand(7, seed=4) * 1.2
    flat = w.double()
    best = math.inf
    for s in itertools.product([-1.0, 0.0, 1.0], repeat=7):
        s = torch.tensor(s, dtype=torch.float64)
        a = float(s @ flat) / max(float(s.abs().sum()), 1.0) if scale else 1.0
        best = min(best, float(((flat - a * s) ** 2).sum()))
    step = make_cstep("ternarize", scale=scale)
    assert sqerr([w], step.decompress(step.compress([w], 1.0))) == pytest.approx(best)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_prune_l0_keeps_the_best_support(per_tensor):
    weights = [rand(2, 3, seed=5), rand(3, seed=6)]
    kappa = 2
    step = make_cstep("prune_l0", kappa=kappa, per_tensor=per_tensor)
    got = step.decompress(step.compress(weights, 1.0))
    if per_tensor:
        best = sum(min(float((w.reshape(-1)[[i for i in range(w.numel()) if i not in keep]] ** 2).sum())
                       for keep in itertools.combinations(range(w.numel()), kappa)) for w in weights)
        assert all(int(torch.count_nonzero(g)) == kappa for g in got)
    else:
        flat = torch.cat([w.reshape(-1) for w in weights])
        best = min(float((flat[[i for i in range(9) if i not in keep]] ** 2).sum())
                   for keep in itertools.combinations(range(9), kappa))
        assert sum(int(torch.count_nonzero(g)) for g in got) == kappa
    assert sqerr(weights, got) == pytest.approx(best)


def test_prune_l0_keep_fraction_and_csr_storage():
    w = rand(10, 20, seed=7)
    step = make_cstep("prune_l0", keep=0.1)
    theta = step.compress([w], 1.0)
    assert int(torch.count_nonzero(theta["weights"][0])) == 20
    # 20 values * (32 + ceil(log2 20) = 5) + 10 rows * ceil(log2 21) = 5
    assert step.storage_bits(theta) == 20 * 37 + 10 * 5
    assert csr_bits(torch.zeros(4, 4)) == 4 * 3


def test_prune_l1_is_the_projection_on_the_l1_ball():
    weights = [rand(6, seed=8), rand(2, 2, seed=9)]
    radius = 2.0
    step = make_cstep("prune_l1", radius=radius)
    got = step.decompress(step.compress(weights, 1.0))
    flat_got = torch.cat([g.reshape(-1) for g in got]).double()
    flat_w = torch.cat([w.reshape(-1) for w in weights]).double()
    assert float(flat_got.abs().sum()) == pytest.approx(radius)
    d_got = float((flat_w - flat_got).norm())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):  # random feasible points, near and far, are never closer
        candidate = flat_got + 0.3 * torch.randn(10, generator=gen, dtype=torch.float64)
        candidate = candidate * min(1.0, radius / float(candidate.abs().sum()))
        assert float((flat_w - candidate).norm()) >= d_got - 1e-12
    inside = [w * 0.01 for w in weights]
    assert sqerr(inside, step.decompress(step.compress(inside, 1.0))) == 0.0


def test_prune_l0_penalty_minimises_the_penalised_objective():
    w = rand(8, seed=10)
    alpha, mu = 0.3, 2.0
    step = make_cstep("prune_l0_penalty", alpha=alpha)
    got = step.decompress(step.compress([w], mu))[0].double()
    objective = lambda t: alpha * int(torch.count_nonzero(t)) + mu / 2 * float(((w.double() - t) ** 2).sum())
    best = min(objective(torch.where(torch.tensor(mask), w.double(), 0.0))
               for mask in itertools.product([False, True], repeat=8))
    assert objective(got) == pytest.approx(best)


def test_prune_l1_penalty_minimises_the_penalised_objective():
    w = rand(9, seed=11).double()
    alpha, mu = 0.4, 1.5
    step = make_cstep("prune_l1_penalty", alpha=alpha)
    got = step.decompress(step.compress([w], mu))[0]
    objective = lambda t: alpha * float(t.abs().sum()) + mu / 2 * float(((w - t) ** 2).sum())
    assert int((got == 0).sum()) > 0
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(300):
            assert objective(got) <= objective(got + scale * torch.randn(9, generator=gen, dtype=torch.float64)) + 1e-12


def test_low_rank_is_the_best_rank_r_approximation():
    weights = [rand(6, 5, seed=12), rand(4, 2, 2, 2, seed=13)]
    step = make_cstep("low_rank", rank=2)
    theta = step.compress(weights, 1.0)
    got = step.decompress(theta)
    assert [g.shape for g in got] == [w.shape for w in weights]
    for w, g in zip(weights, got):
        s = np.linalg.svd(w.reshape(w.shape[0], -1).double().numpy(), compute_uv=False)
        assert float(((w - g).double() ** 2).sum()) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-6)
        assert np.linalg.matrix_rank(g.reshape(w.shape[0], -1).double().numpy(), tol=1e-6) == 2
    gen = torch.Generator().manual_seed(2)
    for _ in range(500):  # sampled rank-2 matrices, including perturbations of ours, are never closer
        (u, v), w = theta["factors"][0], weights[0].double()
        du = u + 0.05 * torch.randn(u.shape, generator=gen, dtype=torch.float64)
        dv = v + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        assert float(((w - du @ dv.T) ** 2).sum()) >= float(((w - got[0].double()) ** 2).sum()) - 1e-9
    assert step.storage_bits(theta) == 32 * 2 * ((6 + 5) + (4 + 8))


def test_low_rank_auto_selects_the_best_rank():
    w = rand(8, 6, seed=14) @ torch.diag(torch.tensor([5.0, 3, 1, 0.3, 0.1, 0.01]))
    alpha, mu = 0.02, 1.0
    step = make_cstep("low_rank_auto", alpha=alpha)
    theta = step.compress([w], mu)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    objective = [alpha * r * (8 + 6) + mu / 2 * float((s[r:] ** 2).sum()) for r in range(7)]
    best_r = int(np.argmin(objective))
    assert 0 < best_r < 6
    assert theta["factors"][0][0].shape[1] == best_r
    assert sqerr([w], step.decompress(theta)) == pytest.approx(float((s[best_r:] ** 2).sum()), rel=1e-6)
    assert make_cstep("low_rank_auto", alpha=alpha).compress([w], 1e6)["factors"][0][0].shape[1] == 6


def test_additive_prune_plus_quantize_is_a_monotone_approximation():
    w = torch.tensor([0.1, 0.12, -0.11, 0.09, -0.1, 3.0, -2.5, 0.11])
    sparse_first = [{"name": "prune_l0", "kappa": 2}, {"name": "quantize", "k": 2}]
    errors = []
    for iterations in range(1, 8):
        step = make_cstep("additive", parts=sparse_first, iterations=iterations)
        theta = step.compress([w], 1.0)
        errors.append(sqerr([w], step.decompress(theta)))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))  # block coordinate descent
    sparse, quant = theta["parts"]
    assert int(torch.count_nonzero(sparse["weights"][0])) <= 2 and quant["codebook"].numel() == 2
    assert step.storage_bits(theta) == (make_cstep("prune_l0", kappa=2).storage_bits(sparse)
                                        + make_cstep("quantize", k=2).storage_bits(quant))
    # global optimum: the sparse part absorbs 2 weights exactly, 2-means codes the other 6
    best = min(cost_y(w[[i for i in range(8) if i not in out]], kmeans1d_exact(w[[i for i in range(8) if i not in out]], 2))
               for out in itertools.combinations(range(8), 2))
    assert best - 1e-9 <= errors[-1] <= 1.2 * best
    quant_only = make_cstep("quantize", k=2)
    quant_err = sqerr([w], quant_only.decompress(quant_only.compress([w], 1.0)))
    quant_first = make_cstep("additive", parts=sparse_first[::-1], iterations=7)
    local = sqerr([w], quant_first.decompress(quant_first.compress([w], 1.0)))
    assert 10 * best < local <= quant_err  # approximate: this order stops at a worse local solution


IDEMPOTENT = [("quantize", {"k": 3}), ("quantize", {"k": 3, "exact": False}), ("fixed_codebook", {"codebook": [0, 1]}),
              ("binarize", {}), ("binarize", {"scale": True}), ("ternarize", {}), ("ternarize", {"scale": True}),
              ("prune_l0", {"keep": 0.3}), ("prune_l0", {"kappa": 4, "per_tensor": True}),
              ("prune_l1", {"radius": 1.5}), ("prune_l0_penalty", {"alpha": 0.2}),
              ("low_rank", {"rank": 2}), ("low_rank_auto", {"alpha": 0.05})]


@pytest.mark.parametrize("name,options", IDEMPOTENT, ids=[f"{n}-{o}" for n, o in IDEMPOTENT])
def test_idempotence(name, options):
    step = make_cstep(name, **options)
    weights = [rand(5, 4, seed=20), rand(3, 2, 2, seed=21)]
    once = step.decompress(step.compress(weights, 1.0))
    twice = step.decompress(step.compress(once, 1.0))
    assert sqerr(weights, once) > 1e-6  # the weights were not feasible to begin with
    for a, b in zip(once, twice):
        assert torch.allclose(a, b, atol=1e-6)
        assert a.dtype == b.dtype == torch.float32


# ----------------------------------------------------------------------------- registry and options


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="'k'.*>= 1"):
        make_cstep("quantize", k=0)
    with pytest.raises(ValueError, match="'kappa'.*>= 0"):
        make_cstep("prune_l0", kappa=-1)
    with pytest.raises(ValueError, match="unknown C step 'quantise'.*did you mean 'quantize'"):
        make_cstep("quantise", k=2)
    with pytest.raises(ValueError, match="no option.*kk"):
        make_cstep("quantize", kk=2)
    with pytest.raises(ValueError, match="exactly one of"):
        make_cstep("prune_l0", kappa=2, keep=0.5)
    with pytest.raises(ValueError, match="'rank'"):
        make_cstep("low_rank", rank=-2)
    with pytest.raises(ValueError, match="'radius'"):
        make_cstep("prune_l1", radius=-1.0)
    with pytest.raises(ValueError, match="unknown C step"):
        make_cstep("additive", parts=[{"name": "nope"}, {"name": "binarize"}])


def test_users_can_register_a_cstep():
    @register_cstep("test_round_to_half")
    class RoundToHalf(CStep):
        def __init__(self, *, step: float = 0.5):
            self.step = step

        def compress(self, weights, mu):
            return {"w": [torch.round(w / self.step) * self.step for w in weights]}

        def decompress(self, theta):
            return list(theta["w"])

        def storage_bits(self, theta):
            return 8 * sum(w.numel() for w in theta["w"])

    assert "test_round_to_half" in available_csteps()
    step = make_cstep("test_round_to_half", step=0.25)
    assert float(step.decompress(step.compress([torch.tensor([0.3])], 1.0))[0]) == 0.25
    with pytest.raises(ValueError, match="already registered"):
        register_cstep("quantize")(RoundToHalf)


def test_run_lc_rejects_bad_arguments():
    model = nn.Linear(3, 1)
    step = make_cstep("binarize")
    batches = lambda: [(torch.zeros(2, 3), torch.zeros(2, 1))]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    with pytest.raises(ValueError, match="no parameter 'fc.weight'"):
        run_lc(model, [(["fc.weight"], step)], loss, batches, mu_schedule=[1.0])
    with pytest.raises(ValueError, match="mode"):
        run_lc(model, [(["weight"], step)], loss, batches, mode="lcx", mu_schedule=[1.0])
    with pytest.raises(ValueError, match="mu_schedule"):
        run_lc(model, [(["weight"], step)], loss, batches, mu_schedule=[])
    with pytest.raises(ValueError, match="two tasks"):
        run_lc(model, [(["weight"], step), (["weight"], step)], loss, batches, mu_schedule=[1.0])


# ----------------------------------------------------------------------------- LC on least squares


def least_squares(seed=0, d=8, n=200):
    """A linear least-squares model at its exact optimum, with correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X.double(), y.double()[:, None]).solution.T.float())
    lipschitz = float(torch.linalg.eigvalsh(2 * X.T @ X / n).max())
    return model, X, y, lipschitz


def mse(model, batch):
    return ((model(batch[0]).squeeze(1) - batch[1]) ** 2).mean()


def ls_run(mode="lc", seed=0, cstep=("binarize", {}), **kw):
    model, X, y, L = least_squares(seed)
    options = dict(mode=mode, mu_schedule=geometric_schedule(1e-2 * L, 1.3, 40), steps_per_mu=50, lr=1 / L,
                   momentum=0.5, tol=1e-4)
    options.update(kw)
    result = run_lc(model, [(["weight"], make_cstep(cstep[0], **cstep[1]))], mse, lambda: [(X, y)], **options)
    return model, result, float(mse(model, (X, y)).detach())


def test_lc_beats_direct_compression_on_binarized_least_squares():
    _, X, y, _ = least_squares(seed=3)
    best = min(float(((X @ torch.tensor(s) - y) ** 2).mean()) for s in itertools.product([-1.0, 1.0], repeat=8))
    _, dc, dc_loss = ls_run("dc", seed=3)
    _, idc, idc_loss = ls_run("idc", seed=3)
    lc_model, lc, lc_loss = ls_run("lc", seed=3)
    assert set(lc_model.weight.detach().reshape(-1).tolist()) <= {-1.0, 1.0}
    assert lc.converged and not dc.history and len(idc.history) == 40
    assert dc.initial["loss_compressed"] == pytest.approx(dc_loss, rel=1e-5)
    assert lc_loss == pytest.approx(best, rel=1e-5)  # here LC finds the NP-hard problem's global optimum
    assert lc_loss < 0.2 * dc_loss and lc_loss < 0.2 * idc_loss


@pytest.mark.parametrize("seed", [0, 1, 4, 5])
def test_lc_beats_dc_on_other_least_squares_problems(seed):
    assert ls_run("lc", seed)[2] < 0.8 * ls_run("dc", seed)[2]


def test_tiny_mu0_first_iterate_is_direct_compression():
    dc_model, dc, _ = ls_run("dc", cstep=("quantize", {"k": 2}))
    lc_model, lc, _ = ls_run("lc", cstep=("quantize", {"k": 2}), mu_schedule=[1e-9])
    assert lc.history[0]["dc_distance"] < 1e-6
    assert torch.allclose(lc_model.weight, dc_model.weight, atol=1e-6)
    assert torch.equal(lc.thetas[0]["indices"][0], dc.thetas[0]["indices"][0])


@pytest.mark.parametrize("penalty", ["al", "quadratic"])
def test_constraint_violation_decreases_over_the_schedule(penalty):
    schedule = geometric_schedule(0.5, 1.3, 30)
    _, result, _ = ls_run("lc", seed=3, tol=0.0, mu_schedule=schedule, penalty=penalty)
    violation = [r["violation"] for r in result.history]
    assert [r["mu"] for r in result.history] == schedule
    if penalty == "quadratic":  # ||w(mu) - Delta(Theta(mu))|| = O(1/mu) along the QP path
        assert all(b < a for a, b in zip(violation, violation[1:]))
        assert violation[-1] < 0.05 * violation[0]
    else:  # the AL converges much faster, down to float32 noise
        assert violation[-1] < 1e-5 * violation[0]
        assert max(violation[len(violation) // 2:]) < min(violation[:3])
        tail = violation[len(violation) // 2:]
        assert all(b < a or b < 1e-6 for a, b in zip(tail, tail[1:]))


def test_quadratic_penalty_equals_al_with_multipliers_forced_to_zero(monkeypatch):
    schedule = geometric_schedule(0.5, 1.5, 8)
    qp_model, qp, _ = ls_run("lc", penalty="quadratic", mu_schedule=schedule)
    al_model, al, _ = ls_run("lc", penalty="al", mu_schedule=schedule)
    assert any(r["lambda_norm"] > 0 for r in al.history)
    assert all(r["lambda_norm"] == 0 for r in qp.history)
    assert [r["violation"] for r in qp.history] != [r["violation"] for r in al.history]
    monkeypatch.setattr(algorithm, "_update_multipliers", lambda lam, w, dw, mu: [torch.zeros_like(l) for l in lam])
    zero_model, zero, _ = ls_run("lc", penalty="al", mu_schedule=schedule)
    assert [r["violation"] for r in zero.history] == [r["violation"] for r in qp.history]
    assert torch.equal(zero_model.weight, qp_model.weight)


def test_warns_when_stuck_at_direct_compression():
    with pytest.warns(UserWarning, match="mu probably increases too fast"):
        ls_run("lc", seed=0, mu_schedule=geometric_schedule(1e6, 1.1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ls_run("lc", seed=0)


# ----------------------------------------------------------------------------- LeNet-300-100-style MLP on digits


@pytest.fixture(scope="module")
def mlp():
    """A 64-300-100-10 ReLU MLP trained briefly on digits, with (X, y, train indices, test indices)."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        for batch in minibatches(X, y, train)():
            opt.zero_grad()
            cross_entropy(model, batch).backward()
            opt.step()
    return model, (X, y, train, test)


def minibatches(X, y, idx, size=128):
    def epoch():
        p = idx[torch.randperm(len(idx))]
        return [(X[p[i:i + size]], y[p[i:i + size]]) for i in range(0, len(p), size)]
    return epoch


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def accuracy(model, X, y, idx):
    with torch.no_grad():
        return float((model(X[idx]).argmax(1) == y[idx]).float().mean())


def digits_lc(mlp, checkpoint, interrupt_at=None, resume=False, mode="lc", k=2, steps=6, seen=None):
    """LC (or DC/iDC) quantization of a copy of the digits MLP with one K-entry codebook per layer."""
    model, (X, y, train, test) = copy.deepcopy(mlp[0]), mlp[1]
    tasks = [([f"{i}.weight"], make_cstep("quantize", k=k)) for i in (0, 2, 4)]

    def progress(record):
        if seen is not None:
            seen.append(record["step"])
        if record["step"] == interrupt_at:
            raise KeyboardInterrupt

    result = run_lc(model, tasks, cross_entropy, minibatches(X, y, train), mode=mode,
                    mu_schedule=geometric_schedule(1e-2, 1.5, steps), steps_per_mu=30, lr=0.05, momentum=0.9,
                    tol=1e-3, checkpoint_path=checkpoint, resume=resume, progress=progress, seed=3)
    return model, result, accuracy(model, X, y, test)


def test_lc_quantization_beats_dc_and_idc_on_digits_mlp(mlp):
    reference, (X, y, train, test) = mlp
    assert accuracy(reference, X, y, test) > 0.95
    accs = {mode: digits_lc(mlp, None, mode=mode, k=2, steps=20) for mode in ("dc", "idc", "lc")}
    lc_model, lc, lc_acc = accs["lc"]
    for layer in (0, 2, 4):
        assert torch.unique(lc_model[layer].weight).numel() <= 2
    assert lc_acc > accs["dc"][2] + 0.03
    assert lc_acc > accs["idc"][2] + 0.015
    assert lc.history[-1]["violation"] < lc.history[0]["violation"]
    assert lc.storage_bits == sum(m.weight.numel() + 2 * 32 for m in lc_model if isinstance(m, nn.Linear))
    assert lc.compression_ratio > 25


def test_resume_from_checkpoint_matches_uninterrupted_run(mlp, tmp_path):
    full_model, full, _ = digits_lc(mlp, None)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        digits_lc(mlp, path, interrupt_at=2)
    assert path.exists() and not os.path.exists(f"{path}.tmp")
    seen: list[int] = []
    model, resumed, _ = digits_lc(mlp, path, resume=True, seen=seen)
    assert seen == [3, 4, 5]
    assert resumed.history == full.history
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        digits_lc(mlp, path, resume=True, steps=7)


# ----------------------------------------------------------------------------- deployable modules and ONNX


def onnx_run(module, example, path):
    import onnxruntime as ort
    torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]


def test_codebook_modules_match_the_quantized_layers():
    linear, conv = nn.Linear(6, 4), nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1)
    for layer, x in ((linear, rand(2, 6)), (conv, rand(2, 3, 7, 7))):
        theta = make_cstep("quantize", k=3).compress([layer.weight], 1.0)
        q = from_module(layer, theta["codebook"].float(), theta["indices"][0])
        assert q.indices.dtype == torch.uint8 and q.codebook.numel() == 3
        with torch.no_grad():
            layer.weight.copy_(theta["codebook"][theta["indices"][0]])
        assert torch.allclose(q(x), layer(x), atol=1e-6)
    big = CodebookLinear(torch.linspace(-1, 1, 300), torch.randint(300, (3, 4)))
    assert big.indices.dtype == torch.int16
    with pytest.raises(ValueError, match="indices must be integers"):
        CodebookLinear(torch.tensor([0.0, 1.0]), torch.tensor([[0, 2]]))
    with pytest.raises(TypeError):
        from_module(nn.ReLU(), torch.zeros(2), torch.zeros(1))


def test_codebook_modules_export_to_onnx_and_shrink_the_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    x = rand(4, 784, seed=5)
    float_out = onnx_run(net, x, tmp_path / "float.onnx")
    assert np.allclose(float_out, net(x).detach().numpy(), atol=1e-5)
    step = make_cstep("quantize", k=4)
    layers = []
    for m in net:
        if isinstance(m, nn.Linear):
            theta = step.compress([m.weight], 1.0)
            m = CodebookLinear.from_module(m, theta["codebook"].float(), theta["indices"][0])
        layers.append(m)
    qnet = nn.Sequential(*layers).eval()
    q_out = onnx_run(qnet, x, tmp_path / "q.onnx")
    assert np.allclose(q_out, qnet(x).detach().numpy(), atol=1e-5)
    assert os.path.getsize(tmp_path / "q.onnx") <= os.path.getsize(tmp_path / "float.onnx") / 3
    conv = CodebookConv2d.from_module(nn.Conv2d(3, 4, 3, padding=1), torch.tensor([-0.2, 0.0, 0.3]),
                                      torch.randint(3, (4, 3, 3, 3), generator=torch.Generator().manual_seed(1)))
    xi = rand(2, 3, 8, 8, seed=6)
    assert np.allclose(onnx_run(conv.eval(), xi, tmp_path / "conv.onnx"), conv(xi).detach().numpy(), atol=1e-5)
