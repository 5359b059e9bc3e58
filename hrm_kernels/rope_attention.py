"""Bidirectional attention straight from a fused qkv projection, with the rotary embedding applied
to q and k as they are loaded: one kernel for what is otherwise a RoPE pass over q and k (one read
and one write of both) followed by the attention kernel.

Shapes: ``qkv``: [batch, seq, 3 * heads, head_dim] (q heads, then k heads, then v heads, as the
view of a ``[.., 3 * hidden]`` projection), ``cos``/``sin``: [positions >= seq, head_dim] fp32
tables or both ``None`` (no rotation). Result: [batch, seq, heads, head_dim] in qkv's dtype::

    q', k' = rope(q), rope(k)                 rotation in fp32, rounded to qkv's dtype (hrm_kernels.rope)
    out    = softmax(q' k'^T / sqrt(head_dim)) v      per batch and head; no mask, no dropout

The kernel is flash-attention's forward: each program owns BLOCK_M queries of one (batch, head)
and walks the keys BLOCK_N at a time with an online softmax. Rotating a tile needs the halves
(x1, x2) of head_dim, so q and k are loaded as two half-width tiles and the score is
``q1' k1'^T + q2' k2'^T``. It runs sequences up to ``MAX_FUSED_SEQ`` (HRM's Sudoku: 82 tokens).

Gradients: when one is needed (``qkv.requires_grad`` under grad mode), under torch.compile, and for
sequences longer than ``MAX_FUSED_SEQ``, the op runs as ``hrm_kernels.rope`` + ``F.scaled_dot_product_attention`` (whose backward is cuDNN's or
FlashAttention's), the same math; the kernel is the no-gradient forward, which is most of an HRM
segment (all but its last L and H steps, the whole continue-target pass, all of evaluation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hrm_kernels._utils import check_float
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch
from hrm_kernels.rope import check_tables, rope, rotate_halves
from hrm_kernels.rope_qkv import rope_qkv_reference


@triton.jit
def _load_rotated(base, rows, row_ok, stride_s, col0, COS, SIN, d, d_ok, HALF: tl.constexpr,
                  ROPE: tl.constexpr):
    """The two halves [len(rows), HALF_P] of one head's vectors at sequence positions ``rows``,
    rotated (fp32 math, rounded back to the input dtype) when ROPE."""
    mask = row_ok[:, None] & d_ok[None, :]
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + (col0 + d)[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    if ROPE:
        r1, r2 = rotate_halves(x1.to(tl.float32), x2.to(tl.float32), COS, SIN, rows[:, None] * (2 * HALF) + d[None, :],
                               mask, HALF, False)
        x1, x2 = r1.to(x1.dtype), r2.to(x2.dtype)
    return x1, x2


@triton.jit
def _rope_attention_kernel(QKV, COS, SIN, OUT, seq_len, n_heads, stride_b, stride_s, stride_ob, stride_os,
                           qk_scale, HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_P: tl.constexpr,
                           ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """Program (batch * head, query block). ``qk_scale`` = log2(e) / sqrt(head_dim): the softmax runs
    in base 2. HALF_P, HEAD_P: HALF and 2 * HALF rounded up to a power of two >= 16 (tl.dot)."""
    bh = tl.program_id(0)
    batch, head = bh // n_heads, bh % n_heads
    base = QKV + batch.to(tl.int64) * stride_b
    head_dim = 2 * HALF
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    dv = tl.arange(0, HEAD_P)
    dv_ok = dv < head_dim

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q1, q2 = _load_rotated(base, rows, row_ok, stride_s, head * head_dim, COS, SIN, d, d_ok, HALF, ROPE)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_P), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        k1, k2 = _load_rotated(base, keys, key_ok, stride_s, (n_heads + head) * head_dim, COS, SIN, d, d_ok,
                               HALF, ROPE)
        s = tl.dot(q1, tl.trans(k1), input_precision=INPUT_PRECISION)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=INPUT_PRECISION)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = base + keys.to(tl.int64)[:, None] * stride_s + ((2 * n_heads + head) * head_dim + dv)[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = OUT + batch.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_os + (head * head_dim + dv)[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


# Sequences up to this length run in the kernel; longer ones run as hrm_kernels.rope + SDPA, which
# at HRM's ARC length (901) was 2x faster than this kernel on an H100 (benchmarks/RESULTS.md).
MAX_FUSED_SEQ = 128
# (BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA; see benchmarks/bench_rope_attention.py --sweep.
# Small key tiles win at HRM's Sudoku shape (82 tokens): a [128, 128] score tile leaves one
# program per SM (registers), and a one-tile version that issues every load up front was slower.
CUDA_CONFIG = (128, 32, 4, 1)


def _launch(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    if qkv.stride(-1) != 1 or qkv.stride(-2) != head_dim:
        qkv = qkv.contiguous()
    out = torch.empty((batch, seq, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out
    if qkv.is_cuda:
        block_m, block_n, num_warps, num_stages = CUDA_CONFIG
    else:  # the interpreter: small tiles keep it quick
        block_m, block_n, num_warps, num_stages = 16, 16, 4, 1
    block_m = min(block_m, max(16, triton.next_power_of_2(seq)))
    block_n = min(block_n, max(16, triton.next_power_of_2(seq)))
    half = head_dim // 2
    rotate = cos is not None
    grid = (batch * heads, triton.cdiv(seq, block_m))
    launch(_rope_attention_kernel, grid, qkv, cos if rotate else qkv, sin if rotate else qkv, out, seq, heads,
           qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), math.log2(math.e) / math.sqrt(head_dim),
           HALF=half, HALF_P=max(16, triton.next_power_of_2(half)), HEAD_P=max(16, triton.next_power_of_2(head_dim)),
           ROPE=rotate, BLOCK_M=block_m, BLOCK_N=block_n,
           INPUT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
           num_warps=num_warps, num_stages=num_stages)
    return out


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.split(qkv.shape[2] // 3, dim=2)


def rope_attention_reference(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    """HRM's eager math (``rope_reference`` on q and k, then ``F.scaled_dot_product_attention``); also
    the CPU fallback. Same shapes and dtypes as ``rope_attention``."""
    q, k, v = _split(qkv) if cos is None else rope_qkv_reference(qkv, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _composed(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    """The differentiable path: ``hrm_kernels.rope`` over q and k in one strided pass, then SDPA."""
    heads = qkv.shape[2] // 3
    q, k, v = _split(qkv)
    if cos is not None:
        q, k = rope(qkv[:, :, :2 * heads], cos, sin).split(heads, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def rope_attention(qkv: torch.Tensor, cos: Optional[torch.Tensor] = None,
                   sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary embedding on q and k, then bidirectional softmax attention (scale 1/sqrt(head_dim)).

    qkv: [batch, seq, 3 * heads, head_dim] with a contiguous last dimension (q, k, v heads in that
    order); cos, sin: [positions >= seq, head_dim] float32 tables, or both None for no rotation.
    Returns [batch, seq, heads, head_dim] in qkv's dtype. Gradients flow to qkv (through rope + SDPA;
    see the module docstring).
    """
    op = "rope_attention"
    check_float("qkv", qkv, op)
    if qkv.dim() != 4 or qkv.shape[2] % 3 or qkv.shape[-1] % 2:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}; need [batch, seq, 3 * heads, head_dim] "
                         "with an even head_dim (q, k and v heads stacked on dim 2)")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin, or neither (no rotation)")
    if cos is not None:
        check_tables(op, "qkv", qkv, cos, sin)
        cos, sin = cos.contiguous(), sin.contiguous()
    if not use_triton(qkv.device):
        return rope_attention_reference(qkv, cos, sin)
    if ((torch.is_grad_enabled() and qkv.requires_grad) or torch.compiler.is_compiling()
            or qkv.shape[1] > MAX_FUSED_SEQ):
        return _composed(qkv, cos, sin)
    return _launch(qkv, cos, sin)
