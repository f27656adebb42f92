"""low_rank: replace Linear / Conv1d / Conv2d layers by two thinner layers (truncated SVD, seed 001).

A layer whose weight, read as a matrix W (m x n; a convolution as out x in*kernel, seed 001
section 12.1.2), is approximated by W ~ A B with A = U_r S_r (m x r) and B = V_r^T (r x n) becomes an
``nn.Sequential`` of two layers, named ``project`` and ``expand`` (seed 001 sections 12.1.3, 13.1.6):

* Linear(n -> m):  project = Linear(n -> r, no bias) with B, expand = Linear(r -> m) with A and the bias.
* ConvNd(C_in -> C_out, kernel k): project = ConvNd(C_in -> r, kernel k) with B reshaped to
  r x C_in x k, carrying the original stride, padding, dilation and padding_mode; expand = 1x1
  ConvNd(r -> C_out) with A and the bias.  Seed 001 section 12.1.3 puts the stride on the 1x1
  convolution instead.  The outputs are the same (a 1x1 convolution commutes with spatial
  subsampling), but with the stride on the k x k convolution the r intermediate channels are only
  computed at the output positions: stride^d times fewer MACs in ``project``.

The graph then calls ``<name>.project`` and ``<name>.expand`` as two nodes, so shapes and MACs of
each factor show in the report.  A layer that the graph does not call itself (inside a leaf
module) is swapped for the ``nn.Sequential`` in place.

Grouped convolutions (groups = g > 1) are block diagonal; each group's block (C_out/g x
C_in/g*k) is factorised with the same rank r, and the factors are grouped convolutions with g
groups of r channels (project: C_in -> g r, expand: g r -> C_out).  Ranks, the break-even test and
the ``ratio`` rule apply per group; ``energy`` and ``tolerance`` take the largest rank any group needs.

Configuration (``LowRankConfig``)::

    - low_rank:
        targets: [fc1, {type: Conv2d}]     # default: every Linear/Conv1d/Conv2d
        rank: 32                  # or {ratio: 0.25} | {energy: 0.9} | {tolerance: 1e-2} | {from: sensitivity}
        method: svd               # svd | randomized | activation
        power_iters: 2            # randomized: subspace iterations (seed 001 Alg. 4)
        oversample: 10            # randomized: extra samples p (seed 001 section 3.2)
        damping: 1.0e-4           # activation: ridge added to the input covariance, relative to its mean eigenvalue

Rank rules, per targeted layer (m x n per group):

* ``rank: r`` -- r itself; r > min(m, n) is an error before any pass runs, naming the layer.
* ``{ratio: f}`` -- the largest r with r (m + n) <= f m n: keep the fraction f of the weights.
* ``{energy: f}`` -- the smallest r whose squared singular values reach f of their sum (seed 001
  sections 13 and 15); of the whitened matrix W C^{1/2} with ``method: activation``.
* ``{tolerance: t}`` -- the adaptive range finder (seed 001 Alg. 3, ``svd_to_tolerance``) to a
  spectral-norm error t ||M||_2, M = W (or W C^{1/2}); it supplies the factors whatever the method.
* ``{from: sensitivity}`` -- ``ctx.state["sensitivity"]["ranks"][name]`` written by the ``sensitivity``
  pass; layers it gives no rank stay dense.

Break-even guard: a layer where r (m + n) >= m n would not shrink, so it is left dense and the
report says so.

Methods: ``svd`` (exact, LAPACK), ``randomized`` (HMT randomized SVD with subspace iteration, seed
001 Alg. 11 via ``fxcompress.solvers.randomized_svd``), ``activation`` (data-aware, see
``whitenings``: minimises the output error E||W x + b - (A B x + b')||^2 on calibration data).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from torch import Tensor, fx, nn

from fxcompress import RecipeError, TargetedConfig, register_pass
from fxcompress.graph.spectrum import FACTORISABLE, weight_matrices
from fxcompress.rewrite import finish, replace_module
from fxcompress.solvers.randomized_svd import (
    breaks_even, randomized_svd, rank_for_energy, rank_for_ratio, svd_to_tolerance, truncated_svd)
from fxcompress.stats import LayerStats, collect_stats
from fxcompress.targets import select_modules

__all__ = ["Factors", "LowRankConfig", "RankPolicy", "factorize", "factors_to_module", "replace_with_factors",
           "whitenings"]

METHODS = ("svd", "randomized", "activation")
RULES = ("fixed", "ratio", "energy", "tolerance", "from")


class RankPolicy(BaseModel):
    """How the rank of each targeted layer is chosen: exactly one rule (see the module docstring).

    A bare integer in YAML (``rank: 32``) means ``{fixed: 32}``.
    """
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    fixed: int | None = Field(None, ge=1, description="this rank for every targeted layer")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's weights to keep")
    energy: float | None = Field(None, gt=0, le=1, description="fraction of the squared singular values kept")
    tolerance: float | None = Field(None, gt=0, lt=1, description="relative spectral-norm error")
    from_: Literal["sensitivity"] | None = Field(None, alias="from", description="ranks of an earlier pass")

    @model_validator(mode="before")
    @classmethod
    def _integer_is_fixed(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return {"fixed": value}
        if isinstance(value, (dict, RankPolicy)):
            return value
        raise ValueError("rank is an integer or one of {ratio: F}, {energy: F}, {tolerance: F}, "
                         "{from: sensitivity}")

    @model_validator(mode="after")
    def _exactly_one_rule(self):
        given = [rule for rule in RULES if self.value(rule) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one rank rule of {', '.join(RULES)}; got "
                             f"{', '.join(given) or 'none'}")
        return self

    def value(self, rule: str):
        return self.from_ if rule == "from" else getattr(self, rule)

    @property
    def rule(self) -> str:
        return next(rule for rule in RULES if self.value(rule) is not None)


RANK_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 1}, RankPolicy.model_json_schema()]}


class LowRankConfig(TargetedConfig):
    rank: Annotated[RankPolicy, WithJsonSchema(RANK_SCHEMA)] = Field(
        description="an integer, or {ratio|energy|tolerance: F} or {from: sensitivity}")
    method: Literal["svd", "randomized", "activation"] = Field(
        "svd", description="svd (exact), randomized (HMT, seed 001 Alg. 11) or activation (data-aware)")
    power_iters: int = Field(2, ge=0, description="randomized: subspace iterations")
    oversample: int = Field(10, ge=0, description="randomized: oversampling")
    damping: float = Field(1e-4, ge=0, description="activation: ridge on the input covariance, relative to "
                                                    "its mean eigenvalue (0: pseudo-inverse)")


# ------------------------------------------------------------------------------------ whitening


@dataclass
class Whitening:
    """One group's input statistics as the data-aware factorisation uses them.

    ``root`` = C^{1/2} and ``inverse_root`` = its (regularised pseudo-)inverse, C the input
    covariance (or, for a layer without a free bias, the second moment R_xx); ``mean`` = E[x] when
    the bias absorbs the mean error, else None; ``moments`` the full (bias-augmented) R_xx used to
    measure output errors.
    """
    root: Tensor
    inverse_root: Tensor
    mean: Tensor | None
    moments: Tensor


def whitenings(stats: LayerStats, damping: float = 1e-4) -> list[Whitening]:
    """The whitening of each group of a layer from its ``collect_stats`` statistics.

    The output error of a rank-r layer, E||W x + b - (A B x + b')||^2, is smallest for
    b' = b + (W - A B) mu (mu = E[x]); it is then ||(W - A B) C^{1/2}||_F^2 with C the covariance
    of x, so the best A B is the rank-r truncated SVD of W C^{1/2} mapped back by C^{-1/2}:
    U_r S_r V_r^T = svd_r(W C^{1/2}), A = U_r S_r, B = V_r^T C^{-1/2} -- the data-aware low rank of
    seed 003 section 2.1 (min E||W X - P Q^T X||^2) solved by whitening.  This needs the bias column
    of the statistics (``append_bias=True``, a layer with a bias); otherwise b' = b and C = R_xx.

    C is made definite with a ridge ``damping * mean eigenvalue`` (C + delta I: the factors then
    minimise the output error plus delta ||W - A B||_F^2, so the directions the calibration data
    never excites keep W's action, and at full rank A B = W).  With ``damping=0`` the inverse is the
    pseudo-inverse that drops eigenvalues below n * eps * largest.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    moments = stats.Rxx if stats.groups > 1 else stats.Rxx.unsqueeze(0)
    return [_whitening(r, stats.has_bias_column, damping) for r in moments]


def _whitening(moments: Tensor, has_bias_column: bool, damping: float) -> Whitening:
    mean = moments[:-1, -1] if has_bias_column else None
    covariance = moments[:-1, :-1] - torch.outer(mean, mean) if has_bias_column else moments
    eigenvalues, basis = torch.linalg.eigh((covariance + covariance.T) / 2)
    eigenvalues = eigenvalues.clamp(min=0)
    eigenvalues = eigenvalues + damping * eigenvalues.mean()
    cutoff = eigenvalues.shape[0] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.max()
    kept = eigenvalues > cutoff
    root = eigenvalues.sqrt()
    inverse = torch.where(kept, eigenvalues.clamp(min=cutoff).rsqrt(), torch.zeros_like(root))
    return Whitening(root=(basis * root) @ basis.T, inverse_root=(basis * inverse) @ basis.T, mean=mean,
                     moments=moments)


# ------------------------------------------------------------------------------------ factors


@dataclass
class Factors:
    """W_g ~ lefts[g] @ rights[g] for every group g (lefts m x r, rights r x n), and the new bias."""
    lefts: list[Tensor]
    rights: list[Tensor]
    bias: Tensor | None

    @property
    def rank(self) -> int:
        return self.rights[0].shape[0]


def _to_factor(blocks: list[Tensor], whitening: list[Whitening] | None) -> list[Tensor]:
    """The matrices whose truncated SVD gives the factors: W_g, or W_g C_g^{1/2} (data-aware)."""
    if whitening is None:
        return blocks
    return [w @ white.root for w, white in zip(blocks, whitening)]


def _svd_pairs(matrices: list[Tensor], rank: int, method: str, *, oversample: int, power_iters: int,
               seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Rank-``rank`` (U, S, Vh) of each matrix: randomized (HMT) or exact SVD."""
    solver = "randomized" if method == "randomized" else "exact"
    options = dict(oversample=oversample, power_iters=power_iters, seed=seed) if solver == "randomized" else {}
    return [truncated_svd(matrix, rank, method=solver, **options) for matrix in matrices]


def _tolerance_pairs(matrices: list[Tensor], tolerance: float, seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(U, S, Vh) with ||M - U S Vh||_2 <= tolerance ||M||_2 for each M, all of the largest rank needed.

    The adaptive range finder picks each rank (seed 001 Alg. 3, ``svd_to_tolerance``); groups that
    needed fewer directions are refactorised exactly at the common rank, which only lowers their error.
    """
    pairs = [svd_to_tolerance(matrix, tolerance * _spectral_norm(matrix, seed), seed=seed) if matrix.any()
             else truncated_svd(matrix, 1, method="exact") for matrix in matrices]
    rank = max(s.shape[0] for _, s, _ in pairs)
    return [pair if pair[1].shape[0] == rank else truncated_svd(matrix, rank, method="exact")
            for pair, matrix in zip(pairs, matrices)]


def _spectral_norm(matrix: Tensor, seed: int) -> float:
    """||M||_2 from a rank-1 randomized SVD with subspace iteration (a slight underestimate at worst,
    which only tightens the tolerance)."""
    return float(randomized_svd(matrix, 1, oversample=5, power_iters=4, seed=seed)[1][0])


def _factors(pairs, blocks: list[Tensor], whitening: list[Whitening] | None, bias: Tensor | None) -> Factors:
    """A = U S, B = Vh (C^{-1/2} Vh data-aware), and the bias that absorbs the mean error."""
    lefts = [u * s for u, s, _ in pairs]
    rights = [vh for _, _, vh in pairs]
    if whitening is None:
        return Factors(lefts, rights, bias)
    rights = [vh @ white.inverse_root for vh, white in zip(rights, whitening)]
    if bias is None or whitening[0].mean is None:
        return Factors(lefts, rights, bias)
    shift = [(w - a @ b) @ white.mean for w, a, b, white in zip(blocks, lefts, rights, whitening)]
    return Factors(lefts, rights, bias + torch.cat(shift))


def _blocks(layer: nn.Module) -> list[Tensor]:
    return [b.to(torch.float64) for b in weight_matrices(layer)]


def _bias(layer: nn.Module) -> Tensor | None:
    return None if layer.bias is None else layer.bias.detach().to(torch.float64)


def factorize(layer: nn.Module, rank: int, *, method: str = "svd", stats: LayerStats | None = None,
              seed: int = 0, oversample: int = 10, power_iters: int = 2, damping: float = 1e-4) -> nn.Sequential:
    """The rank-``rank`` factorisation of one Linear/Conv1d/Conv2d as ``Sequential(project, expand)``.

    ``method``: ``"svd"`` (exact), ``"randomized"`` (HMT with ``oversample`` and ``power_iters``,
    drawn from ``seed``) or ``"activation"`` (data-aware; ``stats`` are the layer's
    ``collect_stats(..., append_bias=True)`` statistics, see ``whitenings``).  ``rank`` is per group
    for grouped convolutions.  No break-even guard here: check ``breaks_even`` first if it matters.
    The layer is not modified; the result has its dtype and device.

    Raises:
        ValueError: rank outside [1, min(m, n)], unknown method, ``activation`` without stats.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "activation" and stats is None:
        raise ValueError("method 'activation' needs the layer's statistics: stats=collect_stats(...)[name]")
    blocks = _blocks(layer)
    m, n = blocks[0].shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank!r} is invalid for a {m}x{n} weight matrix{_per_group(layer)}: "
                         f"choose 1 <= rank <= {min(m, n)}")
    whitening = whitenings(stats, damping) if method == "activation" else None
    pairs = _svd_pairs(_to_factor(blocks, whitening), rank, method, oversample=oversample,
                       power_iters=power_iters, seed=seed)
    return factors_to_module(layer, _factors(pairs, blocks, whitening, _bias(layer)))


def _per_group(layer: nn.Module) -> str:
    groups = getattr(layer, "groups", 1)
    return f" (per group of {groups})" if groups > 1 else ""


# ------------------------------------------------------------------------------------ modules


def factors_to_module(layer: nn.Module, factors: Factors) -> nn.Sequential:
    """``Sequential(project, expand)`` computing ``layer`` with W_g replaced by lefts[g] @ rights[g].

    Also usable with factors from elsewhere, e.g. the (U, V) of the ``lc`` pass's low-rank C step:
    ``Factors([U], [V.T], bias)``.
    """
    groups = len(factors.lefts)
    rank = factors.rank
    options = dict(dtype=layer.weight.dtype, device=layer.weight.device)
    has_bias = factors.bias is not None
    if isinstance(layer, nn.Linear):
        project = nn.Linear(layer.in_features, rank, bias=False, **options)
        expand = nn.Linear(rank, layer.out_features, bias=has_bias, **options)
    else:
        conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        project = conv(layer.in_channels, groups * rank, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, groups=groups, bias=False,
                       padding_mode=layer.padding_mode, **options)
        expand = conv(groups * rank, layer.out_channels, 1, groups=groups, bias=has_bias, **options)
    with torch.no_grad():
        project.weight.copy_(torch.cat(factors.rights).reshape(project.weight.shape))
        expand.weight.copy_(torch.cat(factors.lefts).reshape(expand.weight.shape))
        if has_bias:
            expand.bias.copy_(factors.bias)
    return nn.Sequential(OrderedDict(project=project, expand=expand))


def replace_with_factors(gm: fx.GraphModule, name: str, factors: nn.Sequential) -> None:
    """Install ``factors`` (from ``factorize``) at ``name`` and call its two layers as two graph nodes.

    Every ``call_module`` node of ``name`` becomes ``name.project`` followed by ``name.expand``.  If
    the graph does not call ``name`` (it sits inside a leaf module) the Sequential simply replaces
    the module.  Call ``fxcompress.rewrite.finish(gm)`` afterwards.
    """
    replace_module(gm, name, factors)
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]:
        with gm.graph.inserting_after(node):
            expand = gm.graph.call_module(f"{name}.expand", (node,))
        node.replace_all_uses_with(expand, delete_user_cb=lambda user: user is not expand)
        node.target = f"{name}.project"


# ------------------------------------------------------------------------------------ the pass


def _check(gm: fx.GraphModule, config: LowRankConfig) -> None:
    """A fixed rank must fit every targeted layer: r <= min(m, n) (per group)."""
    if config.rank.fixed is None:
        return
    for name in select_modules(gm, config.targets, config.exclude, FACTORISABLE):
        layer = gm.get_submodule(name)
        m, n = weight_matrices(layer)[0].shape
        if config.rank.fixed > min(m, n):
            raise ValueError(f"rank {config.rank.fixed} is larger than layer '{name}' allows: its weight is "
                             f"{m}x{n}{_per_group(layer)}, so the rank is at most {min(m, n)}; lower `rank` "
                             "or exclude the layer")


def _rank_field(ctx) -> str:
    """The recipe field of the rank, e.g. ``passes[2].low_rank.rank.from``."""
    where = f"passes[{ctx.current.index}].{ctx.current.name}." if ctx.current is not None else ""
    return f"{where}rank.from"


def _sensitivity_ranks(ctx) -> dict[str, int]:
    ranks = ctx.state.get("sensitivity", {}).get("ranks")
    if ranks is None:
        raise RecipeError('ctx.state["sensitivity"]["ranks"] is missing: run the sensitivity pass first '
                          "(put `- sensitivity: ...` before this pass) or give the rank another way",
                          field=_rank_field(ctx))
    return ranks


def _singular_values(matrix: Tensor) -> Tensor:
    """The singular values of ``matrix`` as square roots of the eigenvalues of its smaller Gram matrix, in
    float64: the energy rule only sums their squares (absolute error ``min(m, n) eps ||matrix||_2^2`` on each),
    and ``eigvalsh`` of ``X X^T`` is 2-4x faster than ``svdvals`` of a wide ``X`` (vgg's 4096 x 25088 classifier:
    22 s against 50 s on one thread)."""
    x = matrix.detach().double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def _rank(ctx, policy: RankPolicy, name: str, matrices: list[Tensor], ranks: dict[str, int] | None) -> int | None:
    """The rank the policy gives ``name`` (None: leave it dense); not for the tolerance rule."""
    m, n = matrices[0].shape
    if policy.rule == "fixed":
        return policy.fixed
    if policy.rule == "ratio":
        return rank_for_ratio(m, n, policy.ratio)
    if policy.rule == "energy":
        return max(rank_for_energy(_singular_values(x), policy.energy) for x in matrices)
    rank = ranks.get(name)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n)):
        raise RecipeError(f"the sensitivity pass chose rank {rank!r} for layer '{name}', whose {m}x{n} weight "
                          f"allows 1..{min(m, n)}", field=_rank_field(ctx))
    return rank


def _collect(gm, ctx, names: list[str]) -> dict[str, LayerStats]:
    batches = ctx.calibration_batches("low_rank (method: activation)")
    training = gm.training
    gm.eval()
    try:
        return collect_stats(gm, names, batches, append_bias=True, device=ctx.device, progress=ctx.show_progress)
    finally:
        gm.train(training)


def _relative_errors(blocks, factors: Factors, bias, whitening) -> dict[str, float]:
    """||W - A B||_F / ||W||_F, and with statistics the relative output error E||y - y'||^2 / E||y||^2."""
    deltas = [w - a @ b for w, a, b in zip(blocks, factors.lefts, factors.rights)]
    errors = {"weight_error": float(torch.cat(deltas).norm() / torch.cat(blocks).norm().clamp(min=1e-300))}
    if whitening is None:
        return errors
    lost = kept = 0.0
    for g, (w, delta, white) in enumerate(zip(blocks, deltas, whitening)):
        if white.mean is not None:
            rows = slice(g * w.shape[0], (g + 1) * w.shape[0])
            delta = torch.cat([delta, (bias[rows] - factors.bias[rows]).unsqueeze(1)], dim=1)
            w = torch.cat([w, bias[rows].unsqueeze(1)], dim=1)
        lost += float(torch.einsum("ij,jk,ik->", delta, white.moments, delta))
        kept += float(torch.einsum("ij,jk,ik->", w, white.moments, w))
    errors["output_error"] = lost / kept if kept > 0 else 0.0
    return errors


def _shape(layer: nn.Module) -> str:
    return "x".join(map(str, layer.weight.shape))


def _skip(ctx, name: str, layer: nn.Module, reason: str, rank: int | None = None) -> None:
    ctx.note(f"{name}: kept dense, {reason}")
    params = layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel())
    ctx.record_layer(name=name, type=type(layer).__name__, shape=_shape(layer), rank=rank, params_before=params,
                     params_after=params, status=f"skipped: {reason}")


def _compress_layer(gm, ctx, config: LowRankConfig, name: str, stats: LayerStats | None,
                    ranks: dict[str, int] | None, seed: int) -> int | None:
    """Factorise one layer in place per the config; returns its rank, or None when it stays dense."""
    layer = gm.get_submodule(name)
    blocks = _blocks(layer)
    m, n = blocks[0].shape
    whitening = whitenings(stats, config.damping) if stats is not None else None
    matrices = _to_factor(blocks, whitening)
    if config.rank.rule == "tolerance":
        pairs = _tolerance_pairs(matrices, config.rank.tolerance, seed)
        rank = pairs[0][1].shape[0]
    else:
        pairs, rank = None, _rank(ctx, config.rank, name, matrices, ranks)
    if rank is None:
        _skip(ctx, name, layer, "the sensitivity pass gave it no rank")
        return None
    if breaks_even(m, n, rank):
        _skip(ctx, name, layer, f"rank {rank} saves nothing: {rank} x ({m} + {n}) >= {m} x {n}{_per_group(layer)}",
              rank)
        return None
    if pairs is None:
        pairs = _svd_pairs(matrices, rank, config.method, oversample=config.oversample,
                           power_iters=config.power_iters, seed=seed)
    factors = _factors(pairs, blocks, whitening, _bias(layer))
    module = factors_to_module(layer, factors)
    params_before = sum(p.numel() for p in layer.parameters())
    params_after = sum(p.numel() for p in module.parameters())
    ctx.record_layer(name=name, type=type(layer).__name__, shape=_shape(layer), groups=len(blocks), rank=rank,
                     params_before=params_before, params_after=params_after, status="factorised",
                     **_relative_errors(blocks, factors, _bias(layer), whitening))
    replace_with_factors(gm, name, module)
    return rank


def _needs(config: LowRankConfig) -> tuple[str, ...]:
    """Calibration data for the data-aware method; an earlier sensitivity pass for ``rank: {from: ...}``."""
    return (("calibration",) if config.method == "activation" else ()) + \
        ((f"pass:{config.rank.from_}",) if config.rank.rule == "from" else ())


@register_pass("low_rank", config=LowRankConfig, target_types=FACTORISABLE, needs=_needs, check=_check)
def low_rank(gm, ctx, config):
    """Replace each targeted Linear/Conv1d/Conv2d by a rank-r pair of layers (truncated SVD, seed 001)."""
    names = ctx.select(gm, config, FACTORISABLE)
    if not names:
        ctx.note("no layer selected")
        return gm
    ranks = _sensitivity_ranks(ctx) if config.rank.rule == "from" else None
    stats = _collect(gm, ctx, names) if config.method == "activation" else {}
    chosen = {}
    bar = ctx.progress(names, desc="low_rank")
    for index, name in enumerate(bar):
        bar.set_postfix_str(name)
        rank = _compress_layer(gm, ctx, config, name, stats.get(name), ranks, ctx.seed + index)
        if rank is not None:
            chosen[name] = rank
    ctx.state["low_rank"] = {"ranks": chosen}
    ctx.note(f"{config.method} low rank ({config.rank.rule} rule): factorised {len(chosen)} of {len(names)} "
             f"layer(s)" + (": " + ", ".join(f"{k} r={v}" for k, v in chosen.items()) if chosen else ""))
    return finish(gm) if chosen else gm
