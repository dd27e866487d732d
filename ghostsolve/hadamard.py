"""Normalized Hadamard transforms for the ``hadamard`` families.

A Hadamard matrix of order ``n`` has entries ±1 and satisfies ``H Hᵀ = n I``; ``H / sqrt(n)`` is
orthogonal. ghostsolve builds one of order ``d`` as a Kronecker product ``H_m ⊗ H_{2^k}`` where ``H_{2^k}``
is the Sylvester (Walsh–Hadamard) matrix and ``H_m`` is a Paley matrix (written here, see
:func:`paley_hadamard`) for ``m = q + 1`` with ``q ≡ 3 (mod 4)`` prime (Paley I: 12, 20, 24, 44, ...) or
``m = 2(q + 1)`` with ``q ≡ 1 (mod 4)`` prime (Paley II: 28, 36, 60, ...). This covers every power of two
and hidden sizes such as 896 = 28·32, 1152 = 36·32, 1536 = 12·128, 2560 = 20·128, 3072 = 12·256,
5120 = 20·256. Other sizes are refused with :class:`~ghostsolve.errors.GhostsolveError`.

The transform uses ``H_d = H_a ⊗ H_b`` with ``a ≈ b ≈ sqrt(d)``: two GEMMs on a reshaped tensor, costing
``2 n d (a + b)`` flops (``128 n d`` for ``d = 1024``) instead of ``2 n d²`` for a dense product.
"""

from __future__ import annotations

import functools
import math

import torch

from .errors import GhostsolveError

__all__ = [
    "apply_hadamard",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_supported",
    "paley_hadamard",
]

# Largest prime q tried by the Paley constructions; orders up to 2·(97+1) cover every hidden size in use
# (d = m · 2^k with m ≤ 196), and building a larger base matrix would only cost O(m²) once anyway.
_MAX_PALEY_Q = 97


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    table = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    return table[diff]


def _paley_orders() -> dict[int, tuple[str, int]]:
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, _MAX_PALEY_Q + 1):
        if not _is_prime(q):
            continue
        if q % 4 == 3:
            orders.setdefault(q + 1, ("I", q))
        else:
            orders.setdefault(2 * (q + 1), ("II", q))
    return orders


_PALEY = _paley_orders()


@functools.lru_cache(maxsize=64)
def paley_hadamard(order: int) -> torch.Tensor:
    """Unnormalized Hadamard matrix of a Paley order (±1 entries, ``H Hᵀ = order · I``), float64.

    Parameters
    ----------
    order : int
        ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (Paley I) or ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``
        (Paley II), with ``q ≤ 97``.

    Returns
    -------
    (order, order) float64 tensor

    Raises
    ------
    GhostsolveError
        When ``order`` is not such an order.
    """
    if order not in _PALEY:
        raise GhostsolveError(
            f"no Paley construction of order {order}; Paley orders available: {sorted(_PALEY)}"
        )
    kind, q = _PALEY[order]
    Q = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "I":
        # Q is skew for q ≡ 3 mod 4, so S = [[0, 1ᵀ], [-1, Q]] is skew with S Sᵀ = q I and H = I + S.
        S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        S[0, 1:] = ones
        S[1:, 0] = -ones
        S[1:, 1:] = Q
        H = torch.eye(q + 1, dtype=torch.float64) + S
    else:
        # Q is symmetric for q ≡ 1 mod 4: the conference matrix C is symmetric, C² = q I, and the
        # 2×2 substitution below turns it into a Hadamard matrix of order 2(q + 1).
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:] = ones
        C[1:, 0] = ones
        C[1:, 1:] = Q
        A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        H = torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    # The constructions are classical, but a wrong table would silently break the orthogonality every
    # hadamard-family result relies on; checking once per order costs O(order³) at most.
    if not torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64)):
        raise AssertionError(f"Paley construction of order {order} is not Hadamard")  # pragma: no cover
    return H


