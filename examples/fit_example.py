"""A short ghostsolve.fit example on synthetic "hidden states".

X plays the residual stream entering a removed block, Y the stream after it. Y is built as
X W_true plus noise, where W_true has a symmetric and a skew (rotation-like) part, and X has one outlier
channel, as LLM activations do. Every operator family is fitted and its relative residual printed:
``objective / ‖Y − X‖²`` (1.0 = plain pruning, lower is better).

    python examples/fit_example.py
"""

from __future__ import annotations

import torch

import ghostsolve


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 8192, 64
    X = torch.randn(n, d, generator=g)
    X[:, 3] *= 100.0  # an outlier channel
    A = torch.randn(d, d, generator=g) / d**0.5
    W_true = torch.eye(d) + 0.2 * (A + A.T) / 2 + 0.2 * (A - A.T) / 2
    Y = X @ W_true + 0.05 * torch.randn(n, d, generator=g)

    # statistics are streamed chunk by chunk; nothing grows with n
    stats = ghostsolve.Stats(d)
    for start in range(0, n, 2048):
        stats.update(X[start : start + 2048], Y[start : start + 2048])

    print(ghostsolve.diagnose(stats))
    print()
    print(f"{'family':<20} {'solver':<12} {'relative residual':>18}")
    for family in ghostsolve.FAMILIES:
        kwargs = {"rank": 8} if family == "lowrank" else {}
        fit = ghostsolve.fit(stats, family=family, **kwargs)
        label = f"{family} (r=8)" if family == "lowrank" else family
        print(f"{label:<20} {fit.solver:<12} {fit.relative_residual:>18.6f}")

    full = ghostsolve.fit(stats)
    print()
    print(f"skew share of the full operator: {full.diagnostics.skew_share:.3f}")
    print(f"normal-equation residual: {full.diagnostics.normal_equation_residual:.2e}")
    h = X[:4].to(torch.bfloat16)
    print(f"applied to bf16 rows: {tuple(full(h).shape)}, dtype {full(h).dtype}")


if __name__ == "__main__":
    main()
