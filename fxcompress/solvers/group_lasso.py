r"""Group-lasso activation reconstruction in Gram form (seed 003 §2.4-2.5, §5.4-5.5; seed 000).

Problem
-------
With ``Rxx = E[x x^T]`` (d x d, PSD), ``Ryx = E[y x^T]`` (h x d) and ``ryy = E||y||^2``::

    F(M) = 1/2 tr(M Rxx M^T) - tr(M Ryx^T) + 1/2 ryy + lam * sum_g ||M[:, cols(g)]||_F
         = 1/2 E||y - M x||^2 + lam * Omega(M)

over ``M`` (h x d).  This is seed 003 Problem (6) with the expectation moved into the Gram
matrices (§2.4), grouped by input channel for convolutions (§2.5).  ``groups[j]`` is the group of
column ``j`` (``-1``: unpenalised, e.g. the appended bias input of seed 000); ``None`` makes every
column its own group (the l2,1 norm).  With ``y = W x``, ``Ryx = W Rxx``.

Reduction shared by every solver
--------------------------------
1. *Dead columns* (``Rxx[j, j] == 0``: the input is identically zero) do not enter the fit; their
   coefficients are set to zero (the penalty can only prefer that).
2. *Unpenalised columns are eliminated exactly* (Schur complement).  Minimising ``F`` over the
   unpenalised block ``M_u`` in closed form gives ``M_u = (B_u - M_p R_pu) R_uu^+`` and a problem in
   the penalised block alone with ``R' = R_pp - R_pu R_uu^+ R_up`` and
   ``B' = B_p - B_u R_uu^+ R_up``: a residualised (for a bias column: centred) covariance, which is
   much better conditioned than the raw second moment.  Every returned ``M`` carries the optimal
   ``M_u`` for its ``M_p``, so unpenalised columns are never zeroed.
3. *Low rank* (``search_lambda``, ``group_lasso``): statistics of fewer calibration rows than
   columns (large convolutions on few images) have ``rank R' = r < d'``; a pivoted Cholesky gives
   ``R' = F F^T`` (d' x r) and the Newton solver works with ``F`` (``_EtaPoint``).
4. *Output space* (with 3): ``M`` only ever needs the directions of the column space of ``B``
   (``_output_basis``), so with ``B' = W R'`` the h outputs reduce exactly to at most ``r`` (plus
   the unpenalised columns) orthonormal combinations of them.
5. *Compact rows*: a joint problem (``torch.block_diag`` statistics of several layers) has a
   block-diagonal ``B``: each part's columns reach only its own rows.  Every operation of the
   solvers is column-local or goes through ``R``, which only couples columns of one part, so the
   rows of each part are stacked into the top rows of its columns (``_compact_rows``): ``B`` shrinks
   from (sum of the parts' rows) x d to (the largest part's rows) x d, and the solution is spread
   back by ``lift``.

Duality gap (the stopping rule of every solver)
-----------------------------------------------
Seed 003 Lemma 2 (§2.4, proof §5.4) bounds FISTA's error by ``2L ||M_0 - M*||^2 / k^2`` but needs
the unknown ``M*``; we use instead the Fenchel dual of the sample form.  With ``Theta`` a dual
variable of the shape of ``y``, ``D(Theta) = 1/2 E||y||^2 - 1/2 E||y - Theta||^2`` subject to
``||E[Theta x_g^T]||_F <= lam`` for every group.  Taking the scaled residual
``Theta = s (y - M x)``, so that ``E[Theta x_g^T] = -s G_g`` with ``G = M R - B`` the gradient, all
terms are Gram-computable::

    gap(M, s) = lam Omega(M) + s <M, G> + (1 - s)^2 / 2 * E(M),   0 <= s <= lam / max_g ||G_g||_F

with ``E(M) = E||y - M x||^2 = c - 2 <M, B> + <M, M R>``.  We take the ``s`` minimising this convex
quadratic on the feasible interval.  ``F(M) - F* <= gap`` for any ``c`` that real data could
produce, and ``F(M) - F*`` does not depend on ``c``; so when ``ryy`` is not given we use the smallest
consistent value ``c = tr(B R^+ B^T)`` (the energy of the least-squares fit; equal to
``E||W x||^2`` when ``Ryx = W Rxx``), which also gives the tightest bound.  ``rel_gap = gap / F(M)``
with ``F`` evaluated with that ``c``; solvers stop when ``rel_gap <= tol``.

The dual objective is 1-strongly concave, so ``||Theta - Theta*||^2 <= 2 gap`` and a group with
``s ||G_g|| + sqrt(2 gap * lambda_max(R_gg)) < lam`` is zero at the optimum: the gap-safe sphere
test (Ndiaye et al., JMLR 2017).  ``newton`` and ``bcd`` drop such groups as soon as they are
certified (we bound ``lambda_max(R_gg)`` by ``tr(R_gg)``).

Solvers
-------
``newton`` (what ``auto`` picks)
    Projected Newton on the variational form of seed 003 §5.5 eq. (8) / seed 000 In[12]:
    ``||M_g|| = min_{eta_g > 0} ||M_g||^2 / (2 eta_g) + eta_g / 2``.  Minimising first over ``M`` in
    closed form, ``M(eta) = B S (S R S + lam I)^{-1} S`` with ``S = diag(sqrt(eta))``, leaves the
    convex problem ``min_{eta >= 0} psi(eta) = -1/2 <M(eta), B> + lam/2 sum_g eta_g``, a problem in
    only G variables whose bound ``eta_g = 0`` is exactly "group g removed".  Its derivatives are
    ``dpsi/deta_g = lam/2 (1 - ||G_g||^2 / lam^2)`` and
    ``H = E^T [(G^T G) o (R - R S Q^{-1} S R)] E / lam^2`` (``E`` sums columns into groups, ``o`` the
    elementwise product); both stay finite at ``eta_g = 0``.  The Newton steps are taken in
    ``v_g = log(eta_g + lam / tr(R_gg))``, where the one-group ``psi`` (a hyperbola in ``eta``)
    becomes ``a e^{-v} + b e^{v}`` and Newton neither creeps nor overshoots; Bertsekas' binding set
    and an Armijo search along the projection arc globalise it (see ``_newton_step``).  It
    converges in a handful of iterations whatever the conditioning of ``R`` (each costs
    O(|support|^3 + h d |support|)), and the solution has exact zeros.  This is the alternate
    minimisation of the seeds with the ``eta`` step made a Newton step.
``bcd``
    Gram-based block coordinate descent over groups: exact update for one-column groups, a block
    proximal step with step ``1 / lambda_max(R_gg)`` for larger ones; working set (support plus the
    groups nearest to violating ``||G_g|| <= lam``), gap-safe screening.  Cheap per epoch but, like
    every first-order method, slow on the strongly correlated Gram matrices of ReLU activations.
``fista``
    Seed 003 Algorithm 1 with seed 000's look-ahead ``A_k = M_k + (k-1)/(k+q+2) (M_k - M_{k-1})``,
    fixed step ``1/L`` with ``L = lambda_max(R)``.  ``warm_start="altmin"`` first runs the
    alternate minimisation (seed 000 In[12]).
``pgd``
    Proximal gradient (forward-backward), step ``1/L``.
``altmin``
    Seed 003 §5.5 Algorithm 3: ``eta_g = sqrt(||M_g||^2 + eps)`` then ``M = M(eta)``.  The smoothing
    ``eps`` follows the gap (its bias, at most ``lam G sqrt(eps)``, is kept below a tenth of the
    gap), and one final proximal-gradient step turns the vanishing groups into exact zeros.

Everything runs on the device of the inputs, in float64 internally; ``M`` comes back in the dtype
of ``Rxx``.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from scipy.linalg import blas, lapack
from threadpoolctl import threadpool_limits
from torch import Tensor

__all__ = [
    "GroupLassoResult",
    "SOLVERS",
    "debias",
    "group_lasso",
    "group_norms",
    "lambda_max",
    "prox_group_l21",
    "search_lambda",
    "support_columns",
]

SOLVERS = ("auto", "newton", "bcd", "fista", "pgd", "altmin")
_DEFAULT_MAX_ITER = {"newton": 100, "bcd": 2000, "fista": 20000, "pgd": 20000, "altmin": 2000}
_F64 = torch.float64
_DEAD = 1e-13  # a column whose (residualised) variance is below _DEAD * max variance is dead
_ROUNDING = 1e-13  # relative changes of psi below this are rounding noise
_SEARCH_NEWTON_ITER = 30  # Newton converges in ~5-15 iterations; a solve of the search past 30 has saturated
_PLATEAU = 6  # halvings of lam with an unchanged support size that end the search for a lower bracket
_DENSE_LAM = 1e-8  # a low-rank part's Newton point goes dense only with lam >= _DENSE_LAM * max diag(S R S)
_DENSE_WIDTH = 3  # ... and a support of at most _DENSE_WIDTH * rank columns
_MAX_DESCENT = 8.0  # the largest factor by which the search for a lower bracket divides lam in one step
_FALSI_CLAMP = 0.02  # regula falsi steps stay within [2%, 98%] of the bracket (Illinois bisects after two one-sided moves)
_SCREEN_FRACTION = 0.1  # Newton drops screened groups once they are a tenth of its groups (each drop rebuilds its point)


@dataclass
class GroupLassoResult:
    """Outcome of :func:`group_lasso` / :func:`search_lambda`.

    Attributes:
        M: the reconstruction, (h, d), dtype and device of ``Rxx``.
        objective: ``F(M)``, with ``ryy`` if given, else with its smallest consistent value
            ``tr(Ryx Rxx^+ Ryx^T)`` (so ``objective >= 0``).
        gap: absolute duality gap, a certified upper bound on ``F(M) - F*``.
        rel_gap: ``gap / objective`` (the quantity compared with ``tol``).
        iterations: solver iterations (epochs for ``bcd``; summed over all solves for
            :func:`search_lambda`).
        converged: ``rel_gap <= tol`` was reached.
        support: bool tensor over the groups ``0 .. G-1``, True where the group is kept.
        lam: the penalty.
        lam_max: the smallest penalty that removes every penalised group (:func:`lambda_max`).
        solver: the solver that produced ``M`` (``"lstsq"`` for the exact ``lam == 0`` solve).
        tie_broken: only from :func:`search_lambda`: no ``lam`` left exactly ``keep`` groups, so the
            ``keep`` largest groups (by norm) were kept and the problem re-solved on them.
    """

    M: Tensor
    objective: float
    gap: float
    rel_gap: float
    iterations: int
    converged: bool
    support: Tensor
    lam: float
    lam_max: float
    solver: str
    tie_broken: bool = False


# ----------------------------------------------------------------------------------------------
# groups


def _column_groups(groups: Optional[Tensor], d: int, device) -> tuple[Tensor, int]:
    """Validated column -> group map (long, -1 = unpenalised) and the number of groups G."""
    if groups is None:
        return torch.arange(d, device=device), d
    if not isinstance(groups, Tensor) or groups.dim() != 1 or groups.numel() != d:
        raise ValueError(f"groups must be a 1-D integer tensor of length d={d} (one id per column)")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"groups must have an integer dtype, got {groups.dtype}")
    groups = groups.to(device=device, dtype=torch.long)
    if d and int(groups.min()) < -1:
        raise ValueError("group ids must be >= 0, or -1 for an unpenalised column")
    return groups, (int(groups.max()) + 1 if d else 0)


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_norms(M: Tensor, groups: Optional[Tensor] = None) -> Tensor:
    """Frobenius norm of each group's block of columns, ``||M[:, cols(g)]||_F`` for g in 0..G-1.

    Unpenalised columns (group -1) are ignored; a group id without columns has norm 0.
    """
    if M.dim() != 2:
        raise ValueError(f"M must be a matrix, got shape {tuple(M.shape)}")
    grp, n_groups = _column_groups(groups, M.shape[1], M.device)
    pen = grp >= 0
    sq = (M[:, pen] * M[:, pen]).sum(0)
    return _segment_sum(sq, grp[pen], n_groups).sqrt()


def prox_group_l21(M: Tensor, groups: Optional[Tensor], threshold: float) -> Tensor:
    """Proximal operator of ``threshold * sum_g ||M_g||_F``: block soft-thresholding.

    ``M_g <- M_g * max(0, 1 - threshold / ||M_g||_F)`` (seed 003 Algorithm 2, seed 000 ``prox_g``);
    unpenalised columns (group -1) are returned unchanged.
    """
    if not math.isfinite(float(threshold)) or float(threshold) < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if M.dim() != 2:
        raise ValueError(f"M must be a matrix, got shape {tuple(M.shape)}")
    grp, n_groups = _column_groups(groups, M.shape[1], M.device)
    if n_groups == 0:
        return M.clone()
    norms = group_norms(M, grp)
    scale = (1 - float(threshold) / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0)
    col_scale = torch.where(grp >= 0, scale[grp.clamp_min(0)], torch.ones_like(M[0]))
    return M * col_scale


def support_columns(support: Tensor, groups: Optional[Tensor] = None) -> Tensor:
    """Bool mask over columns: the columns of kept groups plus every unpenalised column.

    ``debias(Rxx, Ryx, support_columns(result.support, groups))`` refits a group-lasso support.
    """
    if groups is None:
        return support.to(torch.bool).clone()
    grp = groups.to(device=support.device, dtype=torch.long)
    return torch.where(grp >= 0, support.to(torch.bool)[grp.clamp_min(0)], torch.ones_like(grp, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# linear algebra helpers


class _Indefinite(RuntimeError):
    """A matrix that should be positive definite is not, even after jitter (severe ill-conditioning)."""


def _cholesky(A: Tensor) -> Tensor:
    """Cholesky factor of a symmetric positive definite matrix, with a tiny jitter if rounding
    made it numerically indefinite."""
    L, info = torch.linalg.cholesky_ex(A)
    scale = float(A.diagonal().abs().max()) if A.numel() else 1.0
    jitter = 1e-14 * max(scale, 1e-300)
    while int(info) != 0:
        if jitter > 1e-6 * max(scale, 1e-300):
            raise _Indefinite("matrix is not positive definite, even with jitter")
        L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
        jitter *= 100
    return L


def _diagonal_blocks(A: Tensor) -> list[slice]:
    """The finest contiguous diagonal blocks of a symmetric ``A`` outside which ``A`` is exactly zero
    (one block for a dense matrix; several for ``torch.block_diag`` statistics)."""
    n = A.shape[0]
    idx = torch.arange(n, device=A.device)
    last = torch.cat([torch.where(A[start:start + 1024] != 0, idx, -1).amax(1) for start in range(0, n, 1024)]) \
        if n else idx  # by slabs of rows: a d x d index matrix would cost 8 d^2 bytes
    reach = torch.cummax(torch.maximum(last, idx), 0).values
    ends = (torch.nonzero(reach == idx).flatten() + 1).tolist()
    return [slice(start, end) for start, end in zip([0] + ends[:-1], ends)]


def _psd_solve(A: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``A X = rhs`` for a symmetric PSD ``A``: Cholesky, or, when ``A`` is singular, the
    minimum-norm least-squares solution from its eigendecomposition (what lstsq/gelsd returns).

    A block-diagonal ``A`` is factorised block by block (same solution, the eigenvalue cutoff taken
    over all blocks as for the whole matrix): O(sum d_b^3) instead of O((sum d_b)^3)."""
    if A.numel() == 0:
        return torch.zeros_like(rhs)
    blocks = _diagonal_blocks(A)
    factors = [torch.linalg.cholesky_ex(A[b, b]) for b in blocks]
    if all(int(info) == 0 for _, info in factors):
        return torch.cat([torch.cholesky_solve(rhs[b], L) for b, (L, _) in zip(blocks, factors)])
    eigen = [_range_eigh(A[b, b]) for b in blocks]
    cutoff = A.shape[0] * torch.finfo(A.dtype).eps * max(float(w.abs().max()) for w, _ in eigen)
    out = []
    for b, (w, V) in zip(blocks, eigen):
        inv = torch.where(w > cutoff, 1.0 / w.clamp_min(cutoff), torch.zeros_like(w))
        out.append(V @ (inv[:, None] * (V.T @ rhs[b])))
    return torch.cat(out)


