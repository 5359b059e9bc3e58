"""Rotary position embedding (rotate-half form, HRM's and Llama's) in one pass.

Shapes: ``x``: [batch, seq, heads, head_dim] (any strides with a contiguous last dimension and
heads packed in a row, e.g. the q and k slices of a fused qkv projection), ``cos``/``sin``:
[positions >= seq, head_dim] fp32 tables, or [positions >= seq, head_dim / 2] ones that hold the
half rotate-half RoPE's tables repeat (c1 = c2, s1 = s2; FlashAttention's rotary convention: one
table load per rotated pair instead of two). With ``x = (x1, x2)`` the two halves of head_dim,
``c = (c1, c2)`` and ``s = (s1, s2)`` likewise::

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x2, x1)
        = (x1 c1 - x2 s1,  x2 c2 + x1 s2)                      computed in fp32, stored in x's dtype
    dx  = (d1 c1 + d2 s2,  d2 c2 - d1 s1)                      for d = dout

One read and one write of the rotated heads each way; the eager version materialises the fp32
upcast, the rotated copy (a cat and a negation) and both products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hrm_kernels._utils import cdiv, check_float, check_same, next_power_of_2, warps_for
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch


@triton.jit
def rotate_halves(x1, x2, COS, SIN, t, mask, HALF: tl.constexpr, BACKWARD: tl.constexpr,
                  HALF_TABLES: tl.constexpr):
    """The pairs (x1, x2) (fp32) rotated by the tables at offsets ``t`` of their first halves
    (position * the tables' row stride + j): (x1 c1 - x2 s1, x2 c2 + x1 s2), or its transpose
    (x1 c1 + x2 s2, x2 c2 - x1 s1) when BACKWARD. HALF_TABLES: [positions, HALF] tables (c2 = c1,
    s2 = s1). Shared by every kernel that rotates (``rope``, ``rope_attention``, ``rope_qkv``'s backward)."""
    c1 = tl.load(COS + t, mask=mask, other=0.0)
    s1 = tl.load(SIN + t, mask=mask, other=0.0)
    if HALF_TABLES:
        c2, s2 = c1, s1
    else:
        c2 = tl.load(COS + t + HALF, mask=mask, other=0.0)
        s2 = tl.load(SIN + t + HALF, mask=mask, other=0.0)
    if BACKWARD:
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, n_rows, seq_len, n_cols, stride_x_b, stride_x_s, stride_out, stride_t,
                 HALF: tl.constexpr, BACKWARD: tl.constexpr, HALF_TABLES: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One [BLOCK_M rows (positions), BLOCK_N columns] tile of the first halves; columns run over
    (head, j < HALF) pairs, so each program handles the element pairs (j, j + HALF) of whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    head, j = cols // HALF, cols % HALF
    batch, pos = rows // seq_len, rows % seq_len
    x_off = (batch.to(tl.int64) * stride_x_b + pos.to(tl.int64) * stride_x_s)[:, None] + (head * 2 * HALF + j)[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = rotate_halves(x1, x2, COS, SIN, pos[:, None] * stride_t + j[None, :], mask, HALF, BACKWARD, HALF_TABLES)
    o_off = rows.to(tl.int64)[:, None] * stride_out + (head * 2 * HALF + j)[None, :]
    tl.store(OUT + o_off, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + o_off + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a contiguous last dimension and heads packed within a row (copy otherwise)."""
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x: [B, S, H, Dh] (see ``_rows_view``) -> contiguous [B, S, H, Dh]."""
    batch, seq, heads, head_dim = x.shape
    x = _rows_view(x)
    cos, sin = packed_tables(cos, sin)
    out = torch.empty((batch, seq, heads, head_dim), dtype=x.dtype, device=x.device)
    n_rows, n_cols = batch * seq, heads * head_dim // 2
    if out.numel():
        block_n = min(next_power_of_2(n_cols), 1024)
        block_m = max(1, min(16, 4096 // block_n))
        grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
        launch(_rope_kernel, grid, x, cos, sin, out, n_rows, seq, n_cols, x.stride(0), x.stride(1), heads * head_dim,
               cos.stride(0), HALF=head_dim // 2, BACKWARD=backward, HALF_TABLES=cos.shape[-1] != head_dim,
               BLOCK_M=block_m, BLOCK_N=block_n,
               num_warps=warps_for(block_m * block_n))
    return out


class RopeFunction(torch.autograd.Function):
    """Eager-mode entry (direct launches)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _launch(dout, cos, sin, backward=True), None, None


@torch.library.custom_op("hrm_kernels::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    return _launch(x, cos, sin, backward)


@_rope_op.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.backward = inputs[3]


def _backward(ctx, dout):
    # The rotation is orthogonal: the gradient of either direction is the other direction.
    cos, sin = ctx.saved_tensors
    return torch.ops.hrm_kernels.rope(dout, cos, sin, not ctx.backward), None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def full_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width tables ([positions, head_dim / 2]) repeated to the full width; full ones as they are."""
    if cos.shape[-1] != head_dim:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return cos, sin


def first_halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-width tables [positions, head_dim / 2] of full rotate-half ones (views, no copy):
    exact only for tables that repeat their halves, as RoPE's usual ``cat((freqs, freqs))`` does."""
    half = cos.shape[1] // 2
    return cos[:, :half], sin[:, :half]


def packed_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as the kernels read them: contiguous columns and one row stride for both (a view
    such as ``cos[:, :head_dim // 2]`` is read in place)."""
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HRM's eager math: rotation in cos's dtype (fp32), result in x's dtype; also the CPU fallback."""
    cos, sin = full_tables(cos, sin, x.shape[-1])
    seq = x.shape[1]
    xf = x.to(cos.dtype)
    c, s = cos[:seq].unsqueeze(-2), sin[:seq].unsqueeze(-2)
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)


def check_tables(op: str, x_name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """cos and sin: float32 [positions >= seq, head_dim] or [positions >= seq, head_dim / 2] constant
    tables (no gradient) on x's device, for x [batch, seq, ..., head_dim]."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_same(op, x_name, x, name, t, shape=False, dtype=False)
        if t.dtype != torch.float32 or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a float32 [positions, head_dim (or head_dim / 2)] table, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but the RoPE tables are constants here (no gradient "
                             f"flows to them on any backend); pass {name}.detach()")
    if cos.shape != sin.shape or cos.shape[1] not in (x.shape[-1], x.shape[-1] // 2) or cos.shape[0] < x.shape[1]:
        raise ValueError(f"{op}: cos/sin have shapes {tuple(cos.shape)}/{tuple(sin.shape)} for {x_name} "
                         f"{tuple(x.shape)}; need [positions >= seq, head_dim] or [positions >= seq, head_dim / 2] "
                         "tables")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [batch, seq, heads, head_dim]; cos, sin: [positions, head_dim] (or
    [positions, head_dim / 2], the half the full tables repeat) float32 with positions >= seq (row
    p rotates sequence position p). Returns a contiguous tensor shaped like x in x's dtype;
    gradients flow to x (the tables are constants)."""
    op = "rope"
    check_float("x", x, op)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; need x [batch, seq, heads, head_dim] with an "
                         "even head_dim")
    check_tables(op, "x", x, cos, sin)
    if not use_triton(x.device):
        return rope_reference(x, cos, sin)
    if torch.compiler.is_compiling():
        return torch.ops.hrm_kernels.rope(x, cos, sin, False)
    return RopeFunction.apply(x, cos, sin)
