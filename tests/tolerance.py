"""Tolerances with a reason.

A kernel's error against a float64 reference is bounded by a small multiple of the error that the
same-precision eager PyTorch computation makes against that reference (plus a floor for the
exactly-representable case). fp32 kernels get a tight absolute floor instead of a ratio.
"""

from __future__ import annotations

import torch

# How far past eager's own error a fused kernel may land: it rounds at different points (one
# final cast instead of several intermediate ones), so it is usually better, occasionally a bit worse.
ERROR_FACTOR = 3.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Whatever eager's error, no bound may exceed this fraction of the values' scale: a bound as large
# as the signal would pass a kernel returning zeros. bf16 rounds at 2^-9 relative, and a gradient
# computed through a chain of bf16 ops does worse: eager's own bf16 db1 of gated_blend (6 rows, width
# 40) was 2.1% of its scale off float64 on an H200 (cuBLAS), so 5% (~25 roundings' worth).
MAX_RELATIVE_BOUND = 0.05


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name: str, got: torch.Tensor, same_precision_eager: torch.Tensor,
                              ref64: torch.Tensor, factor: float = ERROR_FACTOR,
                              scale: float | None = None) -> None:
    """``got`` must be within ``factor`` x eager's error of the float64 reference, plus a per-dtype
    floor relative to ``scale`` (default: the reference's largest magnitude, at least 1), and in
    any case within ``MAX_RELATIVE_BOUND`` x ``scale``."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if scale is None:
        scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    eager_err = max_err(same_precision_eager, ref64)
    bound = min(factor * eager_err + FLOOR[got.dtype] * scale, MAX_RELATIVE_BOUND * scale)
    err = max_err(got, ref64)
    assert err <= bound, (f"{name}: max error {err:.3e} vs float64 exceeds {bound:.3e} "
                          f"({factor} x eager {got.dtype} error {eager_err:.3e} + floor)")
