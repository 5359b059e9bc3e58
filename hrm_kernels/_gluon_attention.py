"""Softmax attention of pre-rotated q, k for sequences of any length (HRM's ARC: 901 tokens, head_dim
64) as a warp-specialised, persistent Gluon kernel for Hopper::

    out = softmax(q k^T / sqrt(64)) v            per (batch, head), bidirectional

It serves ``rope_attention``'s calls beyond its fused kernels' 128 positions that get no tables:
the no-gradient blocks at ARC's length, whose qkv matmul rotated q and k in its epilogue
(``Attention.ROPE_IN_QKV``), and the forward of the calls with a gradient (``AttentionFunction``,
below). There cuDNN (SDPA) took 579 us a call on an H100 in session 29
(47 calls, 27.2 ms of a 117.8 ms ungated ARC step): 160 GFLOP at 276 TFLOP/s.

A work item is 192 queries of one (batch, head) with ``THREE_CONSUMERS`` (the default: three
consumer warpgroups of 64), else 128; programs walk the items in order, so neighbouring
programs read the same keys and values from L2. A producer warp loads the item's q tile [192, 64]
(three TMA boxes of 64 rows) or [128, 64] into one of two slots, then each key block's k and v
[128, 64] into a ring of ``STAGES`` (TMA boxes of [batch, seq, heads * 64] views: positions past the
sequence load as zeros). Each consumer warpgroup takes 64 queries, q as the wgmma's A operand (with
three, and in the "stream" form, read from its slot; else from registers), and per key block (the
online softmax, FlashAttention-2's order, in base 2)::

    s     = q k_j^T                                   [64, 128] fp32 (keys past seq: -inf)
    m_new = max(m, rowmax(s) * c);  a = exp2(m - m_new);  p = exp2(s * c - m_new),  c = log2(e) / 8
    l     = l * a + rowsum(p);      o = o * a + round(p) @ v_j

then ``o / l`` leaves by TMA (rows past the sequence clipped), and with ``with_lse`` each query's
natural log-sum-exp (m + log2 l) ln 2 as fp32 [batch, heads, seq]: ``AttentionFunction`` (a gradient)
keeps it for cuDNN's SDPA backward (``rope_attention.USE_GLUON_LONG_GRAD``).
q, k and v are three [batch, seq, heads, 64] views, each TMA-described as [batch, seq, heads * 64]:
the thirds of a packed qkv, or rope_qkv's rotated q, k and qkv's v. The consumer warpgroups run their
blocks independently, so one's softmax overlaps the others' matmuls. ``FORMS``: "plain" runs each block's
steps in turn; "pipelined" issues block j + 1's scores before block j's softmax, within an item;
"stream" does so across the program's whole stream of blocks, items included (the
next item's first scores overlap an item's last softmax: what items of one block, Sudoku's
length, need), with q read by the wgmma from its slot.

Session 30: written and compiled for sm_90 (176 KiB of shared memory, no spills, each form). Session
32, first GPU run (H100): float64 errors equal to SDPA's; "plain" (the default) the fastest form, 434.5
us against SDPA's 507.9 at ARC's 96 x 901 x 8 x 64 (bf16, 367 against 314 TFLOP/s); behind
``rope_attention.USE_GLUON_LONG``. Session 38 (H100): three consumer warpgroups (the default) 372.6 us
against 443.7 with two at that call, 428 TFLOP/s, the same output and log-sum-exp bits.
Requirements (``supported``): Hopper,
bf16/fp16 qkv [batch, seq, 3 * heads, 64] contiguous and 16-byte aligned, seq and batch at least 1.
"""

from __future__ import annotations

import functools
import math

import torch

from hrm_kernels._gluon_gemm import _HAVE_GLUON, _describe as _desc, available, persistent_grid

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

    from hrm_kernels._gluon_gemm import _accumulator_layout, warpgroup_jit

