"""RoPE on the q and k of a fused qkv projection, with a backward that writes the qkv gradient in
one pass.

Shapes: ``qkv``: [batch, seq, 3 * heads, head_dim] (q, k, v heads stacked on dim 2), ``cos``/``sin``:
[positions >= seq, head_dim] or [positions >= seq, head_dim / 2] fp32 tables (``hrm_kernels.rope``).
Returns ``(q', k', v)``, each [batch, seq, heads, head_dim]: ``q', k' = rope(q), rope(k)``
(``hrm_kernels.rope``'s math, one launch for both) and
``v`` a view of qkv. Backward, for the three incoming gradients (any strides, as attention's
backward returns them)::

    dqkv = [rope_backward(dq) | rope_backward(dk) | dv]        one kernel, [batch, seq, 3 * heads, head_dim]

Slicing q and k out of qkv and rotating them with autograd's own views costs, per attention
backward, a concatenation of dq and dk, a zero-filled qkv-sized gradient for the slice, another
for the split that gives v, and their sum: about five qkv-sized passes that this op replaces.
Under torch.compile (and on the eager backend) it is the plain composition, which Inductor fuses.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hrm_kernels._utils import cdiv, check_float, next_power_of_2
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch
from hrm_kernels.rope import _launch as _rope_launch
from hrm_kernels.rope import check_tables, packed_tables, rotate_halves, rope_reference


@triton.jit
def _rope_qkv_grad_kernel(DQ, DK, DV, COS, SIN, DQKV, n_rows, seq_len, n_heads,
                          sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, stride_t,
                          HALF: tl.constexpr, HALF_P: tl.constexpr, HALF_TABLES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (row block, section * heads + head): one head's [BLOCK_M, head_dim] slice of dqkv
    from dq (section 0) or dk (1), rotated back, or from dv (2), copied."""
    head_col = tl.program_id(1)
    section, head = head_col // n_heads, head_col % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HALF_P)
    mask = (rows < n_rows)[:, None] & (d < HALF)[None, :]
    batch, pos = (rows // seq_len).to(tl.int64), (rows % seq_len).to(tl.int64)
    if section == 0:
        src = DQ + (batch * sq_b + pos * sq_s + head * sq_h)[:, None] + d[None, :]
    elif section == 1:
        src = DK + (batch * sk_b + pos * sk_s + head * sk_h)[:, None] + d[None, :]
    else:
        src = DV + (batch * sv_b + pos * sv_s + head * sv_h)[:, None] + d[None, :]
    # fp32 from the load on: a variable keeps one type across the run-time branch below
    g1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if section < 2:  # the rotation's transpose
        g1, g2 = rotate_halves(g1, g2, COS, SIN, pos[:, None] * stride_t + d[None, :], mask, HALF, True, HALF_TABLES)
    out = DQKV + rows.to(tl.int64)[:, None] * (3 * n_heads * 2 * HALF) + (head_col * 2 * HALF + d)[None, :]
    tl.store(out, g1.to(DQKV.dtype.element_ty), mask=mask)
    tl.store(out + HALF, g2.to(DQKV.dtype.element_ty), mask=mask)


def _grad_launch(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    batch, seq, heads, head_dim = dv.shape
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    cos, sin = packed_tables(cos, sin)
    dqkv = torch.empty((batch, seq, 3 * heads, head_dim), dtype=dv.dtype, device=dv.device)
    n_rows = batch * seq
    if dqkv.numel():
        half = head_dim // 2
        half_p = next_power_of_2(half)
        block_m = max(1, min(64, 4096 // half_p)) if dv.is_cuda else 16
        launch(_rope_qkv_grad_kernel, (cdiv(n_rows, block_m), 3 * heads),
               dq, dk, dv, cos, sin, dqkv, n_rows, seq, heads, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
               cos.stride(0), HALF=half, HALF_P=half_p, HALF_TABLES=cos.shape[-1] != head_dim, BLOCK_M=block_m,
               num_warps=4)
    return dqkv


class RopeQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        heads = qkv.shape[2] // 3
        ctx.save_for_backward(cos, sin)
        ctx.dtype = qkv.dtype
        qk = _rope_launch(qkv[:, :, :2 * heads], cos, sin, backward=False)
        q, k = qk.split(heads, dim=2)
        return q, k, qkv[:, :, 2 * heads:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros (autograd's default)
        return _grad_launch(dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), cos, sin), None, None


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The plain composition (split, ``rope_reference`` on q and k); also the fallback."""
    q, k, v = qkv.split(qkv.shape[2] // 3, dim=2)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(rope(q), rope(k), v)`` from qkv [batch, seq, 3 * heads, head_dim] (a strided last
    dimension is copied first); cos, sin: [positions >= seq, head_dim] (or head_dim / 2, see
    ``hrm_kernels.rope``) float32. Gradients flow to qkv, written in one pass (see the module docstring)."""
    op = "rope_qkv"
    check_float("qkv", qkv, op)
    if qkv.dim() != 4 or qkv.shape[2] % 3 or qkv.shape[-1] % 2:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}; need [batch, seq, 3 * heads, head_dim] with an "
                         "even head_dim (q, k and v heads stacked on dim 2)")
    check_tables(op, "qkv", qkv, cos, sin)
    if not use_triton(qkv.device) or torch.compiler.is_compiling():
        return rope_qkv_reference(qkv, cos, sin)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return RopeQKVFunction.apply(qkv, cos, sin)
