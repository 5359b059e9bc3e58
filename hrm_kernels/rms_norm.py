"""Fused residual add + RMSNorm: ``y = (x + residual) * rsqrt(mean((x + residual)^2) + eps) * weight``.

HRM's post-norm block computes ``h = rms_norm(h + sublayer(h))`` with no weight; this op does the
add, the fp32 statistics and the cast back in one pass over memory, and the backward in one more.

Shapes: ``x``, ``residual``: [..., N]; ``weight``: [N]; output: [..., N] in ``x.dtype``.

Backward, with ``h = x + residual``, ``r = rsqrt(mean(h^2) + eps)``, ``xhat = h * r`` and
``g = dy * weight``::

    dh = r * (g - xhat * mean(g * xhat))      (dx = dresidual = dh)
    dweight = sum over rows of dy * xhat

Without a weight ``xhat`` is the output itself, so the backward reads ``dy`` and ``y`` and writes
``dh``: 6 passes over [M, N] for forward + backward (Apex's "memory-efficient" choice: ``xhat``
carries the output's rounding, which is below the final rounding of ``dh`` except where the
projection cancels almost everything, i.e. at widths of a few elements). With a weight it recomputes ``xhat`` from
``x`` and ``residual``; ``dweight`` is reduced in fp32, one partial row per program, then summed.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hrm_kernels._utils import as_rows, cdiv, check_float, check_same, num_programs_for, row_tile, warps_for
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch

MAX_WIDTH = 65536


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_forward_kernel(
    X, R, W, Y, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    y = h * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, SRC, R, W, RSTD, DH, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_src, stride_r, stride_dh,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # SRC is the output y when there is no weight (y == xhat), else the input x (xhat recomputed).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.load(SRC + rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            if HAS_RESIDUAL:
                xhat += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat = xhat * rstd[:, None]
            g = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
        else:
            g = dy
        c = tl.sum(g * xhat, axis=1) / n_cols
        dh = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


# --------------------------------------------------------------------------------- launchers


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    block_m, block_n = row_tile(n_cols, elements_per_tile=4096 if n_cols <= 1024 else 8192)
    return block_m, block_n, warps_for(block_m * block_n)


def rms_norm_forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [M, N] (last dim contiguous); weight: [N]. Returns y [M, N], rstd [M] fp32."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_m, block_n, num_warps = _launch_config(n_cols)
    launch(_rms_norm_forward_kernel, (cdiv(n_rows, block_m),),
        x, residual if residual is not None else x, weight if weight is not None else x, y, rstd,
        n_rows, n_cols, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, src: torch.Tensor, residual: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], rstd: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (dh [M, N] in dy's dtype, dweight [N] in weight's dtype or None).
    ``src`` is y when ``weight`` is None, else x."""
    n_rows, n_cols = dy.shape
    dh = torch.empty((n_rows, n_cols), dtype=src.dtype, device=dy.device)
    block_m, block_n, num_warps = _launch_config(n_cols)
    n_blocks = cdiv(n_rows, block_m)
    if weight is not None:  # persistent grid: one fp32 dweight partial row per program
        n_programs = max(1, min(n_blocks, 2 * num_programs_for(dy.device.type, dy.device.index)))
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=dy.device)
    else:
        n_programs, dw_partial = n_blocks, dh
    if n_rows > 0:
        launch(_rms_norm_backward_kernel, (n_programs,),
            dy, src, residual if residual is not None else src, weight if weight is not None else src,
            rstd, dh, dw_partial,
            n_rows, n_cols, dy.stride(0), src.stride(0),
            residual.stride(0) if residual is not None else 0, dh.stride(0),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    if weight is None:
        return dh, None
    if n_rows == 0:
        return dh, torch.zeros_like(weight)
    return dh, dw_partial.sum(0).to(weight.dtype)


# ------------------------------------------------- autograd.Function and torch.library registration


def _saved_for_backward(x, residual, weight, y, rstd):
    """Without a weight the output is xhat: keep y. With one, keep the inputs to recompute it."""
    return (y, None, None, rstd) if weight is None else (x, residual, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    """Eager-mode entry: launches the kernels directly (a custom op's dispatch costs more host
    time than the kernel at HRM's sizes)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, rstd = rms_norm_forward(x, residual, weight, eps)
        ctx.save_for_backward(*_saved_for_backward(x, residual, weight, y, rstd))
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients carry no graph
    def backward(ctx, dy):
        src, residual, weight, rstd = ctx.saved_tensors
        dh, dw = rms_norm_backward(dy.contiguous(), src, residual, weight, rstd)
        return dh, (dh if ctx.has_residual else None), dw, None


@torch.library.custom_op("hrm_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, residual, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("hrm_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, src: torch.Tensor, residual: Optional[torch.Tensor],
                     weight: Optional[torch.Tensor], rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dh, dw = rms_norm_backward(dy, src, residual, weight, rstd)
    return dh, dw if dw is not None else dh.new_empty(0)


@_rms_norm_bwd_op.register_fake
def _(dy, src, residual, weight, rstd):
    return torch.empty_like(src), (torch.empty_like(weight) if weight is not None else src.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.save_for_backward(*_saved_for_backward(x, residual, weight, *output))
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _drstd):
    src, residual, weight, rstd = ctx.saved_tensors
    dh, dw = torch.ops.hrm_kernels.rms_norm_bwd(dy.contiguous(), src, residual, weight, rstd)
    return dh, (dh if ctx.has_residual else None), (dw if weight is not None else None), None


# Under torch.compile the op is one opaque node of the graph, forward and backward.
_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- reference and API


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                       residual: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """HRM's eager math: the add in the input dtype, statistics in fp32 (or float64 for float64
    inputs), the result cast back to ``x.dtype``. Also the CPU fallback. (The Triton kernel adds in
    fp32, one rounding fewer: in bf16 the two backends agree to about one ulp, not bit for bit.)"""
    h = x if residual is None else x + residual
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf = h.to(compute)
    y = hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
             residual: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``rmsnorm(x + residual) * weight`` over the last dimension, fp32 statistics, result in
    ``x.dtype``. ``x``, ``residual``: [..., N] of the same shape and dtype; ``weight``: [N] (any
    float dtype). Differentiable in all three."""
    op = "rms_norm"
    check_float("x", x, op)
    if residual is not None:
        check_float("residual", residual, op)
        check_same(op, "x", x, "residual", residual)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    n = x.shape[-1]
    if weight is not None:
        check_float("weight", weight, op)
        check_same(op, "x", x, "weight", weight, shape=False, dtype=False)
        if weight.shape != (n,):
            raise ValueError(f"{op}: weight has shape {tuple(weight.shape)} but x has shape "
                             f"{tuple(x.shape)}; weight must be [{n}] (the last dimension of x)")
    if not use_triton(x.device):
        return rms_norm_reference(x, weight, residual=residual, eps=eps)
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(f"{op}: last dimension {n} of x {tuple(x.shape)} is outside the fused "
                         f"kernel's range 1..{MAX_WIDTH}; use hrm_kernels.use_backend('eager')")
    x2 = as_rows(x, n)
    r2 = as_rows(residual, n) if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    if torch.compiler.is_compiling():
        y, _ = torch.ops.hrm_kernels.rms_norm_fwd(x2, r2, w, float(eps))
    else:
        y = RMSNormFunction.apply(x2, r2, w, float(eps))
    return y.view(x.shape)
