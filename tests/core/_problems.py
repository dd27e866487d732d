"""Test problems with a chosen conditioning, and an independent numpy reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

CONDS = (1.0, 1e2, 1e5, 1e8, 1e10)


@dataclass
class Case:
    X: torch.Tensor  # (n, d) float64
    Y: torch.Tensor
    cond_x: float  # measured with numpy over the min(n, d) nonzero singular values

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    def bound(self, dtype: torch.dtype, M: np.ndarray) -> float:
        """First-order bound on ``‖X (M − M_ref)‖ / ‖Y − X‖`` for a solver through XᵀX in ``dtype``.

        ``‖X δM‖ ≲ c · eps · κ(X) · (s_max ‖M‖ + ‖D‖)`` with ``c = max(d, sqrt(n))`` (factorization
        backward error plus chunked summation of the statistics), times a safety factor of 50.
        """
        Xn, Yn = self.X.numpy(), self.Y.numpy()
        D = np.linalg.norm(Yn - Xn)
        smax = np.linalg.norm(Xn, 2)
        c = max(self.d, np.sqrt(self.n))
        return 50 * c * eps(dtype) * self.cond_x * (smax * np.linalg.norm(M, 2) / D + 1)


def make_case(
    seed: int,
    n: int,
    d: int,
    cond: float = 1.0,
    *,
    outlier: bool = False,
    scale: float = 1.0,
    noise: float = 0.1,
    M: torch.Tensor | None = None,
) -> Case:
    """Rows ``X = U diag(s) Vᵀ`` with singular values spanning ``cond`` (rank ``min(n, d)``), optionally one
    channel 1000× larger, times ``scale``; ``Y = X (I + M) + noise``."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    s = (
        torch.logspace(0, -np.log10(cond), k, dtype=torch.float64)
        if cond > 1
        else torch.ones(k, dtype=torch.float64)
    )
    X = (U * s) @ V.T * np.sqrt(n)
    if outlier:
        X[:, seed % d] *= 1000.0
    if M is None:
        M = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64) / np.sqrt(d)
    rms = float(X.pow(2).mean().sqrt())
    Y = X @ (torch.eye(d, dtype=torch.float64) + M) + noise * rms * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    X, Y = X * scale, Y * scale
    sv = np.linalg.svd(X.numpy(), compute_uv=False)
    # condition number over the nonzero singular values (X has rank min(n, d))
    return Case(X, Y, float(sv[0] / sv[k - 1]))


@st.composite
def cases(
    draw: st.DrawFn, *, max_d: int = 24, allow_wide: bool = True, conds: tuple[float, ...] = CONDS
) -> Case:
    d = draw(st.integers(2, max_d))
    # one draw in four has fewer rows than d (rank-deficient X)
    wide = allow_wide and draw(st.integers(0, 3)) == 0
    n = draw(st.integers(1, d - 1)) if wide else draw(st.integers(d + 4, 6 * d + 40))
    return make_case(
        draw(st.integers(0, 2**31 - 1)),
        n,
        d,
        draw(st.sampled_from(conds)),
        outlier=draw(st.booleans()),
        scale=draw(st.sampled_from((1e-3, 1.0, 1e3))),
        noise=draw(st.sampled_from((1e-3, 0.1, 1.0))),
    )


def lstsq_delta(X: torch.Tensor, Y: torch.Tensor) -> np.ndarray:
    """Independent reference: numpy's minimum-norm least squares for ``X M ≈ Y − X`` (float64)."""
    Xn, Yn = X.double().numpy(), Y.double().numpy()
    return np.linalg.lstsq(Xn, Yn - Xn, rcond=None)[0]


def objective(X: torch.Tensor, Y: torch.Tensor, M: np.ndarray | torch.Tensor) -> float:
    """``‖X M − (Y − X)‖²`` on the materialized rows (float64 numpy)."""
    Xn, Yn = X.double().numpy(), Y.double().numpy()
    Mn = M.double().numpy() if isinstance(M, torch.Tensor) else M
    return float(((Xn @ Mn - (Yn - Xn)) ** 2).sum())


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)
