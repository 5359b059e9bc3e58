"""Softmax attention of pre-rotated q, k for sequences of any length (HRM's ARC: 901 tokens, head_dim
64), no gradient, as a warp-specialised, persistent Gluon kernel for Hopper::

    out = softmax(q k^T / sqrt(64)) v            per (batch, head), bidirectional

It serves ``rope_attention``'s calls beyond its fused kernels' 128 positions that need no gradient
and get no tables: the no-gradient blocks at ARC's length, whose qkv matmul rotated q and k in its
epilogue (``Attention.ROPE_IN_QKV``). There cuDNN (SDPA) took 579 us a call on an H100 in session 29
(47 calls, 27.2 ms of a 117.8 ms ungated ARC step): 160 GFLOP at 276 TFLOP/s.

A work item is 128 queries of one (batch, head); programs walk the items in order, so neighbouring
programs read the same keys and values from L2. A producer warp loads the item's q tile [128, 64]
into one of two slots, then each key block's k and v [128, 64] into a ring of ``STAGES`` (TMA boxes
of a [batch, seq, 3 * heads * 64] view: positions past the sequence load as zeros). Two consumer
warpgroups take 64 queries each, q as the wgmma's A operand (from registers, or in the "stream"
form from its slot), and per key block (the online softmax, FlashAttention-2's order, in base 2)::

    s     = q k_j^T                                   [64, 128] fp32 (keys past seq: -inf)
    m_new = max(m, rowmax(s) * c);  a = exp2(m - m_new);  p = exp2(s * c - m_new),  c = log2(e) / 8
    l     = l * a + rowsum(p);      o = o * a + round(p) @ v_j

then ``o / l`` leaves by TMA (rows past the sequence clipped). The two warpgroups run their blocks
independently, so one's softmax overlaps the other's matmuls. ``FORMS``: "plain" runs each block's
steps in turn; "pipelined" issues block j + 1's scores before block j's softmax, within an item;
"stream" does so across the program's whole stream of blocks, items included (the
next item's first scores overlap an item's last softmax: what items of one block, Sudoku's
length, need), with q read by the wgmma from its slot.

Session 30: written and compiled for sm_90 (176 KiB of shared memory, no spills, each form). Session
32, first GPU run (H100): float64 errors equal to SDPA's; "plain" (the default) the fastest form, 434.5
us against SDPA's 507.9 at ARC's 96 x 901 x 8 x 64 (bf16, 367 against 314 TFLOP/s); behind
``rope_attention.USE_GLUON_LONG`` (on). Requirements (``supported``): Hopper,
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

    from hrm_kernels._gluon_gemm import _accumulator_layout

BLOCK = 128  # queries an item, keys a block
HEAD_DIM = 64
Q_SLOTS = 2  # 16 KiB each
STAGES = 4  # key blocks in flight: 32 KiB each (k and v); with q and two 8 KiB output tiles 176 KiB
# Registers a thread of the second consumer warpgroup; the producer warp gets 24 and the first
# consumer (the default partition) the rest, 248 (with 40 for the producer it got 232, and the fp16
# "stream" form spilled 2 registers).
CONSUMER_REGISTERS = 232
# How the consumers order a block's work (``_consume``): "plain", "pipelined" (the next block's q k^T
# in flight during a block's softmax, within an item) or "stream" (the same across items).
# Session 32 (H100, bf16, 96 x 901 x 8 x 64, GPU time, STAGES 4): plain 434.5 us, pipelined 447.3,
# stream 479.4 (SDPA 507.9); plain is also the fastest at Sudoku's 768 x 82 x 8 x 64 (88.9 us).
FORMS = ("plain", "pipelined", "stream")
DEFAULT_FORM = "plain"


def supported(qkv: torch.Tensor) -> bool:
    """The kernel takes this qkv (see the module docstring)."""
    if not (available(qkv.device) and qkv.dtype in (torch.bfloat16, torch.float16) and qkv.dim() == 4):
        return False
    batch, seq, three_heads, head_dim = qkv.shape
    return (batch >= 1 and seq >= 1 and head_dim == HEAD_DIM and three_heads >= 3 and three_heads % 3 == 0
            and qkv.is_contiguous() and qkv.data_ptr() % 16 == 0)


if _HAVE_GLUON:

    @gluon.jit
    def _exp2(x):
        """2^x in one MUFU instruction, subnormal results flushed to zero (``gl.exp2`` adds a range
        fix-up of two multiplies and a select around it); p below 2^-126 of the row's largest term."""
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _produce(desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items, q_tiles, heads,
                 key_blocks):
        """The producer warp: per item its q tile, then every key block's k and v, each into the next
        free slot."""
        QS: gl.constexpr = q_bufs.type.shape[0]
        KS: gl.constexpr = k_bufs.type.shape[0]
        BM: gl.constexpr = desc.block_type.shape[1]
        D: gl.constexpr = desc.block_type.shape[2]
        NBYTES: gl.constexpr = desc.block_type.nbytes
        it = 0
        kv = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            bh = item // q_tiles
            b = bh // heads
            h = bh % heads
            qs = it % QS
            mbarrier.wait(q_empty.index(qs), ((it // QS) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qs), NBYTES)
            tma.async_copy_global_to_shared(desc, [b, (item % q_tiles) * BM, h * D], q_ready.index(qs),
                                            q_bufs.index(qs))
            for j in range(key_blocks):
                s = kv % KS
                mbarrier.wait(kv_empty.index(s), ((kv // KS) & 1) ^ 1)
                mbarrier.expect(kv_ready.index(s), 2 * NBYTES)
                tma.async_copy_global_to_shared(desc, [b, j * BM, (heads + h) * D], kv_ready.index(s), k_bufs.index(s))
                tma.async_copy_global_to_shared(desc, [b, j * BM, (2 * heads + h) * D], kv_ready.index(s),
                                                v_bufs.index(s))
                kv += 1
            it += 1

    @gluon.jit
    def _online_softmax(scores, m, l, qk_scale):
        """One key block's step of the online softmax: (p, m_new, l_new, alpha), base 2."""
        m_new = gl.maximum(m, gl.max(scores, axis=1) * qk_scale)
        alpha = _exp2(m - m_new)
        p = _exp2(scores * qk_scale - gl.expand_dims(m_new, 1))
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
    def _load_q(q_bufs, q_ready, q_empty, it, WG: gl.constexpr, q_layout: gl.constexpr, q_operand: gl.constexpr):
        """This warpgroup's rows of the ``it``-th item's q tile, as the scores' register operand; the
        slot released."""
        QS: gl.constexpr = q_bufs.type.shape[0]
        BM: gl.constexpr = q_bufs.type.shape[2]
        D: gl.constexpr = q_bufs.type.shape[3]
        qs = it % QS
        mbarrier.wait(q_ready.index(qs), (it // QS) & 1)
        q = q_bufs.index(qs).reshape([BM, D]).slice(WG * (BM // 2), BM // 2, dim=0).load(q_layout)
        fence_async_shared()  # the q reads before the slot's release to the next TMA load
        mbarrier.arrive(q_empty.index(qs), count=1)
        return gl.convert_layout(q, q_operand)

    @gluon.jit
    def _q_rows(q_buf, WG: gl.constexpr):
        """This warpgroup's rows [64 WG, 64 WG + 64) of a q slot [1, BM, D], as a wgmma operand."""
        BM: gl.constexpr = q_buf.type.shape[1]
        D: gl.constexpr = q_buf.type.shape[2]
        return q_buf.reshape([BM, D]).slice(WG * (BM // 2), BM // 2, dim=0)

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
    def _store_out(o, l, out_desc, out_buf, item, q_tiles, heads, WG: gl.constexpr, o_layout: gl.constexpr):
        """o / l into this warpgroup's rows of the item's output tile, by TMA (rows past the sequence clipped)."""
        ROWS: gl.constexpr = o.type.shape[0]
        D: gl.constexpr = o.type.shape[1]
        o = o * gl.expand_dims(gl.convert_layout(1.0 / l, gl.SliceLayout(1, o_layout)), 1)
        tma.store_wait(pendings=0)  # this warpgroup's previous output has left out_buf
        out_buf.reshape([ROWS, D]).store(o.to(out_desc.dtype))
        fence_async_shared()
        bh = item // q_tiles
        tma.async_copy_shared_to_global(out_desc, [bh // heads, (item % q_tiles) * 2 * ROWS + WG * ROWS,
                                                   (bh % heads) * D], out_buf)

    @gluon.jit
    def _consume(out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items, q_tiles,
                 heads, key_blocks, seq_len, qk_scale, WG: gl.constexpr, FORM: gl.constexpr):
        """Consumer warpgroup ``WG``: queries [64 WG, 64 WG + 64) of every item's tile. ``FORM`` 0:
        each block's scores, softmax and p @ v in turn; 1: block j's scores in flight while block
        j - 1's softmax runs, within an item (FlashAttention-3's order); 2: the same across the
        program's whole stream of blocks, so that the next item's first scores overlap an item's
        last softmax (items of one block: Sudoku's length), with q read by the wgmma from its
        slot (no q registers to carry across items)."""
        KS: gl.constexpr = k_bufs.type.shape[0]
        BM: gl.constexpr = q_bufs.type.shape[2]
        D: gl.constexpr = q_bufs.type.shape[3]
        ROWS: gl.constexpr = BM // 2
        q_layout: gl.constexpr = _accumulator_layout(D)  # [ROWS, D] loads
        s_layout: gl.constexpr = _accumulator_layout(BM)  # scores [ROWS, BM]
        o_layout: gl.constexpr = _accumulator_layout(D)  # output [ROWS, D]
        q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        keys = gl.arange(0, BM, layout=gl.SliceLayout(0, s_layout))
        out_buf = out_bufs.index(WG)
        if FORM == 2:  # q as the scores' shared-memory operand: its slot is held until the item's last scores
            QS: gl.constexpr = q_bufs.type.shape[0]
            first = gl.program_id(0)
            # >= 1 block: the launcher's grid is at most n_items (a program without items would wait forever below)
            total = (n_items - first + gl.num_programs(0) - 1) // gl.num_programs(0) * key_blocks
            item = first
            mbarrier.wait(q_ready.index(0), 0)
            mbarrier.wait(kv_ready.index(0), 0)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(_scores(_q_rows(q_bufs.index(0), WG),
                                                                         k_bufs.index(0).reshape([BM, D]), s_layout), ))
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
                nxt = _scores(_q_rows(q_bufs.index(qs), WG), k_bufs.index(nxt_slot).reshape([BM, D]), s_layout)
                p, m, l, alpha = _online_softmax(scores, m, l, qk_scale)
                o = _accumulate(o, p, alpha, v_bufs.index(t % KS).reshape([BM, D]), o_layout, p_operand)
                scores, o = warpgroup_mma_wait(num_outstanding=0, deps=(nxt, o))
                mbarrier.arrive(kv_empty.index(t % KS), count=1)  # both of the slot's reads are complete
                if j == key_blocks - 1:  # block t + 1 was its item's last scores
                    _release_q(q_empty.index(qs))
                if last:
                    _store_out(o, l, out_desc, out_buf, item, q_tiles, heads, WG, o_layout)
                    item += gl.num_programs(0)
                    m = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
                    l = gl.zeros([ROWS], gl.float32, layout=row_layout)
                    o = gl.zeros((ROWS, D), dtype=gl.float32, layout=o_layout)
            # the stream's last block: the last item's last
            scores = _mask_last(scores, key_blocks - 1, seq_len, keys)
            p, m, l, alpha = _online_softmax(scores, m, l, qk_scale)
            o = _accumulate(o, p, alpha, v_bufs.index((total - 1) % KS).reshape([BM, D]), o_layout, p_operand)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            mbarrier.arrive(kv_empty.index((total - 1) % KS), count=1)
            _store_out(o, l, out_desc, out_buf, item, q_tiles, heads, WG, o_layout)
        else:
            it = 0
            kv = 0
            for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
                q = _load_q(q_bufs, q_ready, q_empty, it, WG, q_layout, q_operand)
                m = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
                l = gl.zeros([ROWS], gl.float32, layout=row_layout)
                o = gl.zeros((ROWS, D), dtype=gl.float32, layout=o_layout)
                if FORM == 1:
                    s = kv % KS
                    mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                    scores = _scores(q, k_bufs.index(s).reshape([BM, D]), s_layout)
                    scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
                    for j in range(1, key_blocks):  # blocks 0 .. key_blocks - 2 are whole: no mask
                        prev = s
                        kv += 1
                        s = kv % KS
                        mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                        nxt = _scores(q, k_bufs.index(s).reshape([BM, D]), s_layout)
                        p, m, l, alpha = _online_softmax(scores, m, l, qk_scale)
                        o = _accumulate(o, p, alpha, v_bufs.index(prev).reshape([BM, D]), o_layout, p_operand)
                        scores, o = warpgroup_mma_wait(num_outstanding=0, deps=(nxt, o))
                        mbarrier.arrive(kv_empty.index(prev), count=1)  # both of the slot's reads are complete
                    scores = _mask_last(scores, key_blocks - 1, seq_len, keys)
                    p, m, l, alpha = _online_softmax(scores, m, l, qk_scale)
                    o = _accumulate(o, p, alpha, v_bufs.index(s).reshape([BM, D]), o_layout, p_operand)
                    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
                    mbarrier.arrive(kv_empty.index(s), count=1)
                    kv += 1
                else:
                    for j in range(key_blocks):
                        s = kv % KS
                        mbarrier.wait(kv_ready.index(s), (kv // KS) & 1)
                        scores = _scores(q, k_bufs.index(s).reshape([BM, D]), s_layout)
                        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
                        if j == key_blocks - 1:
                            scores = _mask_last(scores, j, seq_len, keys)
                        p, m, l, alpha = _online_softmax(scores, m, l, qk_scale)
                        o = _accumulate(o, p, alpha, v_bufs.index(s).reshape([BM, D]), o_layout, p_operand)
                        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
                        mbarrier.arrive(kv_empty.index(s), count=1)  # both of the slot's reads are complete
                        kv += 1
                _store_out(o, l, out_desc, out_buf, item, q_tiles, heads, WG, o_layout)
                it += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(form: str = "stream"):
        """The kernel in one of ``FORMS`` (``_consume``; built on first use so that importing needs
        no Gluon compile)."""
        FORM = gl.constexpr(FORMS.index(form))

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            @gluon.jit
            def consume(desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty,
                        n_items, q_tiles, heads, key_blocks, seq_len, qk_scale):
                _consume(out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items,
                         q_tiles, heads, key_blocks, seq_len, qk_scale, WG, FORM)

            return consume

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty,
                     n_items, q_tiles, heads, key_blocks, seq_len, qk_scale):
            _produce(desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items, q_tiles, heads,
                     key_blocks)

        @gluon.jit
        def attention_kernel(desc, out_desc, n_items, q_tiles, heads, key_blocks, seq_len, qk_scale,
                             Q_SLOTS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = desc.dtype
            q_bufs = gl.allocate_shared_memory(dtype, [Q_SLOTS] + desc.block_type.shape, desc.layout)
            k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + desc.block_type.shape, desc.layout)
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + desc.block_type.shape, desc.layout)
            out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
            q_ready = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
            q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
            kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(Q_SLOTS):
                mbarrier.init(q_ready.index(i), count=1)
                mbarrier.init(q_empty.index(i), count=2)  # both consumer warpgroups have read their rows
            for i in gl.static_range(STAGES):
                mbarrier.init(kv_ready.index(i), count=1)
                mbarrier.init(kv_empty.index(i), count=2)  # both consumer warpgroups release each stage
            args = (desc, out_desc, q_bufs, k_bufs, v_bufs, out_bufs, q_ready, q_empty, kv_ready, kv_empty, n_items,
                    q_tiles, heads, key_blocks, seq_len, qk_scale)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 24])

        return attention_kernel


def descriptors(qkv: torch.Tensor, out: torch.Tensor) -> tuple:
    """qkv's [batch, seq, 3 * heads * 64] view in [1, BLOCK, 64] boxes (q tiles, k and v blocks) and
    out's [batch, seq, heads * 64] view in [1, BLOCK / 2, 64] boxes (a warpgroup's rows)."""
    batch, seq = qkv.shape[:2]
    return (_desc(qkv.view(batch, seq, -1), [1, BLOCK, HEAD_DIM]),
            _desc(out.view(batch, seq, -1), [1, BLOCK // 2, HEAD_DIM]))


def attention_forward(qkv: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """out [batch, seq, heads, 64] = softmax(q k^T / 8) v of qkv's q, k, v heads (see the module
    docstring); the caller checks ``supported``. ``programs``: the persistent grid (default one
    program per SM)."""
    from hrm_kernels.precompile import launch

    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    out = torch.empty((batch, seq, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    q_tiles = -(-seq // BLOCK)
    n_items = batch * heads * q_tiles
    grid = persistent_grid(programs, n_items, qkv.device, "attention (Gluon)")
    if STAGES < 2:  # the pipelined form holds two key blocks at once
        raise ValueError(f"attention (Gluon): STAGES must be at least 2, got {STAGES}")
    launch(_kernel(DEFAULT_FORM), grid, *descriptors(qkv, out), n_items, q_tiles, heads, q_tiles, seq,
           math.log2(math.e) / math.sqrt(head_dim), Q_SLOTS=Q_SLOTS, STAGES=STAGES,
           CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return out