def _gram_lower(X: Tensor) -> Tensor:
    """The lower triangle of ``X^T X``, zero above the diagonal, C-contiguous.  On the CPU in float64
    a BLAS ``syrk`` computes only that triangle (half the flops of the product)."""
    if X.device.type != "cpu" or X.dtype != _F64 or X.numel() == 0:
        return (X.T @ X).tril_()
    a = X.numpy()
    upper = blas.dsyrk(1.0, a.T, trans=0) if a.T.flags.f_contiguous else blas.dsyrk(1.0, a, trans=1)
    return torch.from_numpy(upper).T


def _pivoted_factor(A: Tensor) -> Optional[Tensor]:
    """``F`` (n x r) with ``A = F F^T`` to rounding, for a symmetric PSD ``A`` of numerical rank
    ``r < n/2``; None when the rank is larger (or the factorisation fails).

    On the CPU a pivoted Cholesky (LAPACK ``pstrf``) stopped once every remaining pivot is below
    ``n eps max_i A_ii`` (the rounding level of a Schur-complemented Gram matrix): ``P A P^T = L L^T
    + S`` with ``tr(S) <= n^2 eps max_i A_ii``, in O(n r^2).  On other devices the eigenpairs above
    ``n eps lambda_max``."""
    n = A.shape[0]
    if n < 2:
        return None
    if A.device.type != "cpu":
        w, V = torch.linalg.eigh(A)
        big = w > n * torch.finfo(A.dtype).eps * float(w.max().clamp_min(0))
        rank = int(big.sum())
        return V[:, big] * w[big].sqrt() if 0 < rank < n // 2 else None
    scale = float(A.diagonal().max())
    c, piv, rank, info = lapack.dpstrf(A.numpy(), tol=n * torch.finfo(A.dtype).eps * scale, lower=1)
    if info < 0 or rank >= n // 2 or rank == 0:
        return None
    F = torch.zeros(n, rank, dtype=A.dtype)
    F[torch.as_tensor(piv, dtype=torch.long) - 1] = torch.from_numpy(c[:, :rank]).tril()
    return F


def _range_eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs ``(w, V)`` of a symmetric PSD ``A`` spanning its numerical range; for the
    pseudo-inverse, where eigenvalues below ``n eps lambda_max`` are dropped anyway.

    For the low-rank statistics of few calibration samples the eigenpairs of ``F F^T``
    (:func:`_pivoted_factor`) come from the r x r matrix ``F^T F = U diag(w) U^T`` as
    ``V = F U w^{-1/2}``: O(n r^2) instead of the O(n^3) of a full eigendecomposition, which remains
    the fallback when the rank exceeds n/2."""
    F = _pivoted_factor(A) if A.device.type == "cpu" else None
    if F is None:
        return torch.linalg.eigh(A)
    w, U = torch.linalg.eigh(F.T @ F)
    V = (F @ U) / w.clamp_min(torch.finfo(A.dtype).tiny).sqrt()
    return w, V


def _lipschitz(R: Tensor) -> float:
    """``L >= lambda_max(R)``: power iteration plus its residual as a safety margin."""
    if R.numel() == 0:
        return 1.0
    v = torch.ones(R.shape[0], dtype=R.dtype, device=R.device)
    v = v + 1e-3 * torch.arange(R.shape[0], dtype=R.dtype, device=R.device) / R.shape[0]
    v = v / v.norm()
    rho = 0.0
    for _ in range(500):
        w = R @ v
        rho_new = float(v @ w)
        nw = float(w.norm())
        if nw == 0.0:
            return 1.0
        residual = float((w - rho_new * v).norm())
        v = w / nw
        if abs(rho_new - rho) <= 1e-9 * rho_new and residual <= 1e-3 * rho_new:
            return rho_new + residual
        rho = rho_new
    return rho + residual


# ----------------------------------------------------------------------------------------------
# the reduced problem


@dataclass
class _Reduced:
    """The problem on the alive penalised columns after the Schur reduction (module docstring).

    ``R`` (d' x d', the unrestricted ``base_R`` on this problem's ``base_cols``) and ``B`` (h x d')
    define the quadratic; ``grp`` maps the d' columns to compact groups ``0..n_groups-1`` whose
    original ids are ``group_ids``; ``cols`` are the original column indices; ``ucols``/``Z``/``Bu``
    recover the unpenalised block, ``M_u = Bu - M_p Z^T``; ``block_bound[g] = tr(R_gg) >=
    lambda_max(R_gg)``; ``fit`` holds the least-squares fit of the unrestricted problem and the
    consistent ``c`` of the gap, computed on first use (restricted problems keep their columns of
    the fit: it only seeds the Newton solver); ``parts`` split the columns where ``R`` is
    block-diagonal, each with its low-rank factor if any (reduction 3), ``outputs`` the basis ``Q`` of
    reduction 4 (``B`` and ``Bu`` then have k rows and ``M = Q M~``).
    """

    base_R: Tensor
    B: Tensor
    grp: Tensor
    n_groups: int
    group_ids: Tensor
    cols: Tensor
    ucols: Tensor
    Z: Tensor
    Bu: Tensor
    fit: "_LeastSquares"
    parts: list["_Part"]
    base_cols: Tensor
    block_bound: Tensor
    outputs: Optional[Tensor]
    shape: tuple
    n_groups_total: int
    dtype: torch.dtype
    spread: Optional["_RowSpread"] = None

    def restrict(self, keep: Tensor) -> "_Reduced":
        """The same problem with only the (compact) groups in the bool mask ``keep``."""
        colmask = keep[self.grp]
        remap = torch.cumsum(keep.long(), 0) - 1
        col_remap = torch.cumsum(colmask.long(), 0) - 1
        parts = [part.restrict(colmask, col_remap) for part in self.parts]
        return _Reduced(
            base_R=self.base_R, B=self.B[:, colmask], grp=remap[self.grp[colmask]],
            n_groups=int(keep.sum()), group_ids=self.group_ids[keep], cols=self.cols[colmask],
            ucols=self.ucols, Z=self.Z[:, colmask], Bu=self.Bu, fit=self.fit,
            parts=[part for part in parts if part is not None],
            base_cols=self.base_cols[colmask],
            block_bound=self.block_bound[keep], outputs=self.outputs, shape=self.shape,
            n_groups_total=self.n_groups_total, dtype=self.dtype, spread=self.spread,
        )

    @property
    def lambda_max(self) -> float:
        """The smallest ``lam`` that zeroes every penalised group (see :func:`lambda_max`)."""
        return float(self.group_sq(self.B).sqrt().max()) if self.n_groups else 0.0

    @property
    def energy(self) -> float:
        """The consistent ``c`` of the duality gap."""
        return self.fit.energy

    @property
    def W_ls(self) -> Tensor:
        """The least-squares fit ``B R^+`` of the unrestricted problem, on this problem's columns."""
        return self.fit.W[:, self.base_cols]

    @functools.cached_property
    def R(self) -> Tensor:
        """``R'`` on this problem's columns (computed on first use: Newton with ``F`` never needs it)."""
        return _block(self.base_R, self.base_cols, self.base_cols)

    def group_sq(self, X: Tensor) -> Tensor:
        """Squared Frobenius norms of the groups of a (h x d') matrix."""
        return _segment_sum(X.square().sum(0), self.grp, self.n_groups)

    def gradient(self, Mp: Tensor) -> Tensor:
        if all(part.F is not None for part in self.parts):
            G = -self.B.clone()
            for part in self.parts:
                rows = part.row_index(self.B)
                G[rows[:, None], part.cols] += (Mp[rows][:, part.cols] @ part.F) @ part.F.T
            return G
        return Mp @ self.R - self.B

    def lift(self, Mp: Tensor) -> Tensor:
        """Full (h x d) matrix in the caller's dtype: penalised block, optimal unpenalised block."""
        M = torch.zeros(self.B.shape[0], self.shape[1], dtype=_F64, device=self.B.device)
        M[:, self.cols] = Mp
        if self.ucols.numel():
            M[:, self.ucols] = self.Bu - Mp @ self.Z.T
        if self.spread is not None:
            M = self.spread(M)
        if self.outputs is not None:
            M = self.outputs @ M
        return M.to(self.dtype)

    def support(self, Mp: Tensor) -> Tensor:
        keep = torch.zeros(self.n_groups_total, dtype=torch.bool, device=self.B.device)
        keep[self.group_ids[self.group_sq(Mp) > 0]] = True
        return keep