@functools.lru_cache(maxsize=64)
def _sylvester(order: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < order:
        H = torch.kron(H, base)
    return H


def _split(d: int) -> tuple[int, int, int] | None:
    """``(m, a, b)``: Paley order ``m`` (1 if none) and ``d = a · b`` with ``a = m · 2^i``, ``b = 2^j``."""
    if d < 1:
        return None
    two = (d & -d).bit_length() - 1  # exponent of 2 in d
    odd = d >> two
    m = 1
    if odd != 1:
        # smallest Paley order odd·2^j dividing d: keeps the dense Paley factor as small as possible
        candidates = [odd << j for j in range(two + 1) if (odd << j) in _PALEY]
        if not candidates:
            return None
        m = candidates[0]
    rest = d // m  # a power of two
    # balance a ≈ b ≈ sqrt(d): both GEMMs of the transform then cost 2·n·d·sqrt(d)
    b = 1
    while b * b * 2 <= d and rest % (b * 2) == 0 and (d // (b * 2)) % m == 0:
        b *= 2
    return m, d // b, b


def hadamard_factors(d: int) -> tuple[int, ...] | None:
    """Orders ``(a, b)`` (or ``(a,)``) of the two dense factors with ``H_d = H_a ⊗ H_b``.

    ``H_b`` is a Sylvester (Walsh–Hadamard) matrix; ``H_a`` is one too when ``d`` is a power of two,
    otherwise the Kronecker product of a Paley matrix and a Sylvester matrix. ``None`` when ``d`` is not
    supported.
    """
    split = _split(d)
    if split is None:
        return None
    _, a, b = split
    return (a, b) if b > 1 else (a,)


def hadamard_supported(d: int) -> bool:
    """Whether :func:`hadamard_matrix` can build an order-``d`` Hadamard matrix."""
    return hadamard_factors(d) is not None


def _supported_message(d: int) -> str:
    sizes = sorted({m << k for m in [1, *_PALEY] for k in range(0, 14) if 0 < (m << k) <= 8192})
    near = [s for s in sizes if s >= d][:3] + [s for s in sizes if s < d][-3:]
    return (
        f"hidden size d={d} has no supported Hadamard matrix: ghostsolve builds orders m·2^k with m = 1 "
        f"or a Paley order {sorted(_PALEY)} (e.g. 12, 20, 28, 36). Nearest supported sizes: {sorted(near)}. "
        "Use family='diagonal' or 'symmetric' instead"
    )


@functools.lru_cache(maxsize=32)
def _factor_matrices(d: int, dtype: torch.dtype, device: torch.device | None) -> tuple[torch.Tensor, ...]:
    split = _split(d)
    if split is None:
        raise GhostsolveError(_supported_message(d))
    m, a, b = split
    Ha = _sylvester(a // m)
    if m > 1:
        Ha = torch.kron(paley_hadamard(m), Ha)
    mats = [Ha / math.sqrt(a)]
    if b > 1:
        mats.append(_sylvester(b) / math.sqrt(b))
    return tuple(t.to(dtype=dtype, device=device) for t in mats)


def hadamard_matrix(
    d: int, *, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> torch.Tensor:
    """The normalized (orthogonal) Hadamard matrix ``H`` of order ``d`` used by the hadamard families.

    Parameters
    ----------
    d : int
        Order; see the module docstring for the supported sizes.
    dtype, device
        Of the result.

    Returns
    -------
    (d, d) tensor with ``H Hᵀ = I``.

    Raises
    ------
    GhostsolveError
        When ``d`` is not supported; the message names supported sizes near ``d``.
    """
    mats = _factor_matrices(d, torch.float64, None)
    H = torch.ones(1, 1, dtype=torch.float64)
    for m in mats:
        H = torch.kron(H, m)
    return H.to(dtype=dtype, device=device)


def apply_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate rows: ``x H`` for ``x`` of shape ``(..., d)`` with the normalized ``H`` of order ``d``.

    Computed factor by factor in ``x``'s dtype without forming ``H``; returns a new tensor.

    Raises
    ------
    GhostsolveError
        When ``d = x.shape[-1]`` is not supported.
    """
    d = x.shape[-1]
    mats = _factor_matrices(d, x.dtype, x.device)
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    if len(mats) == 1:
        return (y @ mats[0]).reshape(*lead, d)
    Ha, Hb = mats
    a, b = Ha.shape[0], Hb.shape[0]
    n = y.shape[0]
    # Row-major index (i, j) of H_a ⊗ H_b: X (n, a, b) ↦ H_aᵀ X H_b, two GEMMs and no transposes.
    z = (y.reshape(n * a, b) @ Hb).reshape(n, a, b)
    return torch.matmul(Ha.T, z).reshape(*lead, d)
