"""The ungated reasoning module's input from states whose RMSNorm is still pending.

A chain of post-norm blocks run with ``hrm_kernels.deferred_norm`` ends in a state ``(h, ss)``
whose value is ``rms_norm(h)`` (``ss`` [M, T] fp32: partial sums of squares of h's rows). Closing
it takes a pass of its own (read h, write the normalized rows) before the next module adds it to
its other inputs. Here the norm is applied as the module input's sum reads the rows::

    n(x, ss) = round(x * rsqrt(sum(ss) / D + eps))      (x itself when ss is None)
    out      = n(a, a_ss) + round(n(b, b_ss) + c)       (c given: add3's rounding)
    out      = n(a, a_ss) + n(b, b_ss)                  (c None: H's own + other)

``round``: to the inputs' dtype; the sums and the scale in fp32. ``n`` is
``deferred_norm.normalized``: the normalized rows are rounded as the closing pass would write them,
so the module input is the one the unfused code makes (up to the scale's fp32 rounding).

Shapes: ``a``, ``b``, ``c``: [..., D], one shape and dtype; ``a_ss``, ``b_ss``: [rows, T] fp32 ->
[..., D] in the inputs' dtype. Gradients: ``d a = d b = d c = d out`` for inputs without a pending
norm; an input with one must not require grad (the carried states never do).

Traffic: the same as ``add3`` (read three tensors, write one) plus the tiny ``ss``; the closing
passes it replaces read and wrote two tensors each.

Internal to the deferred-norm path, like ``deferred_norm`` (not exported, not a ``torch.library``
op): pending norms exist only outside torch.compile, and under it this is the reference's code.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from hrm_kernels._math import cast
from hrm_kernels._utils import cdiv, check_float, check_same
from hrm_kernels.backend import triton_interpreting, use_triton
from hrm_kernels.deferred_norm import normalized
from hrm_kernels.precompile import launch

ROWS_PER_PROGRAM = 8
MAX_WIDTH = 8192  # a program holds whole rows


@triton.jit
def _normalized_rows(X, SS, offs, rows, row_mask, mask, T, width, eps, NORM: tl.constexpr,
                     BLOCK_T: tl.constexpr, EMU_BF16: tl.constexpr):
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        t = tl.arange(0, BLOCK_T)
        ss = tl.load(SS + rows.to(tl.int64)[:, None] * T + t[None, :], mask=row_mask[:, None] & (t < T)[None, :],
                     other=0.0)
        scale = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=1) / width + eps)
        x = cast(x * scale[:, None], X.dtype.element_ty, EMU_BF16).to(tl.float32)
    return x


@triton.jit
def _normed_add_kernel(A, B, C, A_SS, B_SS, OUT, M, D, T_A, T_B, eps,
                       NORM_A: tl.constexpr, NORM_B: tl.constexpr, HAS_C: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TA: tl.constexpr, BLOCK_TB: tl.constexpr,
                       EMU_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dtype = OUT.dtype.element_ty
    a = _normalized_rows(A, A_SS, offs, rows, row_mask, mask, T_A, D, eps, NORM_A, BLOCK_TA, EMU_BF16)
    b = _normalized_rows(B, B_SS, offs, rows, row_mask, mask, T_B, D, eps, NORM_B, BLOCK_TB, EMU_BF16)
    if HAS_C:
        b = cast(b + tl.load(C + offs, mask=mask, other=0.0).to(tl.float32), dtype, EMU_BF16).to(tl.float32)
    tl.store(OUT + offs, cast(a + b, dtype, EMU_BF16), mask=mask)


def normed_add_forward(a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor], a_ss: Optional[torch.Tensor],
                       b_ss: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The kernel on contiguous copies (only where a layout needs one)."""
    D = a.shape[-1]
    a, b = a.contiguous(), b.contiguous()
    c = c.contiguous() if c is not None else None
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    M = a.numel() // D if D else 0
    if M == 0 or D == 0:
        return out
    # partial sums (a pointer the kernel does not read where there are none) and their column counts
    (a_ss, t_a), (b_ss, t_b) = ((out, 1) if ss is None else (ss.contiguous(), ss.shape[1]) for ss in (a_ss, b_ss))
    launch(_normed_add_kernel, (cdiv(M, ROWS_PER_PROGRAM),), a, b, c if c is not None else a, a_ss, b_ss, out,
           M, D, t_a, t_b, float(eps), NORM_A=a_ss is not out, NORM_B=b_ss is not out, HAS_C=c is not None,
           BLOCK_M=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(D), BLOCK_TA=triton.next_power_of_2(t_a),
           BLOCK_TB=triton.next_power_of_2(t_b), EMU_BF16=triton_interpreting() and a.dtype == torch.bfloat16,
           num_warps=4)
    return out


class NormedAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, a_ss, b_ss, eps):
        ctx.pending = (a_ss is not None, b_ss is not None, c is not None)
        return normed_add_forward(a, b, c, a_ss, b_ss, eps)

    @staticmethod
    def backward(ctx, dout):
        norm_a, norm_b, has_c = ctx.pending
        return (None if norm_a else dout, None if norm_b else dout, dout if has_c else None, None, None, None)


def normed_add_reference(a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor] = None, *,
                         a_ss: Optional[torch.Tensor] = None, b_ss: Optional[torch.Tensor] = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """The unfused code: each pending norm closed (rounded to the dtype), then the eager adds."""
    a, b = (x if ss is None else normalized(x.reshape(ss.shape[0], x.shape[-1]), ss, eps).view(x.shape)
            for x, ss in ((a, a_ss), (b, b_ss)))
    return a + b if c is None else a + (b + c)


def _check(a, b, c, a_ss, b_ss, eps) -> None:
    op = "normed_add"
    check_float("a", a, op)
    for name, t in (("b", b), ("c", c)):
        if t is not None:
            check_float(name, t, op)
            check_same(op, "a", a, name, t)
    rows = math.prod(a.shape[:-1]) if a.dim() else 1
    for name, ss, x in (("a_ss", a_ss, a), ("b_ss", b_ss, b)):
        if ss is None:
            continue
        if not (isinstance(ss, torch.Tensor) and ss.dtype == torch.float32 and ss.dim() == 2 and ss.shape[0] == rows
                and ss.shape[1] >= 1 and ss.device == a.device):
            raise ValueError(f"{op}: {name} must be fp32 [{rows}, T >= 1] partial sums of squares of {name[0]}'s rows on "
                             f"{a.device}, got " + (f"{ss.dtype} {tuple(ss.shape)} on {ss.device}"
                                                   if isinstance(ss, torch.Tensor) else type(ss).__name__))
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{op}: {name[0]} has a pending norm and requires grad; the pending norm has no "
                               f"gradient here: pass {name[0]}.detach(), or close the norm first "
                               "(deferred_norm.normalized)")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")


def normed_add(a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor] = None, *,
               a_ss: Optional[torch.Tensor] = None, b_ss: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """``n(a) + round(n(b) + c)`` (``n(a) + n(b)`` without ``c``), ``n`` closing a pending RMS norm
    from its partial sums of squares (module docstring); one kernel on CUDA."""
    _check(a, b, c, a_ss, b_ss, eps)
    if (not use_triton(a.device) or torch.compiler.is_compiling()
            or (a.dim() and a.shape[-1] > MAX_WIDTH) or a.dim() == 0):
        return normed_add_reference(a, b, c, a_ss=a_ss, b_ss=b_ss, eps=eps)
    return NormedAddFunction.apply(a, b, c, a_ss, b_ss, eps)