def _statistics(Rxx: Tensor, Ryx: Tensor) -> tuple[Tensor, Tensor]:
    """Validated float64 copies of the statistics (``Rxx`` symmetrised)."""
    if not isinstance(Rxx, Tensor) or not isinstance(Ryx, Tensor):
        raise ValueError("Rxx and Ryx must be torch tensors")
    if Rxx.dim() != 2 or Rxx.shape[0] != Rxx.shape[1]:
        raise ValueError(f"Rxx must be a square (d, d) matrix, got shape {tuple(Rxx.shape)}")
    if Ryx.dim() != 2 or Ryx.shape[1] != Rxx.shape[0]:
        raise ValueError(
            f"Ryx must have shape (h, d) with d = Rxx.shape[0] = {Rxx.shape[0]}, got {tuple(Ryx.shape)}"
        )
    if Ryx.device != Rxx.device:
        raise ValueError(f"Rxx is on {Rxx.device} but Ryx is on {Ryx.device}")
    if not (Rxx.dtype.is_floating_point and Ryx.dtype.is_floating_point):
        raise ValueError("Rxx and Ryx must be floating point tensors")
    R, B = Rxx.to(_F64), Ryx.to(_F64)
    if not (math.isfinite(float(R.sum())) and math.isfinite(float(B.sum()))):  # a NaN or inf makes the sum one
        raise ValueError("Rxx and Ryx must be finite (found NaN or inf)")
    return torch.add(R, R.mT).mul_(0.5), B


def _prepare(Rxx: Tensor, Ryx: Tensor, groups: Optional[Tensor], ryy, factor: bool = True) -> _Reduced:
    """Validate the statistics and build the reduced problem (module docstring, steps 1-4; steps 3-4
    only with ``factor``)."""
    R, B = _statistics(Rxx, Ryx)
    d = R.shape[0]
    grp, n_groups = _column_groups(groups, d, R.device)
    diag = R.diagonal().clone()  # not a view: R is freed once its reduced block is taken
    scale = float(diag.max()) if d else 0.0
    alive = diag > _DEAD * scale
    ucols = torch.nonzero(alive & (grp < 0)).flatten()
    pcols = torch.nonzero(alive & (grp >= 0)).flatten()
    Ruu, Rup = _block(R, ucols, ucols), _block(R, ucols, pcols)
    Z = _psd_solve(Ruu, Rup)                                      # R_uu^+ R_up
    Bu = _psd_solve(Ruu, B[:, ucols].T).T                         # B_u R_uu^+
    keep = diag[pcols] - (Rup * Z).sum(0) > _DEAD * scale  # the diagonal of R_pp - R_pu Z
    pcols, Rup, Z = pcols[keep], Rup[:, keep], Z[:, keep]
    Rp = _block(R, pcols, pcols)                                  # the d^2 work: one gather and,
    del R                                                         # with unpenalised columns, one
    if ucols.numel():                                             # update and one symmetrisation
        Rp.addmm_(Rup.T, Z, alpha=-1.0)
        Rp = torch.add(Rp, Rp.mT).mul_(0.5)
    Bp = B[:, pcols]
    if ucols.numel():
        Bp.addmm_(Bu, Rup, alpha=-1.0)
    group_ids, cgrp = torch.unique(grp[pcols], return_inverse=True)
    block_bound = _segment_sum(Rp.diagonal(), cgrp, group_ids.numel())
    parts = _parts(Rp, Bp) if factor else [_Part(torch.arange(Rp.shape[0], device=Rp.device), None, None)]
    reduced = _output_basis(Bp, Bu, parts) if factor else None
    outputs = None if reduced is None else reduced[0]
    energy = _given_energy(ryy, Bu, B[:, ucols])
    if outputs is not None:
        Bp, Bu, parts = outputs.T @ Bp, outputs.T @ Bu, reduced[1]
    compact = _compact_rows(Bp, Bu, Z, parts, pcols, ucols) if factor else None
    spread = None
    if compact is not None:
        Bp, Bu, parts, spread = compact
    return _Reduced(
        base_R=Rp, B=Bp, grp=cgrp, n_groups=group_ids.numel(), group_ids=group_ids, cols=pcols,
        ucols=ucols, Z=Z, Bu=Bu, fit=_LeastSquares(Rp, Bp, energy), parts=parts,
        base_cols=torch.arange(pcols.numel(), device=Rp.device), block_bound=block_bound, outputs=outputs,
        shape=tuple(Ryx.shape), n_groups_total=n_groups, dtype=Rxx.dtype, spread=spread,
    )


@dataclass
class _Part:
    """Columns ``cols`` of a problem outside of which ``R`` has no entries in their rows and columns
    (one consumer of a joint problem: its statistics are a diagonal block), the rows of ``B`` that are
    non-zero on them (None: all), and a factor ``F`` (len(cols) x r) of ``R[cols, cols] = F F^T`` when
    that block has rank r below half its size (None: dense).  The quadratic part of the objective is a
    sum over parts, which only the group penalty couples (reduction 3)."""
    cols: Tensor
    rows: Optional[Tensor]
    F: Optional[Tensor]

    def __post_init__(self):
        self.col_span = _span(self.cols)
        self.row_span = slice(None) if self.rows is None else _span(self.rows)

    def row_index(self, B: Tensor) -> Tensor:
        return torch.arange(B.shape[0], device=B.device) if self.rows is None else self.rows

    def restrict(self, colmask: Tensor, remap: Tensor) -> Optional["_Part"]:
        """This part on the columns kept by ``colmask`` (renumbered by ``remap``); None if none is."""
        kept = colmask[self.cols]
        if not bool(kept.any()):
            return None
        return _Part(remap[self.cols[kept]], self.rows, None if self.F is None else self.F[kept])