KEY_BLOCK = 128  # keys a block
ROWS = 64  # queries a consumer warpgroup: an item is ROWS x consumers queries
# Consumer warpgroups a program: 3 (items of 192 queries: ARC's 901 positions in 5 tiles, not 8 of
# 128) or 2 (128, session 32's kernel). With three, one warpgroup's softmax (its exponentials on the
# special-function unit, as costly as its wgmmas at head_dim 64) overlaps two others' matmuls.
# Session 38 (H100, bf16, 96 x 901 x 8 x 64, GPU time): 372.6 us against 443.7 with two (1.19x),
# the same bits; at 4 x 300 x 8 (2 items of 192 a head) 9.1 us against 7.5.
THREE_CONSUMERS = True
HEAD_DIM = 64
Q_SLOTS = 2  # 16 KiB each (24 with three consumers)
STAGES = 4  # key blocks in flight: 32 KiB each (k and v); with q and 8 KiB output tiles 176 KiB
# (200 with three consumers)
# Registers a thread of each consumer warpgroup but the first, by consumer count; the producer warp
# gets 24 and the first consumer (the default partition) the rest: with two, 248 (with 40 for the
# producer it got 232, and the fp16 "stream" form spilled 2 registers).
CONSUMER_REGISTERS = {2: 232, 3: 160}
# How the consumers order a block's work (``_consume``): "plain", "pipelined" (the next block's q k^T
# in flight during a block's softmax, within an item) or "stream" (the same across items).
# Session 32 (H100, bf16, 96 x 901 x 8 x 64, GPU time, STAGES 4): plain 434.5 us, pipelined 447.3,
# stream 479.4 (SDPA 507.9); plain is also the fastest at Sudoku's 768 x 82 x 8 x 64 (88.9 us).
FORMS = ("plain", "pipelined", "stream")
DEFAULT_FORM = "plain"
# Quarters of each score block's columns (0, 1 or 2) whose exponentials run on the FMA units
# (``_exp2_scores``) instead of the special-function unit.
POLY_EXP2_QUARTERS = 0


