"""Bidirectional attention straight from a fused qkv projection, with the rotary embedding applied
to q and k as they are loaded: one kernel for what is otherwise a RoPE pass over q and k (one read
and one write of both) followed by the attention kernel.

Shapes: ``qkv``: [batch, seq, 3 * heads, head_dim] (q heads, then k heads, then v heads, as the
view of a ``[.., 3 * hidden]`` projection), ``cos``/``sin``: [positions >= seq, head_dim] fp32
tables, or [positions >= seq, head_dim / 2] ones holding the half that rotate-half RoPE repeats
(what ``hrm.layers.Attention`` passes: one table load per rotated pair instead of two), or both
``None`` (no rotation). Result: [batch, seq, heads, head_dim] in qkv's dtype::

    q', k' = rope(q), rope(k)                 rotation in fp32, rounded to qkv's dtype (hrm_kernels.rope)
    out    = softmax(q' k'^T / sqrt(head_dim)) v      per batch and head; no mask, no dropout

The kernel is flash-attention's forward: each program owns BLOCK_M queries of one (batch, head)
and walks the keys BLOCK_N at a time with an online softmax. Rotating a tile needs the halves
(x1, x2) of head_dim, so q and k are loaded as two half-width tiles and the score is
``q1' k1'^T + q2' k2'^T``. It runs sequences up to ``MAX_FUSED_SEQ`` (HRM's Sudoku: 82 tokens).

Gradients (``qkv.requires_grad`` under grad mode), for sequences up to ``MAX_FUSED_SEQ``: the
forward kernel also writes each query's log-sum-exp, and one backward kernel per (batch, head)
holds every query at once (one query block), walks the keys BLOCK_N at a time and writes the
whole qkv gradient, RoPE's transpose applied to dq and dk, with no atomics (FlashAttention-2's
backward with a single query block)::

    p  = softmax(s)                     recomputed from q', k' and the saved log-sum-exp
    dv = p^T do;   dp = do v^T;   ds = p * (dp - rowsum(do * out))
    dq = rope^T(ds k' / sqrt(head_dim));   dk = rope^T(ds^T q' / sqrt(head_dim))

Under torch.compile and for longer sequences the op runs as
``hrm_kernels.rope_qkv`` + ``F.scaled_dot_product_attention`` (cuDNN's or FlashAttention's
backward), the same math. On Hopper, longer sequences without a gradient and without tables (q and
k rotated by the qkv matmul) run ``hrm_kernels._gluon_attention`` instead of SDPA
(``USE_GLUON_LONG``); with a gradient its forward keeps the log-sum-exp for cuDNN's backward
(``USE_GLUON_LONG_GRAD``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hrm_kernels import _gluon_attention, _gluon_rope_attention
from hrm_kernels._utils import cdiv, check_float, next_power_of_2
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch
from hrm_kernels.rope import check_tables, packed_tables, rotate_halves
from hrm_kernels.rope_qkv import rope_qkv, rope_qkv_reference


@triton.jit
def _load_rotated(base, rows, row_ok, stride_s, col0, COS, SIN, stride_t, d, d_ok, HALF: tl.constexpr,
                  ROPE: tl.constexpr, HALF_TABLES: tl.constexpr):
    """The two halves [len(rows), HALF_P] of one head's vectors at sequence positions ``rows``,
    rotated (fp32 math, rounded back to the input dtype) when ROPE."""
    mask = row_ok[:, None] & d_ok[None, :]
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + (col0 + d)[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    if ROPE:
        r1, r2 = rotate_halves(x1.to(tl.float32), x2.to(tl.float32), COS, SIN, rows[:, None] * stride_t + d[None, :],
                               mask, HALF, False, HALF_TABLES)
        x1, x2 = r1.to(x1.dtype), r2.to(x2.dtype)
    return x1, x2


@triton.jit
def _head_columns(bh, n_heads, HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_P: tl.constexpr):
    """(batch, head) of the flat index ``bh`` = batch * n_heads + head, and the column ranges of a
    half (d, d_ok) and of a whole head (dv, dv_ok), padded to the powers of two tl.dot needs."""
    d = tl.arange(0, HALF_P)
    dv = tl.arange(0, HEAD_P)
    return bh // n_heads, bh % n_heads, d, d < HALF, dv, dv < 2 * HALF


@triton.jit
def _rope_attention_kernel(QKV, COS, SIN, OUT, LSE, seq_len, n_heads, stride_b, stride_s, stride_ob, stride_os,
                           stride_t, qk_scale, HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_P: tl.constexpr,
                           ROPE: tl.constexpr, HALF_TABLES: tl.constexpr, STORE_LSE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, JOIN_HALVES: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """Program (batch * head) * query blocks + query block: the query blocks of one head run side by
    side, so its keys and values are read from L2 after the first. ``qk_scale`` = log2(e) /
    sqrt(head_dim): the softmax runs in base 2. HALF_P, HEAD_P: HALF and 2 * HALF rounded up to a
    power of two >= 16 (tl.dot). STORE_LSE: also write each query's log2-sum-exp2 of its scaled
    scores to LSE [batch * heads, seq] (fp32), what the backward recomputes the probabilities from.
    JOIN_HALVES: q.k over the halves interleaved into one operand, as in the backward. ``stride_t``:
    the tables' row stride; HALF_TABLES: they are [positions, HALF] (``rotate_halves``). Each key
    block's values are loaded before its scores are computed, so their latency hides behind the dot
    and the softmax (H100, Sudoku shape: 154.6 against 161.7 us)."""
    query_blocks = tl.cdiv(seq_len, BLOCK_M)
    bh = tl.program_id(0) // query_blocks
    batch, head, d, d_ok, dv, dv_ok = _head_columns(bh, n_heads, HALF, HALF_P, HEAD_P)
    base = QKV + batch.to(tl.int64) * stride_b
    head_dim = 2 * HALF

    rows = (tl.program_id(0) % query_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q1, q2 = _load_rotated(base, rows, row_ok, stride_s, head * head_dim, COS, SIN, stride_t, d, d_ok, HALF, ROPE,
                           HALF_TABLES)
    if JOIN_HALVES:
        q = tl.reshape(tl.join(q1, q2), (BLOCK_M, 2 * HALF_P))

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_P), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        k1, k2 = _load_rotated(base, keys, key_ok, stride_s, (n_heads + head) * head_dim, COS, SIN, stride_t, d,
                               d_ok, HALF, ROPE, HALF_TABLES)
        v_ptrs = base + keys.to(tl.int64)[:, None] * stride_s + ((2 * n_heads + head) * head_dim + dv)[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)  # issued before the scores' dot
        if JOIN_HALVES:
            s = tl.dot(q, tl.trans(tl.reshape(tl.join(k1, k2), (BLOCK_N, 2 * HALF_P))), input_precision=INPUT_PRECISION)
        else:
            s = tl.dot(q1, tl.trans(k1), input_precision=INPUT_PRECISION)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=INPUT_PRECISION)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = OUT + batch.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_os + (head * head_dim + dv)[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    if STORE_LSE:
        tl.store(LSE + bh.to(tl.int64) * seq_len + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _rope_attention_backward_kernel(QKV, COS, SIN, OUT, DOUT, LSE, DQKV, seq_len, n_heads, stride_b, stride_s,
                                    stride_ob, stride_os, stride_gb, stride_gs, stride_db, stride_ds, stride_t,
                                    qk_scale, sm_scale, HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_P: tl.constexpr,
                                    ROPE: tl.constexpr, HALF_TABLES: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, JOIN_HALVES: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Program (batch * head): every query of the sequence in one [BLOCK_M >= seq_len] block; the keys
    BLOCK_N at a time. Writes dq, dk, dv of this head into DQKV ([batch, seq, 3 * heads, head_dim]
    layout), dq and dk rotated back. ``sm_scale`` = 1 / sqrt(head_dim). JOIN_HALVES: the products over
    head_dim run on the halves interleaved into one [.., 2 * HALF_P] operand (a dot product does not
    depend on the order of its terms, as long as both sides use the same one) instead of one dot per half."""
    bh = tl.program_id(0)
    batch, head, d, d_ok, dv, dv_ok = _head_columns(bh, n_heads, HALF, HALF_P, HEAD_P)
    base = QKV + batch.to(tl.int64) * stride_b
    grad_base = DQKV + batch.to(tl.int64) * stride_db
    head_dim = 2 * HALF

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    q1, q2 = _load_rotated(base, rows, row_ok, stride_s, head * head_dim, COS, SIN, stride_t, d, d_ok, HALF, ROPE,
                           HALF_TABLES)
    row_mask = row_ok[:, None] & dv_ok[None, :]
    o = tl.load(OUT + batch.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_os
                + (head * head_dim + dv)[None, :], mask=row_mask, other=0.0)
    do = tl.load(DOUT + batch.to(tl.int64) * stride_gb + rows.to(tl.int64)[:, None] * stride_gs
                 + (head * head_dim + dv)[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(do * out) = rowsum(p * dp)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + rows, mask=row_ok, other=0.0)

    dq1 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    if JOIN_HALVES:
        q = tl.reshape(tl.join(q1, q2), (BLOCK_M, 2 * HALF_P))
        dq = tl.zeros((BLOCK_M, 2 * HALF_P), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < seq_len
        k1, k2 = _load_rotated(base, keys, key_ok, stride_s, (n_heads + head) * head_dim, COS, SIN, stride_t, d,
                               d_ok, HALF, ROPE, HALF_TABLES)
        v_mask = key_ok[:, None] & dv_ok[None, :]
        v = tl.load(base + keys.to(tl.int64)[:, None] * stride_s + ((2 * n_heads + head) * head_dim + dv)[None, :],
                    mask=v_mask, other=0.0)
        if JOIN_HALVES:
            k = tl.reshape(tl.join(k1, k2), (BLOCK_N, 2 * HALF_P))
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        else:
            s = tl.dot(q1, tl.trans(k1), input_precision=INPUT_PRECISION)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=INPUT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        grad_v = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q1.dtype)
        if JOIN_HALVES:
            dq = tl.dot(ds, k, dq, input_precision=INPUT_PRECISION)
            dk1, dk2 = tl.split(tl.reshape(tl.dot(tl.trans(ds), q, input_precision=INPUT_PRECISION) * sm_scale,
                                           (BLOCK_N, HALF_P, 2)))
        else:
            dq1 = tl.dot(ds, k1, dq1, input_precision=INPUT_PRECISION)
            dq2 = tl.dot(ds, k2, dq2, input_precision=INPUT_PRECISION)
            dk1 = tl.dot(tl.trans(ds), q1, input_precision=INPUT_PRECISION) * sm_scale
            dk2 = tl.dot(tl.trans(ds), q2, input_precision=INPUT_PRECISION) * sm_scale
        k_mask = key_ok[:, None] & d_ok[None, :]
        if ROPE:
            dk1, dk2 = rotate_halves(dk1, dk2, COS, SIN, keys[:, None] * stride_t + d[None, :], k_mask, HALF, True,
                                     HALF_TABLES)
        k_ptrs = grad_base + keys.to(tl.int64)[:, None] * stride_ds + ((n_heads + head) * head_dim + d)[None, :]
        tl.store(k_ptrs, dk1.to(DQKV.dtype.element_ty), mask=k_mask)
        tl.store(k_ptrs + HALF, dk2.to(DQKV.dtype.element_ty), mask=k_mask)
        tl.store(grad_base + keys.to(tl.int64)[:, None] * stride_ds + ((2 * n_heads + head) * head_dim + dv)[None, :],
                 grad_v.to(DQKV.dtype.element_ty), mask=v_mask)

    if JOIN_HALVES:
        dq1, dq2 = tl.split(tl.reshape(dq, (BLOCK_M, HALF_P, 2)))
    dq1, dq2 = dq1 * sm_scale, dq2 * sm_scale
    q_mask = row_ok[:, None] & d_ok[None, :]
    if ROPE:
        dq1, dq2 = rotate_halves(dq1, dq2, COS, SIN, rows[:, None] * stride_t + d[None, :], q_mask, HALF, True,
                                 HALF_TABLES)
    q_ptrs = grad_base + rows.to(tl.int64)[:, None] * stride_ds + (head * head_dim + d)[None, :]
    tl.store(q_ptrs, dq1.to(DQKV.dtype.element_ty), mask=q_mask)
    tl.store(q_ptrs + HALF, dq2.to(DQKV.dtype.element_ty), mask=q_mask)


# Sequences up to this length run in the kernels (the backward holds them in one query block); longer
# ones run as rope_qkv + SDPA, which at HRM's ARC length (901) was 2x faster than the forward kernel
# on an H100 (session 5). Session 21 re-swept the forward there (36 tiles, H100, 96 x 901 x 8 x 64
# bf16): best 822 us (128 queries, 64 keys, 8 warps, 1 stage; 702 without RoPE) against 631 us for
# rope_qkv + cuDNN (514 for cuDNN alone), so no-gradient calls keep that route too (benchmarks/RESULTS.md).
MAX_FUSED_SEQ = 128
# The forward (with or without the backward's LSE; ``USE_GLUON``) and the backward
# (``USE_GLUON_BACKWARD``) on Hopper as warp-specialised Gluon kernels
# (``hrm_kernels._gluon_rope_attention``) where they run (bf16/fp16, head_dim 64, half tables or no
# rotation, sequences up to 128); elsewhere the Triton kernels below. Session 30 (H100, 768 x 82 x 8
# x 64 bf16, GPU time): forward 120.3 us against Triton's 147.4 (cuDNN on pre-rotated q, k: 103.2),
# backward 274.8 against 433.9; the gated Sudoku training step 66.7 / 66.9 ms against 69.0 / 69.3.
USE_GLUON = True
USE_GLUON_BACKWARD = True
# Calls beyond MAX_FUSED_SEQ without rotation (q and k rotated by the qkv matmul: ARC's no-gradient
# blocks) and without a gradient: on Hopper a Gluon kernel (``hrm_kernels._gluon_attention``: online
# softmax over 128-key blocks) instead of SDPA (cuDNN, 579 us a call at 96 x 901 x 8 x 64 on an H100,
# 276 TFLOP/s). Session 32 (H100, bf16, 96 x 901 x 8 x 64, GPU time): 434.5 us against SDPA's 507.9
# in the same run, float64 errors equal to SDPA's; the ungated ARC training step 115.6 / 115.8 ms
# against 117.4 / 117.1 off. Session 33 (H100), the kernel as it is now (q, k, v as three views):
# its 50 GPU tests pass; ungated ARC step 114.7 / 115.6 ms against 117.5 / 117.3 off.
USE_GLUON_LONG = True
# ... and the calls with a gradient (ARC's last L and H calls, q and k rotated by ``rope_qkv``): the
# same kernel storing each query's log-sum-exp, then cuDNN's SDPA backward from it
# (``_gluon_attention.AttentionFunction``). With two consumer warpgroups it gained nothing in the
# ARC step (session 33: ungated 116.5 / 115.9 / 116.8 / 115.1 ms against 116.3 / 117.4 / 114.7 /
# 115.6 off). With three (``_gluon_attention.THREE_CONSUMERS``, session 38, H100, alternating runs in
# one process): ungated ARC step 110.1 / 110.9 ms against 111.0 / 111.6 off (back to back 111.0 /
# 111.4 against 111.5 / 111.8), peak memory 15.2-15.3 GiB against 15.1-15.2.
USE_GLUON_LONG_GRAD = True
# (BLOCK_M, BLOCK_N, num_warps, num_stages, JOIN_HALVES) on CUDA; see benchmarks/bench_rope_attention.py --sweep.
# Small key tiles win at HRM's Sudoku shape (82 tokens): a [128, 128] score tile leaves one
# program per SM (registers), and a one-tile version that issues every load up front was slower.
# Session 9 sweep (H100, 768 x 82 x 8 x 64 bf16, forward GPU time): (128, 32, 4, 1) joined 158.9 us,
# halves 170.5; (64, 64, 4, 1, joined) 183.6; 2 stages 228-234; query blocks of 32 317-594.
# Session 20 (half-width tables, values loaded early): 148.5 us; 2 stages 157.6; 8 warps 176-234;
# 64-query blocks 180-225; capping registers at 128 (maxnreg, 224 otherwise) 145.3, not adopted.
CUDA_CONFIG = (128, 32, 4, 1, True)
INTERPRETER_CONFIG = (16, 16, 4, 1, False)  # the same, for CPU tensors (small tiles keep it quick)


# The backward's (BLOCK_N, num_warps, num_stages, JOIN_HALVES) on CUDA; its query block is the whole sequence.
# H100, 768 x 82 x 8 x 64 bf16, fwd+bwd GPU time: 675 us; one dot per half 753 us; 2 stages 693 us;
# 64 keys 707 us; 8 warps 775-1107 us (registers). rope_qkv + SDPA (cuDNN): 852 us.
# Session 20 (H100, backward alone): 509 us with full tables, 437 with half-width ones; a persistent
# kernel over (batch, head) tiles with the next tile's loads pipelined (8 warps, 2 stages): 436.
CUDA_BACKWARD_CONFIG = (32, 4, 1, True)

INTERPRETER_BACKWARD_CONFIG = (16, 4, 1, False)  # the same, for CPU tensors (small tiles keep it quick)


def _meta(qkv: torch.Tensor, cos: Optional[torch.Tensor]) -> dict:
    """The kernels' shared compile-time arguments."""
    half = qkv.shape[-1] // 2
    return dict(HALF=half, HALF_P=max(16, next_power_of_2(half)),
                HEAD_P=max(16, next_power_of_2(2 * half)), ROPE=cos is not None,
                HALF_TABLES=cos is not None and cos.shape[-1] != 2 * half,
                INPUT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32")


def _table_stride(cos: Optional[torch.Tensor]) -> int:
    return 0 if cos is None else cos.stride(0)


def _launch(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            with_lse: bool = False):
    """The forward kernel: ``out`` [batch, seq, heads, head_dim], or ``(out, lse)`` with ``with_lse``
    (lse: [batch * heads, seq] fp32, base 2, for the backward). qkv's last two dims must be packed."""
    if USE_GLUON and _gluon_rope_attention.supported(qkv, cos, sin):
        return _gluon_rope_attention.rope_attention_forward(qkv, cos, sin, with_lse=with_lse)
    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    out = torch.empty((batch, seq, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((batch * heads, seq), dtype=torch.float32, device=qkv.device) if with_lse else out
    if out.numel():
        block_m, block_n, num_warps, num_stages, join = CUDA_CONFIG if qkv.is_cuda else INTERPRETER_CONFIG
        block_m = min(block_m, max(16, next_power_of_2(seq)))
        block_n = min(block_n, max(16, next_power_of_2(seq)))
        grid = (batch * heads * cdiv(seq, block_m),)
        launch(_rope_attention_kernel, grid, qkv, qkv if cos is None else cos, qkv if sin is None else sin, out, lse,
               seq, heads, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), _table_stride(cos),
               math.log2(math.e) / math.sqrt(head_dim), STORE_LSE=with_lse, BLOCK_M=block_m, BLOCK_N=block_n,
               JOIN_HALVES=join, num_warps=num_warps, num_stages=num_stages, **_meta(qkv, cos))
    return (out, lse) if with_lse else out


def _backward_launch(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                     out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dqkv [batch, seq, 3 * heads, head_dim] (qkv's dtype) from the forward's saved tensors and the
    output's gradient; one program per (batch, head), sequences up to MAX_FUSED_SEQ."""
    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    if dout.dtype != qkv.dtype or dout.stride(-1) != 1 or dout.stride(-2) != head_dim:
        dout = dout.to(qkv.dtype).contiguous()
    if USE_GLUON_BACKWARD and _gluon_rope_attention.supported(qkv, cos, sin):
        dout = dout.contiguous()  # (its TMA view is [batch, seq, heads * 64])
        if _gluon_rope_attention.backward_supported(qkv, cos, sin, out, lse, dout):
            return _gluon_rope_attention.rope_attention_backward(qkv, cos, sin, out, lse, dout)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if dqkv.numel():
        block_n, num_warps, num_stages, join = CUDA_BACKWARD_CONFIG if qkv.is_cuda else INTERPRETER_BACKWARD_CONFIG
        block_m = max(16, next_power_of_2(seq))
        launch(_rope_attention_backward_kernel, (batch * heads,), qkv, qkv if cos is None else cos,
               qkv if sin is None else sin, out, dout, lse, dqkv, seq, heads, qkv.stride(0), qkv.stride(1),
               out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
               _table_stride(cos), math.log2(math.e) / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim), BLOCK_M=block_m,
               BLOCK_N=min(block_n, block_m), JOIN_HALVES=join, num_warps=num_warps, num_stages=num_stages, **_meta(qkv, cos))
    return dqkv


class RopeAttentionFunction(torch.autograd.Function):
    """The fused forward (with log-sum-exp) and backward; qkv's last two dims packed."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        out, lse = _launch(qkv, cos, sin, with_lse=True)
        ctx.save_for_backward(qkv, cos, sin, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, cos, sin, out, lse = ctx.saved_tensors
        return _backward_launch(qkv, cos, sin, out, lse, dout), None, None


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.split(qkv.shape[2] // 3, dim=2)


def rope_attention_reference(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    """HRM's eager math (``rope_reference`` on q and k, then ``F.scaled_dot_product_attention``); also
    the CPU fallback. Same shapes and dtypes as ``rope_attention``."""
    q, k, v = _split(qkv) if cos is None else rope_qkv_reference(qkv, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _composed(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    """RoPE (``hrm_kernels.rope_qkv``: one pass forward, and one for the qkv gradient), then SDPA.
    The result is contiguous like the kernel's (free for the SDPA backends that write [B, S, H, D])."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    grad = torch.is_grad_enabled() and qkv.requires_grad
    if (USE_GLUON_LONG and cos is None and not grad and not torch.compiler.is_compiling()
            and _gluon_attention.supported(qkv)):
        return _gluon_attention.attention_forward(qkv)
    q, k, v = _split(qkv) if cos is None else rope_qkv(qkv, cos, sin)
    if (USE_GLUON_LONG_GRAD and grad and not torch.compiler.is_compiling()
            and _gluon_attention.views_supported(q, k, v) and torch.backends.cudnn.is_available()):
        return _gluon_attention.AttentionFunction.apply(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def rope_attention(qkv: torch.Tensor, cos: Optional[torch.Tensor] = None,
                   sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary embedding on q and k, then bidirectional softmax attention (scale 1/sqrt(head_dim)).

    qkv: [batch, seq, 3 * heads, head_dim] with a contiguous last dimension (q, k, v heads in that
    order); cos, sin: [positions >= seq, head_dim] float32 tables, or [positions >= seq, head_dim / 2]
    ones holding the half that rotate-half RoPE repeats (``cos[:, :head_dim // 2]`` of HRM's tables:
    half the table loads), or both None for no rotation.
    Returns [batch, seq, heads, head_dim] in qkv's dtype. Gradients flow to qkv (the fused backward
    up to ``MAX_FUSED_SEQ``, else rope_qkv + SDPA; see the module docstring).
    """
    op = "rope_attention"
    check_float("qkv", qkv, op)
    if qkv.dim() != 4 or qkv.shape[2] % 3:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}; need [batch, seq, 3 * heads, head_dim] "
                         "(q, k and v heads stacked on dim 2)")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin, or neither (no rotation)")
    if cos is not None:
        if qkv.shape[-1] % 2:
            raise ValueError(f"{op}: head_dim {qkv.shape[-1]} is odd; RoPE rotates pairs of features, so it needs "
                             "an even head_dim (or pass no cos/sin: learned positions)")
        check_tables(op, "qkv", qkv, cos, sin)
        cos, sin = packed_tables(cos, sin)
    if not use_triton(qkv.device):
        return rope_attention_reference(qkv, cos, sin)
    if torch.compiler.is_compiling() or qkv.shape[1] > MAX_FUSED_SEQ or qkv.shape[-1] % 2:
        return _composed(qkv, cos, sin)  # the kernels take head_dim in two halves: SDPA for an odd one
    if qkv.stride(-1) != 1 or qkv.stride(-2) != qkv.shape[-1]:
        qkv = qkv.contiguous()
    if torch.is_grad_enabled() and qkv.requires_grad:
        return RopeAttentionFunction.apply(qkv, cos, sin)
    return _launch(qkv, cos, sin)