def _span(index: Tensor) -> slice | Tensor:
    """``index`` as a slice when it is a contiguous increasing range (a part's columns always are), else itself:
    slicing reads and writes views where an index tensor gathers and scatters."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1 and (n < 2 or bool((index[1:] > index[:-1]).all())):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _put(X: Tensor, rows: slice | Tensor, cols: slice | Tensor, value: Tensor) -> None:
    """``X[rows][:, cols] = value`` in place, for rows and columns given as slices or index tensors."""
    if isinstance(rows, Tensor) and isinstance(cols, Tensor):
        X[rows[:, None], cols] = value
    else:
        X[rows, cols] = value


_MAX_PARTS = 32  # finer diagonal blocks are merged: per-part work has a Python cost


def _parts(R: Tensor, B: Tensor) -> list[_Part]:
    """The parts of a reduced problem: the diagonal blocks of ``R`` (merged up to ``_MAX_PARTS``
    parts), each with the rows of ``B`` it reaches and its low-rank factor."""
    d = R.shape[0]
    blocks = _diagonal_blocks(R) if d else []
    spans, start = [], 0
    for block in blocks:
        if block.stop - start >= d / _MAX_PARTS or block.stop == d:
            spans.append(slice(start, block.stop))
            start = block.stop
    parts = []
    for span in spans or [slice(0, d)]:
        rows = torch.nonzero((B[:, span] != 0).any(1)).flatten()
        cols = torch.arange(span.start, span.stop, device=R.device)
        parts.append(_Part(cols, None if rows.numel() == B.shape[0] else rows, _pivoted_factor(R[span, span])))
    return parts


def _row_owner(rows: list[Tensor], h: int, device) -> Optional[Tensor]:
    """For each of ``h`` rows, the index of the part (its entry of ``rows``) reaching it, -1 for none;
    None if two parts reach the same row."""
    owner = torch.full((h,), -1, dtype=torch.long, device=device)
    for index, part_rows in enumerate(rows):
        if bool((owner[part_rows] >= 0).any()):
            return None
        owner[part_rows] = index
    return owner


def _output_basis(Bp: Tensor, Bu: Tensor, parts: list[_Part]) -> Optional[tuple[Tensor, list[_Part]]]:
    """Reduction 4: an orthonormal ``Q`` (h x k) whose columns span those of ``[B', B_u]``, with
    k below h/2, when every part is low rank and the parts reach disjoint rows of ``B``, and the parts
    with their rows renumbered to the columns of ``Q``; else None.

    Writing ``M = Q M~ + M_perp`` with ``Q^T M_perp = 0``, the quadratic splits
    (``<M, B> = <M~, Q^T B>``, ``tr(M R M^T) = tr(M~ R M~^T) + tr(M_perp R M_perp^T)``) and so does
    every group norm (``||M_g||^2 = ||M~_g||^2 + ||M_perp,g||^2``): ``M_perp = 0`` at the optimum,
    and the problem in ``M~`` has ``Q^T B`` (k rows) as its ``B``; ``M = Q M~``.  Per part, with
    ``F = Q_F T`` (thin QR), ``B'_part = (B'_part Q_F) Q_F^T`` to within ``1e-12 ||B'_part||`` (checked:
    as for ``B' = W R'``), so its block of ``Q`` comes from the SVD of the small matrix
    ``[B'_part Q_F, B_u columns on its rows]``: ``Q`` is block-diagonal over the parts' rows."""
    h = Bp.shape[0]
    if h < 16 or any(part.F is None for part in parts):
        return None
    rows = [part.row_index(Bp) for part in parts]
    owner = _row_owner(rows, h, Bp.device)
    if owner is None:
        return None
    u_owner = [torch.unique(owner[torch.nonzero(Bu[:, j]).flatten()]) for j in range(Bu.shape[1])]
    if any(o.numel() > 1 or bool((o < 0).any()) for o in u_owner):
        return None
    blocks = []
    for index, (part, part_rows) in enumerate(zip(parts, rows)):
        QF, _ = torch.linalg.qr(part.F)
        Bpart = Bp[part_rows][:, part.cols]
        C = Bpart @ QF
        if float(torch.linalg.matrix_norm(Bpart - C @ QF.T)) > 1e-12 * float(torch.linalg.matrix_norm(Bpart)):
            return None
        own_u = [j for j, o in enumerate(u_owner) if o.numel() and int(o) == index]
        U, sigma, _ = torch.linalg.svd(torch.cat([C, Bu[part_rows][:, own_u]], 1), full_matrices=False)
        rank = int((sigma > max(U.shape) * torch.finfo(U.dtype).eps * sigma[0]).sum()) if sigma.numel() else 0
        blocks.append((part_rows, U[:, :rank]))
    k = sum(Q.shape[1] for _, Q in blocks)
    if k > h // 2:
        return None
    Q = torch.zeros(h, k, dtype=Bp.dtype, device=Bp.device)
    reduced, col = [], 0
    for part, (part_rows, block) in zip(parts, blocks):
        Q[part_rows, col:col + block.shape[1]] = block
        span = torch.arange(col, col + block.shape[1], device=Bp.device)
        reduced.append(_Part(part.cols, None if span.numel() == k else span, part.F))
        col += block.shape[1]
    return Q, reduced


@dataclass
class _RowSpread:
    """Where the compact rows of reduction 5 came from: part ``i`` owns the rows ``rows[i]`` (of a
    ``height``-row matrix) on the columns ``cols[i]`` of the caller's ``d``."""
    rows: list[Tensor]
    cols: list[Tensor]
    penalised: list[Tensor]
    height: int

    def __call__(self, M: Tensor) -> Tensor:
        """The compact (rows x d) ``M`` with each part's rows put back in place."""
        full = torch.zeros(self.height, M.shape[1], dtype=M.dtype, device=M.device)
        for rows, cols in zip(self.rows, self.cols):
            full[rows[:, None], cols] = M[: rows.numel()][:, cols]
        return full

    def compact(self, Mp: Tensor) -> Tensor:
        """The inverse on the penalised columns: a (height x d') matrix in compact rows."""
        out = torch.zeros(max(rows.numel() for rows in self.rows), Mp.shape[1], dtype=Mp.dtype, device=Mp.device)
        for rows, cols in zip(self.rows, self.penalised):
            out[: rows.numel(), cols] = Mp[rows[:, None], cols]
        return out


def _compact_rows(Bp: Tensor, Bu: Tensor, Z: Tensor, parts: list[_Part], pcols: Tensor, ucols: Tensor):
    """Reduction 5: ``(B', B_u, parts, spread)`` with each part's rows stacked at the top of its
    columns, when the parts reach disjoint rows, each unpenalised column belongs to one part (its
    rows of ``B_u`` and its columns of ``Z``), and the rows shrink at least by half; else None."""
    h = Bp.shape[0]
    if len(parts) < 2 or any(part.rows is None for part in parts):
        return None
    height = max(part.rows.numel() for part in parts)
    if 2 * height > h:
        return None
    owner = _row_owner([part.rows for part in parts], h, Bp.device)
    if owner is None:
        return None
    col_owner = torch.full((Bp.shape[1],), -1, dtype=torch.long, device=Bp.device)
    for index, part in enumerate(parts):
        col_owner[part.cols] = index
    u_owner = []
    for j in range(Bu.shape[1]):
        found = torch.unique(torch.cat([owner[torch.nonzero(Bu[:, j]).flatten()],
                                        col_owner[torch.nonzero(Z[j]).flatten()]]))
        if found.numel() > 1 or bool((found < 0).any()):
            return None
        u_owner.append(int(found) if found.numel() else 0)
    u_owner = torch.tensor(u_owner, dtype=torch.long, device=Bp.device)
    Bc = torch.zeros(height, Bp.shape[1], dtype=Bp.dtype, device=Bp.device)
    Buc = torch.zeros(height, Bu.shape[1], dtype=Bu.dtype, device=Bu.device)
    compact, spread_rows, spread_cols = [], [], []
    for index, part in enumerate(parts):
        n = part.rows.numel()
        own_u = torch.nonzero(u_owner == index).flatten()
        Bc[:n, part.cols] = Bp[part.rows][:, part.cols]
        Buc[:n, own_u] = Bu[part.rows][:, own_u]
        compact.append(_Part(part.cols, None if n == height else torch.arange(n, device=Bp.device), part.F))
        spread_rows.append(part.rows)
        spread_cols.append(torch.cat([pcols[part.cols], ucols[own_u]]))
    return Bc, Buc, compact, _RowSpread(spread_rows, spread_cols, [part.cols for part in parts], h)


def _given_energy(ryy, Bu: Tensor, Bu_raw: Tensor) -> Optional[float]:
    """The consistent ``c`` of the reduced problem when ``ryy`` is given, ``ryy - <B_u R_uu^+, B_u>``
    (validated); None without ``ryy``."""
    if ryy is None:
        return None
    value = float(ryy)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"ryy must be a finite number >= 0, got {ryy}")
    return value - float((Bu * Bu_raw).sum())


class _LeastSquares:
    """The least-squares fit ``W = B' R'^+`` of a reduced problem and the consistent ``c`` of its
    gap (``ryy``-based when given, else the least-squares energy ``<W, B'>``), computed on first use:
    on singular statistics ``R'^+`` takes an eigendecomposition, which :func:`lambda_max` never
    needs."""

    def __init__(self, R: Tensor, B: Tensor, given_energy: Optional[float]):
        self._R, self._B, self._energy = R, B, given_energy
        self._W: Optional[Tensor] = None

    @property
    def W(self) -> Tensor:
        if self._W is None:
            self._W = _psd_solve(self._R, self._B.T).T
        return self._W

    @property
    def energy(self) -> float:
        if self._energy is None:
            self._energy = float((self.W * self._B).sum())
        return self._energy


@dataclass
class _Certificate:
    gap: float
    primal: float
    s: float
    grad_norms: Tensor

    @property
    def rel_gap(self) -> float:
        return self.gap / self.primal if self.primal > 0 else (0.0 if self.gap <= 0 else math.inf)


def _certificate(prob: _Reduced, Mp: Tensor, Gr: Tensor, lam: float) -> _Certificate:
    """Duality gap of ``Mp`` given its gradient ``Gr`` (module docstring, "Duality gap")."""
    gn = prob.group_sq(Gr).sqrt()
    omega = float(prob.group_sq(Mp).sqrt().sum())
    mg = float((Mp * Gr).sum())
    energy = max(prob.energy + float((Mp * (Gr - prob.B)).sum()), 0.0)  # c - 2<M,B> + <M,MR>
    gmax = float(gn.max()) if gn.numel() else 0.0
    s_max = lam / gmax if gmax > 0 else math.inf
    s = min(max(1.0 - mg / energy, 0.0), s_max) if energy > 0 else min(1.0, s_max)
    gap = lam * omega + s * mg + 0.5 * (1.0 - s) ** 2 * energy
    return _Certificate(gap=max(gap, 0.0), primal=0.5 * energy + lam * omega, s=s, grad_norms=gn)


def _screen(prob: _Reduced, cert: _Certificate, lam: float) -> Tensor:
    """Gap-safe sphere test: True for the groups certified to vanish at the optimum."""
    radius = math.sqrt(2.0 * cert.gap)
    return cert.s * cert.grad_norms + radius * prob.block_bound.sqrt() < lam


class _Reporter:
    """Calls the user's ``progress`` callback with a dict per iteration; returns True once the
    wall-clock ``deadline`` (``time.perf_counter()`` value) has passed."""

    def __init__(self, solver: str, progress: Optional[Callable[[dict], None]], deadline: float):
        self.solver, self.progress, self.deadline = solver, progress, deadline

    def __call__(self, iteration: int, cert: _Certificate, support: int) -> bool:
        if self.progress is not None:
            self.progress({
                "solver": self.solver, "iteration": iteration, "objective": cert.primal,
                "gap": cert.gap, "rel_gap": cert.rel_gap, "support": support,
            })
        return time.perf_counter() > self.deadline


@dataclass
class _Outcome:
    prob: _Reduced
    Mp: Tensor
    cert: _Certificate
    iterations: int
    converged: bool
    solver: str


# ----------------------------------------------------------------------------------------------
# newton: projected Newton on the variational (eta) form