def supported(qkv: torch.Tensor) -> bool:
    """The kernel takes this packed qkv [batch, seq, 3 * heads, 64], contiguous (see the module
    docstring): its thirds pass ``views_supported``."""
    return (qkv.dim() == 4 and qkv.shape[2] >= 3 and qkv.shape[2] % 3 == 0 and qkv.is_contiguous()
            and views_supported(*qkv.split(qkv.shape[2] // 3, dim=2)))


def views_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel takes these q, k, v [batch, seq, heads, 64] (``attention_views_forward``): one shape and
    dtype, each a TMA-describable [batch, seq, heads * 64] view (heads packed, 16-byte aligned rows),
    such as the thirds of a packed qkv or ``rope_qkv``'s outputs."""
    if not (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device and q.shape[0] >= 1 and q.shape[1] >= 1 and q.shape[2] >= 1
            and q.shape[3] == HEAD_DIM and available(q.device) and q.dtype in (torch.bfloat16, torch.float16)):
        return False
    return all(t.stride(3) == 1 and t.stride(2) == HEAD_DIM and t.stride(1) > 0 and t.stride(0) > 0
               and t.stride(1) % 8 == 0 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in (q, k, v))


@functools.lru_cache(maxsize=None)
def _cudnn_stats_rank() -> int:
    """The rank of the log-sum-exp that this torch's cuDNN SDPA forward returns and its backward
    takes (4, [batch, heads, seq, 1], in recent releases; 3 in older ones), from a meta-device call."""
    q = torch.empty(1, 1, 1, HEAD_DIM, device="meta", dtype=torch.bfloat16)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True)[1].dim()


if _HAVE_GLUON:

    @gluon.jit
    def _exp2(x):
        """2^x in one MUFU instruction, subnormal results flushed to zero (``gl.exp2`` adds a range
        fix-up of two multiplies and a select around it); p below 2^-126 of the row's largest term."""
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _produce(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items,
                 q_tiles, heads, key_blocks):
        """The producer warp: per item its q tile, then every key block's k and v, each into the next
        free slot (head h at columns [64 h, 64 h + 64) of each [batch, seq, heads * 64] view)."""
        QS: gl.constexpr = q_ready.type.shape[0]
        NB: gl.constexpr = q_bufs.type.shape[0] // QS  # TMA boxes an item's q tile (``descriptors``)
        KS: gl.constexpr = k_bufs.type.shape[0]
        QB: gl.constexpr = q_desc.block_type.shape[1]  # queries a box
        BN: gl.constexpr = k_desc.block_type.shape[1]  # keys a block
        D: gl.constexpr = q_desc.block_type.shape[2]
        it = 0
        kv = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            bh = item // q_tiles
            b = bh // heads
            h = bh % heads
            qs = it % QS
            mbarrier.wait(q_empty.index(qs), ((it // QS) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qs), NB * q_desc.block_type.nbytes)
            for box in gl.static_range(NB):
                tma.async_copy_global_to_shared(q_desc, [b, ((item % q_tiles) * NB + box) * QB, h * D],
                                                q_ready.index(qs), q_bufs.index(qs * NB + box))
            for j in range(key_blocks):
                s = kv % KS
                mbarrier.wait(kv_empty.index(s), ((kv // KS) & 1) ^ 1)
                mbarrier.expect(kv_ready.index(s), 2 * k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [b, j * BN, h * D], kv_ready.index(s), k_bufs.index(s))
                tma.async_copy_global_to_shared(v_desc, [b, j * BN, h * D], kv_ready.index(s), v_bufs.index(s))
                kv += 1
            it += 1

    @gluon.jit
    def _exp2_fma(x):
        """2^x for x <= 0 without the special-function unit: x = j + f with j = round(x) (the magic
        constant 1.5 * 2^23 rounds it, and leaves j in the low bits of x + 1.5 * 2^23) and f in
        [-1/2, 1/2]; 2^f by a degree-4 polynomial (Chebyshev fit, relative error 3.6e-6, under a
        thousandth of a bf16 ulp); 2^j added to its exponent bits. x is clamped at -126 (below, the
        exponent would wrap), so a term under 2^-126 of its row's largest (a masked key's: -inf) comes
        out as about 2^-126 where ``_exp2`` flushes it to 0: nothing next to the row sum's 1 or more."""
        x = gl.maximum(x, -126.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        p = 0.00966636836528778 * f + 0.055921975523233414
        p = p * f + 0.2402234971523285
        p = p * f + 0.6931210160255432
        p = p * f + 1.0
        # (bits of t) << 23 is j << 23 modulo 2^32: the constant's bits shift out
        return ((t.to(gl.int32, bitcast=True) << 23) + p.to(gl.int32, bitcast=True)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _column_halves(x):
        """The column halves [R, N / 2] of an accumulator-layout tile [R, N] (register renaming: a
        thread holds columns in both)."""
        R: gl.constexpr = x.type.shape[0]
        N: gl.constexpr = x.type.shape[1]
        return gl.split(gl.permute(gl.reshape(x, [R, 2, N // 2]), (0, 2, 1)))

    @gluon.jit
    def _join_columns(a, b):
        """``_column_halves``' inverse (b's layout may be another spelling of a's: the same
        registers, no data movement)."""
        R: gl.constexpr = a.type.shape[0]
        N: gl.constexpr = 2 * a.type.shape[1]
        return gl.reshape(gl.permute(gl.join(a, gl.convert_layout(b, a.type.layout)), (0, 2, 1)), [R, N])

    @gluon.jit
    def _exp2_scores(x, POLY: gl.constexpr):
        """2^x of a score tile [R, N] (x <= 0), ``POLY`` quarters of its columns (0, 1 or 2) on the FMA
        units (``_exp2_fma``), the rest on the special-function unit (``_exp2``): at head_dim 64 the
        exponentials alone keep that unit as busy as the wgmmas keep the tensor cores
        (FlashAttention-4's software exp2, on Hopper)."""
        if POLY == 0:
            return _exp2(x)
        else:
            a, b = _column_halves(x)
            if POLY == 2:
                p = _join_columns(_exp2(a), _exp2_fma(b))
            else:
                b1, b2 = _column_halves(b)
                p = _join_columns(_exp2(a), _join_columns(_exp2(b1), _exp2_fma(b2)))
            return gl.convert_layout(p, x.type.layout)  # (the same registers: a relabelling)

    @gluon.jit
    def _online_softmax(scores, m, l, qk_scale, POLY: gl.constexpr):
        """One key block's step of the online softmax: (p, m_new, l_new, alpha), base 2 (``POLY``:
        ``_exp2_scores``)."""
        m_new = gl.maximum(m, gl.max(scores, axis=1) * qk_scale)
        alpha = _exp2(m - m_new)
        p = _exp2_scores(scores * qk_scale - gl.expand_dims(m_new, 1), POLY)
        return p, m_new, l * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _accumulate(o, p, alpha, v_buf, o_layout: gl.constexpr, p_operand: gl.constexpr):
        """o * alpha + round(p) @ v, issued (the caller waits)."""
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        return warpgroup_mma(gl.convert_layout(p.to(v_buf.dtype), p_operand), v_buf, o, is_async=True)

    @gluon.jit
    def _scores(q, k_buf, s_layout: gl.constexpr):
        """q k^T [ROWS, BM] fp32 of one key block, issued (the caller waits)."""
        ROWS: gl.constexpr = q.type.shape[0]
        BM: gl.constexpr = k_buf.type.shape[0]
        return warpgroup_mma(q, k_buf.permute((1, 0)), gl.zeros((ROWS, BM), dtype=gl.float32, layout=s_layout),
                             use_acc=False, is_async=True)

    @gluon.jit
    def _load_q(q_bufs, q_ready, q_empty, it, WG: gl.constexpr, ROWS: gl.constexpr, q_layout: gl.constexpr,
                q_operand: gl.constexpr):
        """This warpgroup's rows of the ``it``-th item's q tile, as the scores' register operand; the
        slot released."""
        QS: gl.constexpr = q_ready.type.shape[0]
        qs = it % QS
        mbarrier.wait(q_ready.index(qs), (it // QS) & 1)
        q = _q_rows(q_bufs, q_ready, qs, WG, ROWS).load(q_layout)
        fence_async_shared()  # the q reads before the slot's release to the next TMA load
        mbarrier.arrive(q_empty.index(qs), count=1)
        return gl.convert_layout(q, q_operand)

    @gluon.jit
    def _q_rows(q_bufs, q_ready, qs, WG: gl.constexpr, ROWS: gl.constexpr):
        """This warpgroup's rows [ROWS WG, ROWS WG + ROWS) of the q tile in slot ``qs``, as a wgmma
        operand: q_bufs holds each slot's tile as boxes [1, QB, D] (their count: q_bufs' over q_ready's;
        one box of 128 queries with two consumer warpgroups, one of 64 each with three)."""
        NB: gl.constexpr = q_bufs.type.shape[0] // q_ready.type.shape[0]
        QB: gl.constexpr = q_bufs.type.shape[2]
        return q_bufs.index(qs * NB + (WG * ROWS) // QB).reshape([QB, q_bufs.type.shape[3]]).slice(
            (WG * ROWS) % QB, ROWS, dim=0)

    @gluon.jit
    def _release_q(q_empty_bar):
        """The q slot's wgmma reads are complete (waited): free it for the next TMA load."""
        mbarrier.arrive(q_empty_bar, count=1)

    @gluon.jit
    def _mask_last(scores, block, seq_len, keys):
        """Keys past the sequence (TMA's zeros) of key block ``block`` (the last, the only partial one) -> -inf."""
        BM: gl.constexpr = scores.type.shape[1]
        return scores + gl.expand_dims(gl.where(block * BM + keys < seq_len, 0.0, float("-inf")), 0)

    @gluon.jit
    def _store_out(o, m, l, out_desc, out_buf, lse, item, q_tiles, heads, seq_len, WG: gl.constexpr,
                   BM: gl.constexpr, o_layout: gl.constexpr, STORE_LSE: gl.constexpr):
        """o / l into this warpgroup's rows of the item's output tile (``BM`` queries an item), by TMA (rows past the sequence
        clipped); with ``STORE_LSE`` the rows' natural log-sum-exp, (m + log2(l)) ln 2, into lse
        [batch * heads, seq] fp32."""
        ROWS: gl.constexpr = o.type.shape[0]
        D: gl.constexpr = o.type.shape[1]
        if STORE_LSE:
            rows = (item % q_tiles) * BM + WG * ROWS + gl.arange(0, ROWS, layout=m.type.layout)
            gl.store(lse + (item // q_tiles).to(gl.int64) * seq_len + rows, (m + gl.log2(l)) * 0.6931471805599453,
                     mask=rows < seq_len)
        o = o * gl.expand_dims(gl.convert_layout(1.0 / l, gl.SliceLayout(1, o_layout)), 1)
        tma.store_wait(pendings=0)  # this warpgroup's previous output has left out_buf
        out_buf.reshape([ROWS, D]).store(o.to(out_desc.dtype))
        fence_async_shared()
        bh = item // q_tiles
        tma.async_copy_shared_to_global(out_desc, [bh // heads, (item % q_tiles) * BM + WG * ROWS,
                                                   (bh % heads) * D], out_buf)

    @gluon.jit
    def _consume(out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty, lse, n_items,
                 q_tiles, heads, key_blocks, seq_len, qk_scale, WG: gl.constexpr, FORM: gl.constexpr,
                 STORE_LSE: gl.constexpr, POLY: gl.constexpr):
        """Consumer warpgroup ``WG``: queries [64 WG, 64 WG + 64) of every item's tile. ``FORM`` 0:
        each block's scores, softmax and p @ v in turn; 1: block j's scores in flight while block
        j - 1's softmax runs, within an item (FlashAttention-3's order); 2: the same across the
        program's whole stream of blocks, so that the next item's first scores overlap an item's
        last softmax (items of one block: Sudoku's length), with q read by the wgmma from its
        slot (no q registers to carry across items)."""
        KS: gl.constexpr = k_bufs.type.shape[0]
        ROWS: gl.constexpr = out_bufs.type.shape[2]  # this warpgroup's queries
        BM: gl.constexpr = q_bufs.type.shape[2] * (q_bufs.type.shape[0] // q_ready.type.shape[0])  # queries an item
        BN: gl.constexpr = k_bufs.type.shape[2]  # keys a block
        D: gl.constexpr = q_bufs.type.shape[3]
        q_layout: gl.constexpr = _accumulator_layout(D)  # [ROWS, D] loads
        s_layout: gl.constexpr = _accumulator_layout(BN)  # scores [ROWS, BN]
        o_layout: gl.constexpr = _accumulator_layout(D)  # output [ROWS, D]
        q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        keys = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        out_buf = out_bufs.index(WG)
        if FORM == 2:  # q as the scores' shared-memory operand: its slot is held until the item's last scores
            QS: gl.constexpr = q_ready.type.shape[0]
            first = gl.program_id(0)
            # >= 1 block: the launcher's grid is at most n_items (a program without items would wait forever below)
            total = (n_items - first + gl.num_programs(0) - 1) // gl.num_programs(0) * key_blocks
            item = first
            mbarrier.wait(q_ready.index(0), 0)
            mbarrier.wait(kv_ready.index(0), 0)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(_scores(_q_rows(q_bufs, q_ready, 0, WG, ROWS),
                                                                         k_bufs.index(0).reshape([BN, D]), s_layout), ))
            if key_blocks == 1:
                _release_q(q_empty.index(0))
            m = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
            l = gl.zeros([ROWS], gl.float32, layout=row_layout)
            o = gl.zeros((ROWS, D), dtype=gl.float32, layout=o_layout)
            j = 0  # block t's index in its item
            nxt_item = 0  # the program's item count of block t + 1 (counters: no division by key_blocks)
            for t in range(total - 1):  # block t's softmax and p @ v, block t + 1's scores in flight
                last = j == key_blocks - 1
                if last:
                    nxt_item += 1
                    j = 0
                else:
                    j += 1  # (now block t + 1's index)
                qs = nxt_item % QS
                if last:  # block t + 1 is the next item's first
                    mbarrier.wait(q_ready.index(qs), (nxt_item // QS) & 1)
                    scores = _mask_last(scores, key_blocks - 1, seq_len, keys)
                nxt_slot = (t + 1) % KS
                mbarrier.wait(kv_ready.index(nxt_slot), ((t + 1) // KS) & 1)
                nxt = _scores(_q_rows(q_bufs, q_ready, qs, WG, ROWS), k_bufs.index(nxt_slot).reshape([BN, D]), s_layout)
                p, m, l, alpha = _online_softmax(scores, m, l, qk_scale, POLY)
                o = _accumulate(o, p, alpha, v_bufs.index(t % KS).reshape([BN, D]), o_layout, p_operand)
                scores, o = warpgroup_mma_wait(num_outstanding=0, deps=(nxt, o))
                mbarrier.arrive(kv_empty.index(t % KS), count=1)  # both of the slot's reads are complete
                if j == key_blocks - 1:  # block t + 1 was its item's last scores
                    _release_q(q_empty.index(qs))
                if last:
                    _store_out(o, m, l, out_desc, out_buf, lse, item, q_tiles, heads, seq_len, WG, BM, o_layout,
                               STORE_LSE)
                    item += gl.num_programs(0)
                    m = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
                    l = gl.zeros([ROWS], gl.float32, layout=row_layout)
                    o = gl.zeros((ROWS, D), dtype=gl.float32, layout=o_layout)
            # the stream's last block: the last item's last
            scores = _mask_last(scores, key_blocks - 1, seq_len, keys)
            p, m, l, alpha = _online_softmax(scores, m, l, qk_scale, POLY)
            o = _accumulate(o, p, alpha, v_bufs.index((total - 1) % KS).reshape([BN, D]), o_layout, p_operand)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            mbarrier.arrive(kv_empty.index((total - 1) % KS), count=1)
            _store_out(o, m, l, out_desc, out_buf, lse, item, q_tiles, heads, seq_len, WG, BM, o_layout, STORE_LSE)
        else:
            it = 0
            kv = 0
            # With three consumer warpgroups (160 registers a thread) the plain form reads q from its
            # slot, as "stream" does, and frees the slot after the item's last scores: q in registers
            # (16 a thread) made ptxas spill there.
            Q_IN_SLOT: gl.constexpr = FORM == 0 and BM > 2 * ROWS
            for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
                if Q_IN_SLOT:
                    qs = it % q_ready.type.shape[0]
                    mbarrier.wait(q_ready.index(qs), (it // q_ready.type.shape[0]) & 1)
                    q = _q_rows(q_bufs, q_ready, qs, WG, ROWS)
                else:
                    q = _load_q(q_bufs, q_ready, q_empty, it, WG, ROWS, q_layout, q_operand)
                m = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
                l = gl.zeros([ROWS], gl.float32, layout=row_layout)
                o = gl.zeros((ROWS, D), dtype=gl.float32, layout=o_layout)
                if FORM == 1:
                    s = kv % KS
                    mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                    scores = _scores(q, k_bufs.index(s).reshape([BN, D]), s_layout)
                    scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
                    for j in range(1, key_blocks):  # blocks 0 .. key_blocks - 2 are whole: no mask
                        prev = s
                        kv += 1
                        s = kv % KS
                        mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                        nxt = _scores(q, k_bufs.index(s).reshape([BN, D]), s_layout)
                        p, m, l, alpha = _online_softmax(scores, m, l, qk_scale, POLY)
                        o = _accumulate(o, p, alpha, v_bufs.index(prev).reshape([BN, D]), o_layout, p_operand)
                        scores, o = warpgroup_mma_wait(num_outstanding=0, deps=(nxt, o))
                        mbarrier.arrive(kv_empty.index(prev), count=1)  # both of the slot's reads are complete
                    scores = _mask_last(scores, key_blocks - 1, seq_len, keys)
                    p, m, l, alpha = _online_softmax(scores, m, l, qk_scale, POLY)
                    o = _accumulate(o, p, alpha, v_bufs.index(s).reshape([BN, D]), o_layout, p_operand)
                    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
                    mbarrier.arrive(kv_empty.index(s), count=1)
                    kv += 1
                else:
                    for j in range(key_blocks):
                        s = kv % KS
                        mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                        scores = _scores(q, k_bufs.index(s).reshape([BN, D]), s_layout)
                        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
                        if j == key_blocks - 1:
                            if Q_IN_SLOT:  # the item's last scores are complete: its q slot may refill
                                _release_q(q_empty.index(qs))
                            scores = _mask_last(scores, j, seq_len, keys)
                        p, m, l, alpha = _online_softmax(scores, m, l, qk_scale, POLY)
                        o = _accumulate(o, p, alpha, v_bufs.index(s).reshape([BN, D]), o_layout, p_operand)
                        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
                        mbarrier.arrive(kv_empty.index(s), count=1)  # both of the slot's reads are complete
                        kv += 1
                _store_out(o, m, l, out_desc, out_buf, lse, item, q_tiles, heads, seq_len, WG, BM, o_layout, STORE_LSE)
                it += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(form: str = "plain", store_lse: bool = False, consumers: int = 2, poly_quarters: int = 0):
        """The kernel in one of ``FORMS`` (``_consume``), storing the rows' log-sum-exp with
        ``store_lse``, with 2 or 3 ``consumers`` warpgroups and ``poly_quarters`` of each score block's
        exponentials on the FMA units (``_exp2_scores``) (built on first use so that importing needs
        no Gluon compile)."""
        FORM = gl.constexpr(FORMS.index(form))
        STORE_LSE = gl.constexpr(store_lse)
        CONSUMERS = gl.constexpr(consumers)
        POLY = gl.constexpr(poly_quarters)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(q_desc, k_desc, v_desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready,
                        kv_empty, lse, n_items, q_tiles, heads, key_blocks, seq_len, qk_scale):
                _consume(out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty, lse, n_items,
                         q_tiles, heads, key_blocks, seq_len, qk_scale, WG, FORM, STORE_LSE, POLY)

            return warpgroup_jit(consume, wg)

        first, second, third = consumer(0), consumer(1), consumer(2)

        @gluon.jit
        def producer(q_desc, k_desc, v_desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready,
                     kv_empty, lse, n_items, q_tiles, heads, key_blocks, seq_len, qk_scale):
            _produce(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items,
                     q_tiles, heads, key_blocks)

        @gluon.jit
        def attention_kernel(q_desc, k_desc, v_desc, out_desc, lse, n_items, q_tiles, heads, key_blocks, seq_len,
                             qk_scale, Q_SLOTS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = q_desc.dtype
            # (each consumer's partition compiled under a name of its own, warpgroup_jit; this line also changes
            # the kernel's cache key from the builds before that fix, whose third consumer ran the second's rows)
            # an item's q tile in boxes of q_desc's (one of 128 rows for two consumers, three of 64 for three)
            Q_BOXES: gl.constexpr = CONSUMERS * out_desc.block_type.shape[1] // q_desc.block_type.shape[1]
            q_bufs = gl.allocate_shared_memory(dtype, [Q_SLOTS * Q_BOXES] + q_desc.block_type.shape, q_desc.layout)
            k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
            out_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + out_desc.block_type.shape, out_desc.layout)
            q_ready = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
            q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
            kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(Q_SLOTS):
                mbarrier.init(q_ready.index(i), count=1)
                mbarrier.init(q_empty.index(i), count=CONSUMERS)  # every consumer warpgroup has read its rows
            for i in gl.static_range(STAGES):
                mbarrier.init(kv_ready.index(i), count=1)
                mbarrier.init(kv_empty.index(i), count=CONSUMERS)  # every consumer warpgroup releases each stage
            args = (q_desc, k_desc, v_desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready,
                    kv_empty, lse, n_items, q_tiles, heads, key_blocks, seq_len, qk_scale)
            if CONSUMERS == 3:
                gl.warp_specialize([(first, args), (second, args), (third, args), (producer, args)], [4, 4, 1],
                                   [CONSUMER_REGS, CONSUMER_REGS, 24])
            else:
                gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 24])

        return attention_kernel


def consumers() -> int:
    """Consumer warpgroups a program: 3 with ``THREE_CONSUMERS`` in the "plain" form (the other forms
    spill at three's 160 registers a thread), else 2."""
    return 3 if THREE_CONSUMERS and DEFAULT_FORM == "plain" else 2


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, n_consumers: int) -> tuple:
    """q, k and v's [batch, seq, heads * 64] views in boxes of [1, ROWS x n_consumers, 64] (an item's q
    tile; TMA boxes are powers of two, so with three consumers three boxes of [1, ROWS, 64]) and
    [1, KEY_BLOCK, 64] (k and v blocks), and out's in [1, ROWS, 64] boxes (a warpgroup's rows)."""
    batch, seq = q.shape[:2]
    views = [t.view(batch, seq, -1) for t in (q, k, v, out)]
    q_rows = ROWS * n_consumers
    return (_desc(views[0], [1, q_rows if q_rows & (q_rows - 1) == 0 else ROWS, HEAD_DIM]),
            _desc(views[1], [1, KEY_BLOCK, HEAD_DIM]),
            _desc(views[2], [1, KEY_BLOCK, HEAD_DIM]), _desc(views[3], [1, ROWS, HEAD_DIM]))


def attention_views_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, programs: int | None = None,
                            with_lse: bool = False):
    """out [batch, seq, heads, 64] = softmax(q k^T / 8) v per (batch, head) of q, k, v [batch, seq, heads,
    64] (the caller checks ``views_supported``); with ``with_lse`` also lse [batch, heads, seq] fp32,
    each query's natural log-sum-exp of its scaled scores (SDPA's logsumexp, for a backward).
    ``programs``: the persistent grid (default one program per SM)."""
    from hrm_kernels.precompile import launch

    batch, seq, heads, head_dim = q.shape
    out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) if with_lse else out
    n_consumers = consumers()
    q_tiles = -(-seq // (ROWS * n_consumers))
    n_items = batch * heads * q_tiles
    grid = persistent_grid(programs, n_items, q.device, "attention (Gluon)")
    if STAGES < 2:  # the pipelined form holds two key blocks at once
        raise ValueError(f"attention (Gluon): STAGES must be at least 2, got {STAGES}")
    launch(_kernel(DEFAULT_FORM, with_lse, n_consumers, POLY_EXP2_QUARTERS), grid,
           *descriptors(q, k, v, out, n_consumers), lse, n_items, q_tiles, heads, -(-seq // KEY_BLOCK), seq,
           math.log2(math.e) / math.sqrt(head_dim), Q_SLOTS=Q_SLOTS, STAGES=STAGES,
           CONSUMER_REGS=CONSUMER_REGISTERS[n_consumers], num_warps=4)
    return (out, lse) if with_lse else out


def attention_forward(qkv: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """``attention_views_forward`` of a packed qkv [batch, seq, 3 * heads, 64]'s q, k and v heads (the
    caller checks ``supported``)."""
    return attention_views_forward(*qkv.split(qkv.shape[2] // 3, dim=2), programs=programs)


class AttentionFunction(torch.autograd.Function):
    """``attention_views_forward`` with a gradient: the forward keeps each query's log-sum-exp and the
    backward is cuDNN's SDPA backward (``aten._scaled_dot_product_cudnn_attention_backward``), which
    recomputes p from q, k and that log-sum-exp (its "Stats": natural log, [batch, heads, seq, 1])::

        dv = p^T do;   dp = do v^T;   ds = p * (dp - rowsum(do * out));   dq = ds k / 8;   dk = ds^T q / 8

    q, k, v, out and do go to cuDNN as [batch, heads, seq, 64] views of their [batch, seq, heads, 64]
    storage; the gradients come back in the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = attention_views_forward(q, k, v, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        seq = q.shape[1]
        no_seed = torch.empty(0, dtype=torch.int64, device=q.device)  # no dropout: cuDNN reads neither
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout.contiguous().transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            out.transpose(1, 2), lse.unsqueeze(-1) if _cudnn_stats_rank() == 4 else lse, no_seed, no_seed, None, None,
            None, seq, seq, 0.0, False,
            scale=1.0 / math.sqrt(q.shape[-1]))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
