"""A chain of post-norm blocks without its add+RMSNorm passes: each norm deferred into the matmuls.

A post-norm block computes ``x1 = rms_norm(x0 + o_proj(attn(qkv_proj(x0))))`` and then
``x2 = rms_norm(x1 + down_proj(swiglu(gate_up_proj(x1))))`` (weightless RMSNorm). Unfused, each
norm is a pass of its own that reads the residual and the projection's output and writes the
normalized rows. Here a block's state is kept as a pair ``(h, ss)``:

- ``h`` [M, D]: the sum before the norm (``x0 + o_proj(...)``), in the activations' dtype;
- ``ss`` [M, T] fp32: partial sums of squares of each row of ``h`` (T column tiles; their sum is
  ``sum(h^2)``), so that ``rms_norm(h) = h * rsqrt(sum(ss) / D + eps)``, rounded to h's dtype.

``ss = None`` means the state is ``h`` itself (not normalized: the first block's input). Two ops:

- ``norm_linear(h, ss, w, eps, epilogue, rope=None)`` = ``epilogue(rms_norm(h) @ w.T)``. The matmul
  reads ``h`` and scales each row of its fp32 accumulator by ``rsqrt(sum(ss) / D + eps)``: the
  normalized rows are never written. ``epilogue``: ``"none"`` or ``"swiglu"`` (``w`` holds gate
  rows then up rows; ``silu(gate) * up``, as ``linear_swiglu``). ``rope``: for a qkv projection,
  its q and k heads rotated (RoPE) in the same epilogue.
- ``linear_add_sumsq(a, w, h, ss, eps)`` = ``(h', ss')`` with ``h' = rms_norm(h) + a @ w.T`` (both
  terms rounded to the dtype, as the reference adds them) and ``ss'`` its rows' partial sums of
  squares, computed in the matmul's epilogue from the rounded ``h'``.

A block is then ``qkv = norm_linear(h, ss, W_qkv)``, ``h, ss = linear_add_sumsq(attn(qkv), W_o, h,
ss)``, ``act = norm_linear(h, ss, W_gate_up, "swiglu")``, ``h, ss = linear_add_sumsq(act, W_down, h,
ss)``, and the chain's output ``rms_norm(h)`` (one pass at the end, ``hrm_kernels.rms_norm``).

The math is the reference's except for where one rounding falls: the reference rounds ``rms_norm(h)``
to the dtype before its matmul, here the matmul reads ``h`` and the scale is applied in fp32
(the residual term is rounded exactly as the reference rounds it). On Hopper with bf16/fp16 the ops
run as ``hrm_kernels._gluon_gemm`` epilogues; elsewhere as the reference's eager math (``ss`` then
has one column). No gradients: HRM's no-gradient recurrence (most of a segment) uses them; inputs
that require grad while grad mode is on are refused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hrm_kernels import _gluon_gemm
from hrm_kernels._utils import check_float, check_same
from hrm_kernels.backend import use_triton
from hrm_kernels.rope_qkv import rope_qkv_reference
from hrm_kernels.swiglu import swiglu_reference

EPILOGUES = ("none", "swiglu")


def rms_scale(ss: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """``rsqrt(sum(ss) / width + eps)`` per row, [M, 1] fp32: the RMS norm's scale from partial
    sums of squares [M, T]."""
    return torch.rsqrt(ss.sum(-1, keepdim=True) / width + eps)


def normalized(h: torch.Tensor, ss: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The state's value: ``h`` when ``ss`` is None, else ``rms_norm(h)`` rounded to h's dtype."""
    if ss is None:
        return h
    return (h.float() * rms_scale(ss, h.shape[-1], eps)).to(h.dtype)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, ss: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("h", h)):
        check_float(name, t, op)
    check_same(op, "x", x, "weight", weight, shape=False)
    check_same(op, "x", x, "h", h, shape=False)
    if weight.dim() != 2 or x.dim() != 2 or h.dim() != 2 or x.shape[0] != h.shape[0]:
        raise ValueError(f"{op}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, h {tuple(h.shape)}; need 2-D "
                         "[M, K] rows, an [N, K] weight and h [M, D]")
    if ss is not None and (ss.dtype != torch.float32 or ss.dim() != 2 or ss.shape[0] != h.shape[0]
                           or ss.device != h.device):
        raise ValueError(f"{op}: ss must be fp32 [M, T] partial sums of squares on h's device, got {ss.dtype} "
                         f"{tuple(ss.shape)} on {ss.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, h)):
        raise RuntimeError(f"{op} has no gradient: call it under torch.no_grad() (it serves the no-gradient "
                           "passes), or use F.linear and hrm_kernels.rms_norm")


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run for activations like ``x`` at all (a Hopper GPU, the
    Triton backend, outside torch.compile); ``runs_fused`` also checks the operands."""
    return (x.is_cuda and use_triton(x.device) and not torch.compiler.is_compiling()
            and _gluon_gemm.available(x.device))


def _fused(x: torch.Tensor, weight: torch.Tensor, epilogue: str) -> bool:
    return available(x) and _gluon_gemm.supported(x, weight, epilogue)


def runs_fused(x: torch.Tensor, weight: torch.Tensor, epilogue: str = "none") -> bool:
    """Whether ``norm_linear`` / ``linear_add_sumsq`` run as one kernel for these operands (Hopper,
    bf16/fp16, contiguous rows, widths multiples of 8): where they do not, the unfused block is
    as fast (the eager path here does the same passes)."""
    return _fused(x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x, weight, epilogue)


def norm_linear(h: torch.Tensor, ss: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                epilogue: str = "none", rope: Optional[tuple] = None) -> torch.Tensor:
    """``epilogue(rms_norm(h) @ weight.T)`` (``h`` itself when ``ss`` is None). h: [M, K], ss: [M, T]
    fp32 or None, weight: [N, K] ([2I, K] for ``"swiglu"``) in h's dtype. Returns [M, N] ([M, I]).
    ``rope``: ``(cos, sin, seq_len, head_dim)`` for a qkv projection (plain epilogue): the output's q
    and k heads rotated (``hrm_kernels.rope``'s math on the rounded projection, position = row %
    seq_len; cos, sin the fp32 half tables [positions, head_dim / 2]), in the matmul's epilogue."""
    op = "norm_linear"
    if epilogue not in EPILOGUES:
        raise ValueError(f"{op}: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    _check(op, h, weight, h, ss)
    if h.shape[1] != weight.shape[1] or (epilogue == "swiglu" and weight.shape[0] % 2):
        raise ValueError(f"{op}: h {tuple(h.shape)} and weight {tuple(weight.shape)}: need weight [N, K] "
                         "with K = h's width (an even N for swiglu)")
    if rope is not None:
        if epilogue != "none":
            raise ValueError(f"{op}: rope goes with the plain epilogue (a qkv projection), not {epilogue!r}")
        if _fused(h, weight, "rope") and h.shape[0] and h.shape[1]:
            return _gluon_gemm.gemm(h, weight, "rope", ss=ss, eps=eps, rope=rope)  # (checks rope)
        cos, sin, seq_len, head_dim = _gluon_gemm.check_rope(h, weight.shape[0], *rope)
        qkv = F.linear(normalized(h, ss, eps), weight).view(-1, seq_len, weight.shape[0] // head_dim, head_dim)
        return torch.cat(rope_qkv_reference(qkv, cos, sin), dim=2).view(h.shape[0], weight.shape[0])
    if ss is None and epilogue == "none":  # a plain matmul: cuBLAS's
        return F.linear(h, weight)
    if _fused(h, weight, epilogue) and h.shape[0] and h.shape[1]:
        return _gluon_gemm.gemm(h, weight, epilogue, ss=ss, eps=eps)
    y = F.linear(normalized(h, ss, eps), weight)
    return swiglu_reference(y) if epilogue == "swiglu" else y


def linear_add_sumsq(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, ss: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h', ss')``: ``h' = rms_norm(h) + x @ weight.T`` (``h`` itself when ``ss`` is None), both
    terms rounded to the dtype, and ``ss'`` [M, T] fp32 partial sums of squares of h' rows.
    x: [M, K], weight: [N, K], h: [M, N], all one dtype."""
    op = "linear_add_sumsq"
    _check(op, x, weight, h, ss)
    if x.shape[1] != weight.shape[1] or h.shape[1] != weight.shape[0]:
        raise ValueError(f"{op}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, h {tuple(h.shape)}; need "
                         "x [M, K], weight [N, K], h [M, N]")
    if (_fused(x, weight, "none") and x.shape[0] and x.shape[1] and weight.shape[0] and h.is_contiguous()
            and h.data_ptr() % 16 == 0):
        return _gluon_gemm.gemm_add_sumsq(x, weight, h, ss, eps)
    out = normalized(h, ss, eps) + F.linear(x, weight)
    return out, out.float().square().sum(-1, keepdim=True)