def _block(X: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``X[rows][:, cols]`` with one gather, and no copy at all when both select everything."""
    if rows.numel() == X.shape[0] and cols.numel() == X.shape[1]:
        full = torch.arange(X.shape[0], device=X.device)
        if torch.equal(rows, full) and torch.equal(cols, full[: X.shape[1]]):
            return X
    return X[rows[:, None], cols[None, :]]


class _PartPoint:
    """One part's share of an ``_EtaPoint`` (``_Part``: the quadratic is a sum over parts).

    With ``Q = S R S + lam I`` on the part's support (``S = diag(sqrt(eta))``) and ``rhs = S B^T``,
    its share of ``psi`` is ``-1/2 <rhs, Q^{-1} rhs>`` and its block of ``M`` is ``(Q^{-1} rhs)^T S``.

    Dense ``R``: ``Q = L L^T`` (Cholesky, O(p^3) on a support of p columns), ``X = L^{-1} rhs``.

    Low-rank ``R = F F^T``: with ``U = S F = Q_u R_u`` (thin QR) and ``R_u = P diag(sigma) Z^T``
    (SVD, ``Z`` square), ``c = P^T Q_u^T rhs`` and ``b = rhs - Q_u Q_u^T rhs`` (the part of ``rhs``
    outside the range of ``U``)::

        Q^{-1} rhs = Q_u P diag(1 / (sigma^2 + lam)) c + b / lam

    (``Q`` acts as ``Q_u P diag(sigma^2 + lam) P^T Q_u^T`` on the range of ``U`` and as ``lam I`` on
    its complement): O(p r h), the share of ``psi`` a sum of non-negative terms, and no factorisation
    that rounding can make indefinite however small ``lam`` is.

    A low-rank part still takes the dense route where it is cheaper and safe: a support of
    ``p <= 3r`` columns (the QR and the r x r SVD then cost more than a p x p Cholesky) and ``lam``
    at least ``_DENSE_LAM`` of the largest diagonal entry of ``S R S`` (``Q``'s condition number at
    most 1e8), falling back to the low-rank route if the Cholesky fails.
    """

    def __init__(self, prob: _Reduced, part: _Part, eta: Tensor, lam: float):
        self.prob, self.part, self.lam = prob, part, lam
        self.local = torch.nonzero(eta[prob.grp[part.cols]] > 0).flatten()
        self.pcols = part.cols[self.local]
        self.s = eta[prob.grp[self.pcols]].sqrt()
        rhs = (self._B(self.pcols) * self.s).T
        self.L = self._dense_factor() if part.F is None or self.pcols.numel() <= _DENSE_WIDTH * part.F.shape[1] else None
        if self.L is not None:
            self._X = torch.linalg.solve_triangular(self.L, rhs, upper=False)
            self.quad = float(self._X.square().sum())
        else:
            Qu, Ru = torch.linalg.qr(self.s[:, None] * part.F[self.local])
            P, sigma, self._Zt = torch.linalg.svd(Ru, full_matrices=True)
            self._sigma2 = sigma.square()
            self._Qu, self._P = Qu, P                        # Q_u P is never formed: O(p r^2) saved
            projected = Qu.T @ rhs
            self._c = P.T @ projected
            self._b = rhs - Qu @ projected
            self.quad = float((self._c.square() / (self._sigma2[:, None] + lam)).sum()) + \
                float(self._b.square().sum()) / lam

    def _dense_factor(self) -> Optional[Tensor]:
        """The Cholesky factor of ``Q``; for a low-rank part None where ``lam`` is too small for it or
        it fails (see the class docstring)."""
        Q = self.s[:, None] * self._R(self.pcols, self.pcols) * self.s[None, :]
        if self.part.F is None:
            Q.diagonal().add_(self.lam)
            return _cholesky(Q)
        if Q.numel() == 0 or self.lam < _DENSE_LAM * float(Q.diagonal().max()):
            return None
        Q.diagonal().add_(self.lam)
        L, info = torch.linalg.cholesky_ex(Q)
        return L if int(info) == 0 else None

    def _R(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``R'`` on columns of this problem, read from the unrestricted ``base_R``."""
        base = self.prob.base_cols
        return _block(self.prob.base_R, base[rows], base[cols])

    def _B(self, cols: Tensor | slice) -> Tensor:
        B = self.prob.B[self.part.row_span]
        return B[:, cols] if isinstance(cols, slice) else B.index_select(1, cols)

    @functools.cached_property
    def M(self) -> Tensor:
        """``M`` on the part's rows and support columns."""
        if self.L is None:
            solved = self._Qu @ (self._P @ (self._c / (self._sigma2[:, None] + self.lam))) + self._b / self.lam
        else:
            solved = torch.linalg.solve_triangular(self.L.T, self._X, upper=True)
        return solved.T * self.s

    def grad(self) -> Tensor:
        """The gradient ``M R - B`` on the part's rows and columns."""
        if self.part.F is not None:
            return (self.M @ self.part.F[self.local]) @ self.part.F.T - self._B(self.part.col_span)
        return self.M @ self._R(self.pcols, self.part.cols) - self._B(self.part.col_span)

    def curvature(self, free_cols: Tensor, free_local: Tensor) -> Tensor:
        """The lower triangle of ``R - R S Q^{-1} S R`` on free columns of the part (its strict upper
        triangle is left unspecified).  Low rank, ``R = F F^T``: by the push-through identity
        ``U^T Q^{-1} U = I - lam (U^T U + lam I)^{-1}`` with ``U = S F``, it is
        ``lam F (U^T U + lam I)^{-1} F^T``, positive semidefinite by construction; on the low-rank
        route ``F Z diag(w) Z^T F^T`` with ``w = lam / (sigma^2 + lam)`` (1 beyond the rank of ``U``),
        on the dense route from the Cholesky factor of the r x r ``U^T U + lam I`` where the rank is
        below the support (O(p r^2 + f^2 r) instead of O(p^2 f + f^2 p) for f free columns)."""
        F = self.part.F
        if self.L is None:
            w = torch.ones(self._Zt.shape[0], dtype=_F64, device=self._Zt.device)
            w[: self._sigma2.numel()] = self.lam / (self._sigma2 + self.lam)
            return _gram_lower((F[free_local] @ self._Zt.T).T * w.sqrt()[:, None])
        if F is not None and F.shape[1] < self.pcols.numel():
            K = _gram_lower(self.s[:, None] * F[self.local])
            K.diagonal().add_(self.lam)
            Lk, info = torch.linalg.cholesky_ex(K)
            if int(info) == 0:
                return _gram_lower(torch.linalg.solve_triangular(Lk, F[free_local].T, upper=False)).mul_(self.lam)
        Y = torch.linalg.solve_triangular(self.L, self.s[:, None] * self._R(self.pcols, free_cols), upper=False)
        return self._R(free_cols, free_cols) - _gram_lower(Y)


class _EtaPoint:
    """``psi(eta) = sum over parts of their share + lam/2 sum eta`` and, lazily, ``M(eta)`` and the
    gradient of ``F`` there (``_PartPoint``)."""

    def __init__(self, prob: _Reduced, eta: Tensor, lam: float):
        self.prob, self.eta, self.lam = prob, eta, lam
        self.points = [_PartPoint(prob, part, eta, lam) for part in prob.parts]
        self.psi = -0.5 * sum(point.quad for point in self.points) + 0.5 * lam * float(eta.sum())
        self._grad = None

    @property
    def Mp(self) -> Tensor:
        Mp = torch.zeros_like(self.prob.B)
        for point in self.points:
            _put(Mp, point.part.row_span, point.pcols, point.M)
        return Mp

    @property
    def grad(self) -> Tensor:
        if self._grad is None:
            G = torch.zeros_like(self.prob.B)
            for point in self.points:
                _put(G, point.part.row_span, point.part.col_span, point.grad())
            self._grad = G
        return self._grad

    def hessian(self, free_cols: Tensor, free_grp: Tensor, n_free: int) -> Tensor:
        """``H = sum over parts of E^T [(G^T G) o (R - R S Q^{-1} S R)] E / lam^2`` on the free groups,
        from the lower triangles of the two symmetric factors: with ``T`` the lower triangle of the
        elementwise product, ``E^T T E + (E^T T E)^T`` counts the diagonal of ``T`` twice, so half of
        it is taken out first."""
        position = torch.full((self.prob.B.shape[1],), -1, dtype=torch.long, device=free_cols.device)
        H = torch.zeros(n_free, n_free, dtype=_F64, device=free_cols.device)
        for point in self.points:
            position[point.part.cols] = torch.arange(point.part.cols.numel(), device=free_cols.device)
            inside = torch.isin(free_cols, point.part.cols)
            cols, grp = free_cols[inside], free_grp[inside]
            if cols.numel() == 0:
                continue
            Gf = self.grad[point.part.row_span][:, cols]
            A = point.curvature(cols, position[cols]).mul_(_gram_lower(Gf))
            rows = torch.zeros(n_free, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, grp, A)
            H.index_add_(1, grp, rows)
            H.diagonal().sub_(_segment_sum(A.diagonal(), grp, n_free), alpha=0.5)
        return (H + H.T).div_(self.lam**2)


def _entry_limit(eta: Tensor, dpsi: Tensor) -> Tensor:
    """Let at most ``max(16, |support|)`` zero groups enter per step, the most violated first
    (a doubling working set): keeps early steps small when few groups survive."""
    entering = (eta == 0) & (dpsi < 0)
    limit = max(16, int((eta > 0).sum()))
    allowed = torch.ones_like(entering)
    if int(entering.sum()) > limit:
        score = torch.where(entering, dpsi, torch.full_like(dpsi, math.inf))
        allowed[entering] = False
        allowed[torch.topk(score, limit, largest=False).indices] = True
    return allowed


def _log_newton_direction(point: _EtaPoint, dpsi: Tensor, z: Tensor, free: Tensor) -> Tensor:
    """Newton direction in ``v = log(z)``, ``z = eta + c``, on the free groups: with
    ``Z = diag(z)``, gradient ``z dpsi`` and Hessian ``Z H Z + diag(z dpsi)``; if rounding or
    coupling makes the latter indefinite, its negative diagonal part is dropped."""
    prob = point.prob
    free_cols = torch.nonzero(free[prob.grp]).flatten()
    free_grp = (torch.cumsum(free.long(), 0) - 1)[prob.grp[free_cols]]
    zf, gf = z[free], dpsi[free]
    Hv = zf[:, None] * point.hessian(free_cols, free_grp, int(free.sum())) * zf[None, :]
    L, info = torch.linalg.cholesky_ex(Hv + torch.diag(zf * gf))
    if int(info) != 0:
        L = _cholesky(Hv + torch.diag((zf * gf).clamp_min(0)))
    return -torch.cholesky_solve((zf * gf)[:, None], L).flatten()


def _newton_step(point: _EtaPoint, lam: float) -> Optional[_EtaPoint]:
    """One projected Newton step (Bertsekas 1982) in log coordinates; None when no decrease can
    be found (the iterate is optimal to rounding).

    For one group on its own, ``psi(eta) = C / (a eta + lam) + lam eta / 2`` (``a`` its curvature):
    a hyperbola, on which Newton in ``eta`` creeps from below (``eta`` grows by half per step) and
    overshoots from above.  In ``v = log(eta + c)``, ``c = lam / a``, it becomes
    ``C' e^{-v} + k e^{v}`` and the Newton step is ``-tanh(v - v*)``: no overshoot, one e-fold per
    step from afar, quadratic near.  We take ``a = tr(R_gg)``; the bound ``eta >= 0`` is
    ``v >= log c``.  Groups within 1% (in ``v``) of the bound whose ``dpsi_g > 0`` are binding and
    move along ``eta_g (1 - t)``; the others (at most ``max(16, |support|)`` entering from 0) take
    the Newton step, projected on the bound; Armijo backtracking on ``t`` along that arc.  Once
    the predicted decrease is at the rounding level of ``psi`` the full step is taken (the gap,
    a first-order quantity, still improves there; the caller keeps the best-certified iterate).
    """
    prob, eta = point.prob, point.eta
    c = lam / prob.block_bound
    z = eta + c
    dpsi = 0.5 * lam * (1.0 - prob.group_sq(point.grad) / lam**2)
    binding = (torch.log1p(eta / c) <= 1e-2) & (dpsi > 0)
    free = ~binding & _entry_limit(eta, dpsi)
    dv = _log_newton_direction(point, dpsi, z, free) if bool(free.any()) else eta.new_zeros(0)
    t = 1.0
    for _ in range(60):
        trial = eta.clone()
        trial[free] = (z[free] * torch.exp(t * dv) - c[free]).clamp_min(0)
        trial[binding] = eta[binding] * (1.0 - t)
        decrease = float((dpsi * (trial - eta)).sum())
        if decrease < 0 and math.isfinite(decrease):  # exp(t dv) overflows on long steps: shorten them
            candidate = _EtaPoint(prob, trial, lam)
            if candidate.psi <= point.psi + 1e-4 * decrease or (t == 1.0 and -decrease <= _ROUNDING * abs(point.psi)):
                return candidate
        t *= 0.5
    return None


def _newton_start(prob: _Reduced, lam: float, Mp0: Optional[Tensor]) -> _EtaPoint:
    """``eta`` from the group norms of ``M0`` if given, else the better (lower ``psi``) of
    ``eta = 0`` and ``eta = ||W_ls,g||`` (``W_ls`` the least-squares fit).  The latter only wins
    when few groups vanish, where it saves the e-folds of growth from 0; elsewhere starting at 0
    keeps the first steps on small supports."""
    if Mp0 is not None:
        return _EtaPoint(prob, prob.group_sq(Mp0).sqrt(), lam)
    zero = _EtaPoint(prob, torch.zeros(prob.n_groups, dtype=_F64, device=prob.B.device), lam)
    dense = _EtaPoint(prob, prob.group_sq(prob.W_ls).sqrt(), lam)
    return dense if dense.psi < zero.psi else zero


def _solve_newton(prob, lam, Mp0, tol, max_iter, report, **_) -> _Outcome:
    """Newton iterations with gap-safe screening; returns the iterate with the smallest gap."""
    point = _newton_start(prob, lam, Mp0)
    best, it = None, 0
    while True:
        cert = _certificate(point.prob, point.Mp, point.grad, lam)
        out_of_time = report(it, cert, int((point.eta > 0).sum()))
        if best is None or cert.gap < best.cert.gap:
            best = _Outcome(point.prob, point.Mp, cert, it, cert.rel_gap <= tol, "newton")
        if best.converged or it >= max_iter or out_of_time:
            break
        dropped = _screen(point.prob, cert, lam)
        n_dropped = int(dropped.sum())
        if n_dropped and n_dropped >= _SCREEN_FRACTION * dropped.numel():
            point = _EtaPoint(point.prob.restrict(~dropped), point.eta[~dropped], lam)
        try:
            point = _newton_step(point, lam)
        except _Indefinite:
            return _continue_with_bcd(best, lam, tol, report)
        if point is None:
            break
        it += 1
    best.iterations = it
    return best


def _continue_with_bcd(best: _Outcome, lam: float, tol: float, report) -> _Outcome:
    """Finish with block coordinate descent from Newton's best iterate when its Hessian became numerically
    indefinite (seen on the rank-deficient statistics of large convolutions with few calibration samples)."""
    out = _solve_bcd(best.prob, lam, best.Mp, tol, 2000, report)
    out.iterations += best.iterations
    return out if out.cert.gap <= best.cert.gap else best


# ----------------------------------------------------------------------------------------------
# first-order solvers: pgd, fista


def _prox(prob: _Reduced, V: Tensor, threshold: float) -> Tensor:
    norms = prob.group_sq(V).sqrt()
    scale = (1 - threshold / norms.clamp_min(torch.finfo(V.dtype).tiny)).clamp_min(0)
    return V * scale[prob.grp]


def _start(prob: _Reduced, Mp0: Optional[Tensor]) -> Tensor:
    return Mp0.clone() if Mp0 is not None else torch.zeros_like(prob.B)


def _support_size(prob: _Reduced, Mp: Tensor) -> int:
    return int((prob.group_sq(Mp) > 0).sum())


def _solve_pgd(prob, lam, Mp0, tol, max_iter, report, **_) -> _Outcome:
    L = _lipschitz(prob.R)
    Mp = _start(prob, Mp0)
    it = 0
    while True:
        Gr = prob.gradient(Mp)
        cert = _certificate(prob, Mp, Gr, lam)
        out_of_time = report(it, cert, _support_size(prob, Mp))
        if cert.rel_gap <= tol or it >= max_iter or out_of_time:
            break
        Mp = _prox(prob, Mp - Gr / L, lam / L)
        it += 1
    return _Outcome(prob, Mp, cert, it, cert.rel_gap <= tol, "pgd")


def _solve_fista(prob, lam, Mp0, tol, max_iter, report, q=10.0, check_every=10, **_) -> _Outcome:
    """Seed 000 In[10]: look-ahead ``A = M + (k-1)/(k+q+2) (M - M_prev)``, fixed step 1/L; the gap
    (which needs the gradient at ``M``, not at ``A``) is checked every ``check_every`` iterations."""
    L = _lipschitz(prob.R)
    Mp = _start(prob, Mp0)
    prev = Mp
    k = 0
    while True:
        if k % check_every == 0 or k >= max_iter:
            cert = _certificate(prob, Mp, prob.gradient(Mp), lam)
            out_of_time = report(k, cert, _support_size(prob, Mp))
            if cert.rel_gap <= tol or k >= max_iter or out_of_time:
                break
        k += 1
        A = Mp + ((k - 1) / (k + q + 2)) * (Mp - prev)
        prev, Mp = Mp, _prox(prob, A - prob.gradient(A) / L, lam / L)
    return _Outcome(prob, Mp, cert, k, cert.rel_gap <= tol, "fista")


# ----------------------------------------------------------------------------------------------
# altmin: alternate minimisation (seed 003 §5.5, seed 000 In[12])


def _solve_altmin(prob, lam, Mp0, tol, max_iter, report, **_) -> _Outcome:
    Mp = _start(prob, Mp0)
    it = 0
    while True:
        Gr = prob.gradient(Mp)
        cert = _certificate(prob, Mp, Gr, lam)
        out_of_time = report(it, cert, _support_size(prob, Mp))
        if cert.rel_gap <= tol or it >= max_iter or out_of_time:
            break
        eps = (0.1 * cert.gap / (lam * max(prob.n_groups, 1))) ** 2
        eta = (prob.group_sq(Mp) + max(eps, 1e-300)).sqrt()
        Mp = _EtaPoint(prob, eta, lam).Mp
        it += 1
    return _finish_with_prox(prob, lam, Mp, cert, it, tol, "altmin")


def _finish_with_prox(prob, lam, Mp, cert, it, tol, solver) -> _Outcome:
    """One proximal-gradient step (never increases F) to turn vanishing groups into exact zeros,
    kept unless its certificate is worse than both ``tol`` and the current one."""
    L = _lipschitz(prob.R)
    cand = _prox(prob, Mp - prob.gradient(Mp) / L, lam / L)
    cand_cert = _certificate(prob, cand, prob.gradient(cand), lam)
    if cand_cert.primal <= cert.primal and cand_cert.rel_gap <= max(tol, cert.rel_gap):
        Mp, cert = cand, cand_cert
    return _Outcome(prob, Mp, cert, it, cert.rel_gap <= tol, solver)


# ----------------------------------------------------------------------------------------------
# bcd: Gram-based block coordinate descent with a working set and gap-safe screening


def _block_lipschitz(prob: _Reduced) -> Tensor:
    """``lambda_max(R_gg)`` per group (exact; batched over groups of equal size)."""
    out = torch.empty(prob.n_groups, dtype=_F64, device=prob.R.device)
    sizes = torch.bincount(prob.grp, minlength=prob.n_groups)
    order = torch.argsort(prob.grp, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    for size in torch.unique(sizes).tolist():
        gids = torch.nonzero(sizes == size).flatten()
        idx = order[starts[gids][:, None] + torch.arange(size, device=gids.device)]
        blocks = prob.R[idx[:, :, None], idx[:, None, :]]
        out[gids] = torch.linalg.eigvalsh(blocks)[:, -1]
    return out


def _group_columns(prob: _Reduced) -> list:
    order = torch.argsort(prob.grp, stable=True)
    sizes = torch.bincount(prob.grp, minlength=prob.n_groups).tolist()
    return list(torch.split(order, sizes))


def _working_set(prob: _Reduced, Mp: Tensor, cert: _Certificate, lam: float) -> Tensor:
    """Support plus as many groups again (at least 16), those nearest to violating their dual
    constraint ``||G_g|| <= lam`` (distance measured in the scale of ``R_gg``)."""
    active = prob.group_sq(Mp) > 0
    score = (lam - cert.grad_norms) / prob.block_bound.sqrt()
    score[active] = -math.inf
    size = min(prob.n_groups, max(2 * int(active.sum()), 16))
    ws = torch.zeros(prob.n_groups, dtype=torch.bool, device=Mp.device)
    ws[torch.topk(-score, size).indices] = True
    return ws | active


def _bcd_epochs(prob, lam, Mt, ws_groups, cols, lips, max_epochs, rtol, deadline) -> int:
    """Cyclic block updates on the working set; ``Mt`` is M^T (d' x h), updated in place.
    Stops when an epoch moves M by less than ``rtol`` times the first epoch's move, or at the
    wall-clock ``deadline``."""
    ws_cols = torch.cat([cols[g] for g in ws_groups])
    pos = torch.empty(prob.R.shape[0], dtype=torch.long, device=Mt.device)
    pos[ws_cols] = torch.arange(ws_cols.numel(), device=Mt.device)
    GtW = prob.R[ws_cols] @ Mt - prob.B[:, ws_cols].T        # gradient^T on the working set
    Rw = prob.R[:, ws_cols]
    first = None
    for epoch in range(1, max_epochs + 1):
        moved = 0.0
        for g in ws_groups:
            J = cols[g]
            old = Mt[J]
            V = old - GtW[pos[J]] / lips[g]
            nv = float(V.norm())
            new = V * max(0.0, 1.0 - lam / (lips[g] * nv)) if nv > 0 else V
            delta = new - old
            change = float(delta.abs().max())
            if change > 0:
                Mt[J] = new
                GtW.addmm_(Rw[J].T, delta)
                moved = max(moved, change)
        first = moved if first is None else first
        if moved <= rtol * first or time.perf_counter() > deadline:
            break
    return epoch


def _solve_bcd(prob, lam, Mp0, tol, max_iter, report, **_) -> _Outcome:
    Mt = _start(prob, Mp0).T.contiguous()
    lips = _block_lipschitz(prob).tolist()
    cols = _group_columns(prob)
    epochs = 0
    inner_rtol = 1e-2
    while True:
        Mp = Mt.T
        cert = _certificate(prob, Mp, prob.gradient(Mp), lam)
        out_of_time = report(epochs, cert, _support_size(prob, Mp))
        if cert.rel_gap <= tol or epochs >= max_iter or out_of_time:
            break
        dropped = _screen(prob, cert, lam) & (prob.group_sq(Mp) == 0)
        if bool(dropped.any()):
            keep = ~dropped
            prob, Mt = prob.restrict(keep), Mt[keep[prob.grp]].contiguous()
            lips = [x for x, k in zip(lips, keep.tolist()) if k]
            cols = _group_columns(prob)
            cert = _certificate(prob, Mt.T, prob.gradient(Mt.T), lam)
        ws = torch.nonzero(_working_set(prob, Mt.T, cert, lam)).flatten().tolist()
        epochs += _bcd_epochs(prob, lam, Mt, ws, cols, lips, max_iter - epochs, inner_rtol, report.deadline)
        inner_rtol = max(inner_rtol * 0.3, 1e-10)
    return _Outcome(prob, Mt.T, cert, epochs, cert.rel_gap <= tol, "bcd")


# ----------------------------------------------------------------------------------------------
# public solvers


_SOLVE = {"newton": _solve_newton, "bcd": _solve_bcd, "fista": _solve_fista, "pgd": _solve_pgd, "altmin": _solve_altmin}


def _check_options(lam, solver, tol, max_iter, q, warm_start, warm_iter, max_time=None) -> str:
    if isinstance(lam, Tensor):
        lam = float(lam)
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not (isinstance(q, (int, float)) and q > 0):
        raise ValueError(f"q (FISTA look-ahead) must be a positive number, got {q!r}")
    if warm_start not in (None, "altmin"):
        raise ValueError(f"warm_start must be None or 'altmin', got {warm_start!r}")
    if not isinstance(warm_iter, int) or warm_iter < 0:
        raise ValueError(f"warm_iter must be a non-negative integer, got {warm_iter!r}")
    if max_time is not None and not (isinstance(max_time, (int, float)) and max_time > 0):
        raise ValueError(f"max_time must be None or a positive number of seconds, got {max_time!r}")
    return "newton" if solver == "auto" else solver


def _reduce_start(prob: _Reduced, M0: Optional[Tensor]) -> Optional[Tensor]:
    if M0 is None:
        return None
    h, d = prob.shape
    if not isinstance(M0, Tensor) or tuple(M0.shape) != (h, d):
        raise ValueError(f"M0 must be a tensor of shape (h, d) = {(h, d)}")
    Mp0 = M0.to(device=prob.B.device, dtype=_F64)[:, prob.cols]
    Mp0 = Mp0 if prob.outputs is None else prob.outputs.T @ Mp0
    return Mp0 if prob.spread is None else prob.spread.compact(Mp0)


def _run(prob: _Reduced, lam: float, solver: str, Mp0, tol, max_iter, q, warm_start, warm_iter, progress,
         max_time=None) -> _Outcome:
    deadline = math.inf if max_time is None else time.perf_counter() + max_time
    if lam == 0.0:
        Mp = prob.W_ls
        cert = _certificate(prob, Mp, prob.gradient(Mp), lam)
        return _Outcome(prob, Mp, _Certificate(0.0, cert.primal, 1.0, cert.grad_norms), 0, True, "lstsq")
    iterations = 0
    if warm_start == "altmin" and solver != "altmin":
        warm = _solve_altmin(prob, lam, Mp0, tol, warm_iter, _Reporter("altmin", progress, deadline))
        Mp0, iterations = warm.Mp, warm.iterations
    limit = _DEFAULT_MAX_ITER[solver] if max_iter is None else max_iter
    out = _SOLVE[solver](prob, lam, Mp0, tol, limit, _Reporter(solver, progress, deadline), q=q)
    out.iterations += iterations
    return out


def _result(out: _Outcome, lam: float, lam_max: float, tie_broken: bool = False) -> GroupLassoResult:
    return GroupLassoResult(
        M=out.prob.lift(out.Mp), objective=out.cert.primal, gap=out.cert.gap, rel_gap=out.cert.rel_gap,
        iterations=out.iterations, converged=out.converged, support=out.prob.support(out.Mp),
        lam=lam, lam_max=lam_max, solver=out.solver, tie_broken=tie_broken,
    )


SINGLE_THREAD_BELOW = 1024
"""CPU problems with fewer columns than this run on one intra-op thread (see `_solver_threads`)."""


def _solver_threads(fn):
    """Run `fn` with scipy's BLAS/LAPACK (``dsyrk``, ``dpstrf``) on as many threads as torch's intra-op pool, and
    both on one thread when ``Rxx`` is a CPU matrix with fewer than `SINGLE_THREAD_BELOW` columns.

    scipy's bundled OpenBLAS otherwise takes every core whatever the caller set for torch, and oversubscribes the
    machine when solves run side by side.  The factorisations of small problems take about a millisecond, so
    thread synchronisation costs as much as it saves, and while other processes keep the machine's cores busy
    multi-threaded BLAS on small matrices spins: a 301-column Newton solve measured 3.3 s with two threads against
    0.04 s with one.
    """
    @functools.wraps(fn)
    def wrapper(Rxx, *args, **kwargs):
        threads = torch.get_num_threads()
        small = Rxx.device.type == "cpu" and Rxx.shape[-1] < SINGLE_THREAD_BELOW
        inner = 1 if small else threads
        torch.set_num_threads(inner)
        try:
            with threadpool_limits(limits=inner, user_api="blas"):
                return fn(Rxx, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


@_solver_threads
def group_lasso(
    Rxx: Tensor,
    Ryx: Tensor,
    lam: float,
    groups: Optional[Tensor] = None,
    *,
    ryy=None,
    solver: str = "auto",
    M0: Optional[Tensor] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    q: float = 10.0,
    warm_start: Optional[str] = None,
    warm_iter: int = 20,
    progress: Optional[Callable[[dict], None]] = None,
    max_time: Optional[float] = None,
) -> GroupLassoResult:
    """Minimise ``F(M)`` (module docstring) to a relative duality gap ``tol``.

    Args:
        Rxx: ``E[x x^T]``, (d, d), symmetric PSD.
        Ryx: ``E[y x^T]``, (h, d); ``W @ Rxx`` to reconstruct a layer ``y = W x``.
        lam: penalty ``>= 0``; ``lam == 0`` is solved exactly as least squares (``solver="lstsq"``
            in the result, gap reported as 0).
        groups: group id per column (long, ``-1`` = unpenalised), or None for one group per column.
        ryy: ``E||y||^2``, optional: only changes ``objective`` (and hence ``rel_gap``); without it
            the smallest consistent value ``tr(Ryx Rxx^+ Ryx^T)`` is used.
        solver: ``"auto"`` (= ``"newton"``), ``"newton"``, ``"bcd"``, ``"fista"``, ``"pgd"``,
            ``"altmin"``.
        M0: optional (h, d) starting point (for ``newton`` its group norms seed ``eta``).
        tol: target relative duality gap ``gap / F(M)``.
        max_iter: iteration cap (epochs for ``bcd``); default per solver: newton 100, bcd 2000,
            fista/pgd 20000, altmin 2000.
        q: FISTA look-ahead parameter of seed 000 (``> 0``; larger damps the bouncing).
        warm_start: ``"altmin"`` runs up to ``warm_iter`` alternate-minimisation iterations first
            (seed 000 In[12]) and starts the chosen solver from there.
        warm_iter: iteration cap of the warm start.
        progress: called once per iteration (every 10 for fista) with a dict with keys ``solver``,
            ``iteration``, ``objective``, ``gap``, ``rel_gap``, ``support``.
        max_time: optional wall-clock budget in seconds, checked once per iteration (per outer
            pass for ``bcd``, per gap check for ``fista``); the best iterate so far is returned
            with ``converged=False``.

    Raises:
        ValueError: shape/device mismatch, non-finite statistics, negative ``lam``, unknown solver
            or warm start, bad ``groups``/``M0``/``tol``/``max_iter``/``q``/``ryy``.
    """
    solver = _check_options(lam, solver, tol, max_iter, q, warm_start, warm_iter, max_time)
    lam = float(lam)
    prob = _prepare(Rxx, Ryx, groups, ryy)
    out = _run(prob, lam, solver, _reduce_start(prob, M0), tol, max_iter, q, warm_start, warm_iter, progress, max_time)
    return _result(out, lam, prob.lambda_max)


def lambda_max(Rxx: Tensor, Ryx: Tensor, groups: Optional[Tensor] = None) -> float:
    """Smallest ``lam`` whose solution has every penalised group at zero.

    With the unpenalised block at its optimum, the gradient at ``M_p = 0`` is ``-B'`` (module
    docstring, reduction), and ``0`` is optimal iff ``||B'_g||_F <= lam`` for all g.  Returns 0.0
    when there is no (alive) penalised group.
    """
    return _prepare(Rxx, Ryx, groups, None, factor=False).lambda_max


@_solver_threads
def debias(Rxx: Tensor, Ryx: Tensor, keep_columns: Tensor) -> Tensor:
    """Least-squares refit on a support (seed 003 §2.4 "Tackling Lasso bias", seed 000 In[30]).

    Solves ``M_K Rxx[K, K] = Ryx[:, K]`` on the kept columns ``K`` (bool mask of length d, or
    integer indices) and leaves zeros elsewhere: the minimiser of ``E||y - M x||^2`` over matrices
    supported on ``K``.  Cholesky, or for a singular ``Rxx[K, K]`` the minimum-norm least-squares
    solution.  Returned in the dtype and on the device of ``Rxx``.
    """
    R, B = _statistics(Rxx, Ryx)
    d = R.shape[0]
    keep_columns = torch.as_tensor(keep_columns, device=R.device)
    if keep_columns.dtype == torch.bool:
        if tuple(keep_columns.shape) != (d,):
            raise ValueError(f"a boolean keep_columns must have length d={d}")
        idx = torch.nonzero(keep_columns).flatten()
    else:
        idx = keep_columns.long().flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
            raise ValueError(f"keep_columns indices must lie in [0, {d})")
    M = torch.zeros(B.shape, dtype=_F64, device=B.device)
    M[:, idx] = _psd_solve(R[idx][:, idx], B[:, idx].T).T
    return M.to(Rxx.dtype)


# ----------------------------------------------------------------------------------------------
# lambda search


@_solver_threads
def search_lambda(
    Rxx: Tensor,
    Ryx: Tensor,
    keep: int,
    groups: Optional[Tensor] = None,
    *,
    ryy=None,
    max_solves: int = 80,
    count_tol: float = 0.01,
    **solver_kw,
) -> GroupLassoResult:
    """Find ``lam`` on the l2,1 path at which exactly ``keep`` penalised groups survive.

    Bracketing on ``log lam`` between ``lambda_max`` (nothing kept) and a ``lam`` keeping at least
    ``keep`` groups, each solve warm-started from the previous solution (see ``_LambdaSearch.run``).
    The search stops once the bracket's lower end keeps at most ``keep + floor(count_tol * keep)``
    groups (0 for exactly ``keep`` on the path; the default 1% spares the last solves of a large
    ``keep``, each of which would move the count by one or two).  When it stops above ``keep``, or
    no ``lam`` gives exactly ``keep`` (groups leaving together, e.g. duplicated inputs, or ``keep``
    larger than the number of groups with a non-zero input), the ``keep`` groups of largest norm at
    the smallest bracketing ``lam`` are kept, the problem is re-solved on them and ``tie_broken`` is
    set: the result always has exactly ``keep`` groups in ``support``.

    ``solver_kw`` goes to :func:`group_lasso` (``solver``, ``tol``, ``max_iter``, ``q``,
    ``warm_start``, ``warm_iter``, ``progress``).  ``iterations`` sums over all solves.
    """
    prob = _prepare(Rxx, Ryx, groups, ryy)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= prob.n_groups_total:
        raise ValueError(f"keep must be an integer in [0, {prob.n_groups_total}] (the number of groups), got {keep!r}")
    kw = {"solver": "auto", "tol": 1e-6, "max_iter": None, "q": 10.0, "warm_start": None, "warm_iter": 20, "progress": None}
    unknown = set(solver_kw) - set(kw)
    if unknown:
        raise ValueError(f"unknown option(s) for search_lambda: {', '.join(sorted(unknown))}")
    kw.update(solver_kw)
    solver = _check_options(1.0, kw["solver"], kw["tol"], kw["max_iter"], kw["q"], kw["warm_start"], kw["warm_iter"])
    if isinstance(count_tol, bool) or not isinstance(count_tol, (int, float)) or not 0 <= count_tol < 1:
        raise ValueError(f"count_tol must be a number in [0, 1), got {count_tol!r}")
    search = _LambdaSearch(prob, solver, kw)
    return search.run(keep, max_solves, int(count_tol * keep))


def _log_power_law_factor(lams: list[float], counts: list[int], keep: int) -> float:
    """``log`` of the factor below the last ``lam`` at which ``count ~ lam^-s``, ``s`` fitted through the
    last two solves, reaches ``keep``; ``inf`` where the count did not grow between them."""
    if counts[-1] <= counts[-2]:
        return math.inf
    slope = math.log(counts[-1] / counts[-2]) / math.log(lams[-2] / lams[-1])
    return math.log(keep / counts[-1]) / slope


def _descent_factor(lams: list[float], counts: list[int], keep: int) -> float:
    """The factor dividing ``lam`` in the search for a lower bracket: 2, or, after two solves with
    a growing non-zero count, the factor at which ``count ~ lam^-s`` (``s`` fitted through them)
    reaches ``keep``, within ``[2, _MAX_DESCENT]``.  Counts grow slowly near ``lambda_max``
    (a joint residual stream: 3, 4, 7, 9, 12, ... over halvings), where halving alone would take a
    dozen solves; the cap bounds the overshoot, which the bracketing then repairs."""
    if len(counts) < 2 or counts[-2] <= 0 or counts[-1] <= counts[-2]:
        return 2.0
    log_factor = _log_power_law_factor(lams, counts, keep)
    return _MAX_DESCENT if log_factor >= math.log(_MAX_DESCENT) else max(math.exp(log_factor), 2.0)


def _stalled(lams: list[float], counts: list[int], keep: int) -> bool:
    """Whether a count of at least ``keep / 2`` grows so slowly that the power law of
    ``_descent_factor`` puts ``keep`` beyond its largest step, more than ``_MAX_DESCENT`` below the
    last ``lam`` (or did not grow at all over the last step).  This is how a saturating path looks
    before its first unconverged solve, the costliest of the search (it runs to the iteration cap):
    resnet101's 3x3 convolutions on 256 calibration rows reach 117, then 119 of 128 a factor 2.3
    lower, which puts 128 a factor 35 lower; the solves below gained 3 more groups at most, and
    any 128 channels there fit the calibration rows exactly.  Near ``lambda_max`` counts grow slowly
    too (3, then 6 eight times lower), hence the ``keep / 2``; a count up from 0 has not stalled."""
    if len(counts) < 2 or 2 * counts[-1] < keep or counts[-2] <= 0:
        return False
    return _log_power_law_factor(lams, counts, keep) > math.log(_MAX_DESCENT)


class _LambdaSearch:
    """Warm-started solves along the path for :func:`search_lambda`."""

    def __init__(self, prob: _Reduced, solver: str, kw: dict):
        self.prob, self.solver, self.kw = prob, solver, kw
        self.iterations = 0
        self.last: Optional[_Outcome] = None

    def solve(self, lam: float, prob: Optional[_Reduced] = None, Mp0: Optional[Tensor] = None) -> _Outcome:
        """Solve at ``lam``; on the full problem, warm-start from the previous solution."""
        full = prob is None
        prob = self.prob if full else prob
        if full:  # the first solve, just below lambda_max, keeps few groups: Newton starts at eta = 0
            Mp0 = self._widen(self.last) if self.last is not None else torch.zeros_like(prob.B)
        max_iter = self.kw["max_iter"]
        if max_iter is None and self.solver == "newton":
            max_iter = _SEARCH_NEWTON_ITER
        out = _run(prob, lam, self.solver, Mp0, self.kw["tol"], max_iter, self.kw["q"],
                   self.kw["warm_start"], self.kw["warm_iter"], self.kw["progress"])
        self.iterations += out.iterations
        if full:
            self.last = out
        return out

    def _widen(self, out: _Outcome, base: Optional[_Reduced] = None) -> Tensor:
        """A solution of a screened (restricted) problem on the columns of ``base`` (default: the
        full problem), which it was restricted from."""
        base = self.prob if base is None else base
        Mp = torch.zeros_like(base.B)
        pos = torch.full((base.shape[1],), -1, dtype=torch.long, device=Mp.device)
        pos[base.cols] = torch.arange(base.cols.numel(), device=Mp.device)
        Mp[:, pos[out.prob.cols]] = out.Mp
        return Mp

    @staticmethod
    def count(out: _Outcome) -> int:
        return _support_size(out.prob, out.Mp)

    def run(self, keep: int, max_solves: int, slack: int = 0) -> GroupLassoResult:
        """Divide ``lam`` from ``lambda_max`` until at least ``keep`` groups survive (by
        ``_descent_factor``), then shrink the bracket ``count(lo) > keep > count(hi)`` in ``log lam``
        by interpolating the counts linearly (regula falsi, the step kept within 2-98% of the
        bracket), bisecting instead after two moves of the same end (the Illinois safeguard against
        one-sided convergence), until ``count(lo) <= keep + slack``.

        The descent stops early where the path *saturates*: a solve that no longer reaches ``tol``,
        a count unchanged over ``_PLATEAU`` steps, or one that has stalled (``_stalled``).
        Statistics of fewer calibration rows than columns (large convolutions) have many exact
        fits; as ``lam -> 0`` the solution tends to the one of least group norm, whose support can
        be smaller than ``keep``, and the problem becomes too ill-conditioned to solve: smaller
        ``lam`` only adds noise.  ``keep`` is then completed by the tie-break."""
        hi = self.prob.lambda_max
        if keep == 0:
            return self._final(self.solve(hi), hi, keep)
        if keep >= self.prob.n_groups:
            return self._final(self.solve(0.0), 0.0, keep)
        lo, solves, lo_out, counts, lams = hi, 0, None, [], []
        while True:
            trial = lo / _descent_factor(lams, counts, keep)
            out = self.solve(trial)
            if lo_out is not None and self._saturated(out, counts):
                return self._final(lo_out, lo, keep, saturated=True)
            lo, lo_out, solves = trial, out, solves + 1
            counts.append(self.count(out))
            lams.append(lo)
            if counts[-1] >= keep:
                break
            if _stalled(lams, counts, keep):
                return self._final(lo_out, lo, keep, saturated=True)
            hi = lo
        hi_count, side = (counts[-2] if len(counts) > 1 else 0), None
        while self.count(lo_out) > keep + slack and solves < max_solves and hi / lo - 1 > 1e-12:
            lo_count = self.count(lo_out)
            t = 0.5 if side == "repeat" else min(max((lo_count - keep) / (lo_count - hi_count), _FALSI_CLAMP), 1 - _FALSI_CLAMP)
            mid, solves = lo * (hi / lo) ** t, solves + 1
            out = self.solve(mid)
            moved = "lo" if self.count(out) >= keep else "hi"
            side = "repeat" if moved == side else moved
            if moved == "lo":
                lo, lo_out = mid, out
            else:
                hi, hi_count = mid, self.count(out)
        return self._final(lo_out, lo, keep)

    def _saturated(self, out: _Outcome, counts: list[int]) -> bool:
        """Whether the path has saturated (see ``run``) at this solve, given the counts before it."""
        plateau = len(counts) >= _PLATEAU and len(set(counts[-_PLATEAU:] + [self.count(out)])) == 1
        return not out.converged or plateau

    def _final(self, out: _Outcome, lam: float, keep: int, saturated: bool = False) -> GroupLassoResult:
        if self.count(out) == keep:
            res = _result(out, lam, self.prob.lambda_max)
        else:
            res = self._tie_break(out, lam, keep, halve=not saturated)
        res.iterations = self.iterations
        return res

    def _tie_break(self, out: _Outcome, lam: float, keep: int, halve: bool = True) -> GroupLassoResult:
        """Keep the ``keep`` largest groups at ``lam`` (groups at zero ranked by their norm in the
        least-squares fit of least norm) and re-solve on them alone, halving ``lam`` (unless the path
        has saturated already) until none of them vanishes or the path saturates; when fewer than
        ``keep`` groups have a non-zero input, the support is padded with zero-input groups (lowest ids
        first)."""
        norms = torch.zeros(self.prob.n_groups, dtype=_F64, device=out.Mp.device)
        norms[torch.searchsorted(self.prob.group_ids, out.prob.group_ids)] = out.prob.group_sq(out.Mp)
        fit_norms = self.prob.group_sq(self.prob.W_ls)
        above_any_fit = float(fit_norms.max()) + 1.0 if fit_norms.numel() else 0.0
        score = torch.where(norms > 0, norms + above_any_fit, fit_norms)
        chosen = torch.zeros(self.prob.n_groups, dtype=torch.bool, device=norms.device)
        chosen[torch.topk(score, min(keep, self.prob.n_groups)).indices] = True
        sub = self.prob.restrict(chosen)
        final = self.solve(lam, prob=sub, Mp0=self._widen(out)[:, chosen[self.prob.grp]])
        counts = []
        for halvings in range(61 if halve else 0):
            if self.count(final) == sub.n_groups or lam == 0.0:
                break
            counts.append(self.count(final))
            trial_lam = lam * 0.5 if halvings < 59 else 0.0
            trial = self.solve(trial_lam, prob=sub, Mp0=self._widen(final, sub))
            if self._saturated(trial, counts):
                break
            final, lam = trial, trial_lam
        res = _result(final, lam, self.prob.lambda_max, tie_broken=True)
        res.support[sub.group_ids] = True
        missing = keep - int(res.support.sum())
        if missing > 0:
            res.support[torch.nonzero(~res.support).flatten()[:missing]] = True
        return res
