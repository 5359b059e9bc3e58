"""``rope_attention``'s forward and backward for short sequences (HRM's Sudoku: 82 tokens, head_dim
64) as a warp-specialised, persistent Gluon kernel for Hopper::

    q', k' = rope(q), rope(k)                      fp32 rotation, rounded to qkv's dtype
    out    = softmax(q' k'^T / sqrt(64)) v          per (batch, head); every key in one tile

A program walks (batch, head) items. A producer warp loads each item's q and k as two [128, 32]
halves and v as [128, 64] (TMA boxes of a [batch, seq, 3 * heads * 64] view: positions past the
sequence load as zeros) into one of ``SLOTS`` shared-memory slots. Two consumer warpgroups take 64
query rows each: each rotates its 64 rows of k in place (the halves make rotate-half RoPE
elementwise) and of q in registers, they meet on a barrier, then ``s = q1' k1'^T + q2' k2'^T`` (q
as the register operand), the softmax over the keys in registers (past the sequence masked), ``o =
p v`` (p as the register operand), and ``o / l`` leaves by TMA (rows past the sequence clipped);
with ``with_lse`` (calls with a gradient) each query's log2-sum-exp2 too, for the Triton backward.

The backward (``rope_attention_backward``), per item, with every query and key in one tile; consumer
warpgroup w owns keys (and, for dq, queries) [64 w, 64 w + 64)::

    q', k' rotated in place (each warpgroup its rows); delta = rowsum(do * out) (each its queries)
    sT    = k'_w q'^T;   pT = exp2(sT * qk_scale - lse)        [64 keys, 128 queries], 0 past seq
    dv_w  = pT @ do;     dpT = v_w @ do^T;   dsT = round(pT * (dpT - delta))
    dk_w  = rope^T(dsT @ q' / sqrt(64))                        (dsT the register operand)
    dsT into shared memory, a barrier;  dq_w = rope^T(ds[queries w] @ k' / sqrt(64))

Session 29: written and compiled for sm_90 (Triton 3.6 and 3.8), NOT RUN ON A GPU; behind
``rope_attention.USE_GLUON`` (off). Why: the Triton kernel took 174 us a call in the gated Sudoku
training step on an H100 (47 calls, 8.2 ms a step), where cuDNN takes ~103 us on pre-rotated q, k
and the traffic (q, k, v read, out written: 258 MB) allows ~90 us. Requirements (``supported``):
Hopper, bf16/fp16 qkv [batch, seq <= 128, 3 * heads, 64] contiguous, half tables [positions >= seq,
32] fp32 with contiguous rows, one row stride for both (the model's views of its full tables; or
no rotation), 16-byte aligned qkv.
"""

from __future__ import annotations

import functools
import math

import torch

from hrm_kernels import _gluon_attention
from hrm_kernels._gluon_gemm import _HAVE_GLUON, _describe as _desc, persistent_grid

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

    from hrm_kernels._gluon_gemm import _accumulator_layout, warpgroup_jit

BLOCK = 128  # positions a tile (queries and keys): sequences up to this length
HEAD_DIM = 64
SLOTS = 3  # 48 KiB a slot (q and k halves, v) + two 8 KiB output tiles
BACKWARD_SLOTS = 2  # 80 KiB a slot (q, k halves, v, out, dout) + ds^T 32 KiB + outputs 32 KiB: 225.5 KiB
CONSUMER_REGISTERS = 232


def supported(qkv: torch.Tensor, cos, sin) -> bool:
    """The kernel takes these arguments (see the module docstring): a qkv the long-sequence kernel
    takes (``_gluon_attention.supported``) of at most BLOCK positions, and tables it reads."""
    if not (_gluon_attention.supported(qkv) and qkv.shape[1] <= BLOCK):
        return False
    if cos is None:
        return sin is None
    return (sin is not None and sin.stride() == cos.stride()
            and all(t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] >= qkv.shape[1] and t.shape[1] == HEAD_DIM // 2
                    and t.stride(1) == 1 for t in (cos, sin)))


if _HAVE_GLUON:

    @gluon.jit
    def _load_qkv(half_desc, full_desc, q1_buf, q2_buf, k1_buf, k2_buf, v_buf, bar, b, h, heads):
        """Item (b, h)'s q and k halves [1, BLOCK, 32] and v [1, BLOCK, 64] by TMA, counted on ``bar``."""
        HALF: gl.constexpr = half_desc.block_type.shape[2]
        q_col = h * 2 * HALF
        k_col = (heads + h) * 2 * HALF
        tma.async_copy_global_to_shared(half_desc, [b, 0, q_col], bar, q1_buf)
        tma.async_copy_global_to_shared(half_desc, [b, 0, q_col + HALF], bar, q2_buf)
        tma.async_copy_global_to_shared(half_desc, [b, 0, k_col], bar, k1_buf)
        tma.async_copy_global_to_shared(half_desc, [b, 0, k_col + HALF], bar, k2_buf)
        tma.async_copy_global_to_shared(full_desc, [b, 0, (2 * heads + h) * 2 * HALF], bar, v_buf)

    @gluon.jit
    def _produce(half_desc, full_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, ready, empty, n_items, heads):
        """The producer warp: per item its q and k halves and v into the next free slot."""
        S: gl.constexpr = q1_bufs.type.shape[0]
        NBYTES: gl.constexpr = 4 * half_desc.block_type.nbytes + full_desc.block_type.nbytes
        step = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b = item // heads
            h = item % heads
            s = step % S
            mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), NBYTES)
            _load_qkv(half_desc, full_desc, q1_bufs.index(s), q2_bufs.index(s), k1_bufs.index(s), k2_bufs.index(s),
                      v_bufs.index(s), ready.index(s), b, h, heads)
            step += 1

    @gluon.jit
    def _rotate(x1, x2, c, s, dtype: gl.constexpr):
        """Rotate-half RoPE of the halves (fp32 math, rounded to ``dtype``)."""
        x1 = x1.to(gl.float32)
        x2 = x2.to(gl.float32)
        return (x1 * c - x2 * s).to(dtype), (x2 * c + x1 * s).to(dtype)

    @gluon.jit
    def _consume(out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready, empty, k_done, cos, sin,
                 stride_t, lse, n_items, heads, seq_len, qk_scale, ROPE: gl.constexpr, STORE_LSE: gl.constexpr,
                 WG: gl.constexpr):
        """Consumer warpgroup ``WG``: query (and key) rows [64 WG, 64 WG + 64) of every item."""
        S: gl.constexpr = q1_bufs.type.shape[0]
        BM: gl.constexpr = q1_bufs.type.shape[2]
        HALF: gl.constexpr = q1_bufs.type.shape[3]
        ROWS: gl.constexpr = BM // 2
        dtype: gl.constexpr = out_desc.dtype
        half_layout: gl.constexpr = _accumulator_layout(HALF)  # [ROWS, HALF] tiles in registers
        s_layout: gl.constexpr = _accumulator_layout(BM)  # scores [ROWS, BM]
        o_layout: gl.constexpr = _accumulator_layout(2 * HALF)  # output [ROWS, 64]
        q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows = WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, half_layout))
        cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, half_layout))
        t_off = gl.expand_dims(rows * stride_t, 1) + gl.expand_dims(cols, 0)
        t_mask = gl.expand_dims(rows < seq_len, 1)
        if ROPE:  # the tables of this warpgroup's positions, the same for every item
            c = gl.load(cos + t_off, mask=t_mask, other=0.0)
            sn = gl.load(sin + t_off, mask=t_mask, other=0.0)
        keys = gl.arange(0, BM, layout=gl.SliceLayout(0, s_layout))
        key_bias = gl.expand_dims(gl.where(keys < seq_len, 0.0, float("-inf")), 0)
        out_buf = out_bufs.index(WG)
        step = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            s = step % S
            phase = (step // S) & 1
            mbarrier.wait(ready.index(s), phase)
            k1v = k1_bufs.index(s).reshape([BM, HALF])  # (the TMA box's leading 1 dropped)
            k2v = k2_bufs.index(s).reshape([BM, HALF])
            q1 = q1_bufs.index(s).reshape([BM, HALF]).slice(WG * ROWS, ROWS, dim=0).load(half_layout)
            q2 = q2_bufs.index(s).reshape([BM, HALF]).slice(WG * ROWS, ROWS, dim=0).load(half_layout)
            if ROPE:  # this warpgroup's key rows, rotated in place for both warpgroups' products
                k1 = k1v.slice(WG * ROWS, ROWS, dim=0).load(half_layout)
                k2 = k2v.slice(WG * ROWS, ROWS, dim=0).load(half_layout)
                k1, k2 = _rotate(k1, k2, c, sn, dtype)
                k1v.slice(WG * ROWS, ROWS, dim=0).store(k1)
                k2v.slice(WG * ROWS, ROWS, dim=0).store(k2)
                q1, q2 = _rotate(q1, q2, c, sn, dtype)
            fence_async_shared()  # the rotated keys for the wgmmas; the q reads before the slot's release
            if ROPE:
                mbarrier.arrive(k_done.index(s), count=1)
                mbarrier.wait(k_done.index(s), phase)  # both halves of k rotated
            scores = warpgroup_mma(gl.convert_layout(q1, q_operand), k1v.permute((1, 0)),
                                   gl.zeros((ROWS, BM), dtype=gl.float32, layout=s_layout), use_acc=False,
                                   is_async=True)
            scores = warpgroup_mma(gl.convert_layout(q2, q_operand), k2v.permute((1, 0)), scores, is_async=True)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
            scores = scores * qk_scale + key_bias  # base 2; keys past the sequence -inf
            m = gl.max(scores, axis=1)
            p = gl.exp2(scores - gl.expand_dims(m, 1))
            l = gl.sum(p, axis=1)
            if STORE_LSE:  # what the backward recomputes the probabilities from (the Triton kernel's LSE)
                q_rows = WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
                gl.store(lse + item.to(gl.int64) * seq_len + q_rows, m + gl.log2(l), mask=q_rows < seq_len)
            o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_operand), v_bufs.index(s).reshape([BM, 2 * HALF]),
                              gl.zeros((ROWS, 2 * HALF), dtype=gl.float32, layout=o_layout), use_acc=False,
                              is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            mbarrier.arrive(empty.index(s), count=1)  # every read of the slot is complete (and fenced)
            o = o / gl.expand_dims(gl.convert_layout(l, gl.SliceLayout(1, o_layout)), 1)
            tma.store_wait(pendings=0)  # this warpgroup's previous output has left out_buf
            out_buf.reshape([ROWS, 2 * HALF]).store(o.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [item // heads, WG * ROWS, (item % heads) * 2 * HALF], out_buf)
            step += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(rope: bool, store_lse: bool = False):
        """The kernel with or without rotation, and writing each query's log2-sum-exp2 or not."""
        ROPE = gl.constexpr(rope)
        STORE_LSE = gl.constexpr(store_lse)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(half_desc, full_desc, out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready,
                        empty, k_done, cos, sin, stride_t, lse, n_items, heads, seq_len, qk_scale):
                _consume(out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready, empty, k_done, cos,
                         sin, stride_t, lse, n_items, heads, seq_len, qk_scale, ROPE, STORE_LSE, WG)

            return warpgroup_jit(consume, wg)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(half_desc, full_desc, out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready,
                     empty, k_done, cos, sin, stride_t, lse, n_items, heads, seq_len, qk_scale):
            _produce(half_desc, full_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, ready, empty, n_items, heads)

        @gluon.jit
        def rope_attention_kernel(half_desc, full_desc, out_desc, cos, sin, stride_t, lse, n_items, heads, seq_len,
                                  qk_scale, SLOTS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = half_desc.dtype
            q1_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            q2_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            k1_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            k2_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            v_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + full_desc.block_type.shape, full_desc.layout)
            out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            k_done = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(SLOTS):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each slot
                mbarrier.init(k_done.index(i), count=2)  # both have rotated their key rows
            args = (half_desc, full_desc, out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready, empty,
                    k_done, cos, sin, stride_t, lse, n_items, heads, seq_len, qk_scale)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return rope_attention_kernel


    # ------------------------------------------------------------------ the backward

    @gluon.jit
    def _produce_backward(half_desc, full_desc, o_desc, do_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, o_bufs,
                          do_bufs, ready, empty, n_items, heads):
        """The backward's producer warp: per item its q and k halves, v, out and dout into the next slot."""
        S: gl.constexpr = q1_bufs.type.shape[0]
        HALF: gl.constexpr = half_desc.block_type.shape[2]
        NBYTES: gl.constexpr = 4 * half_desc.block_type.nbytes + 3 * full_desc.block_type.nbytes
        step = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b = item // heads
            h = item % heads
            s = step % S
            mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), NBYTES)
            _load_qkv(half_desc, full_desc, q1_bufs.index(s), q2_bufs.index(s), k1_bufs.index(s), k2_bufs.index(s),
                      v_bufs.index(s), ready.index(s), b, h, heads)
            tma.async_copy_global_to_shared(o_desc, [b, 0, h * 2 * HALF], ready.index(s), o_bufs.index(s))
            tma.async_copy_global_to_shared(do_desc, [b, 0, h * 2 * HALF], ready.index(s), do_bufs.index(s))
            step += 1


    @gluon.jit
    def _consume_backward(half_desc, dhalf_desc, dfull_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, o_bufs, do_bufs,
                          ds_buf, dh_bufs, dv_bufs, delta_bufs, ready, empty, rot_done, ds_done, ds_free, cos, sin, stride_t,
                          lse, n_items, heads, seq_len, qk_scale, sm_scale, ROPE: gl.constexpr, WG: gl.constexpr):
        """The backward's consumer warpgroup ``WG`` (see the module docstring)."""
        S: gl.constexpr = q1_bufs.type.shape[0]
        BM: gl.constexpr = q1_bufs.type.shape[2]
        HALF: gl.constexpr = q1_bufs.type.shape[3]
        ROWS: gl.constexpr = BM // 2
        dtype: gl.constexpr = half_desc.dtype
        half_layout: gl.constexpr = _accumulator_layout(HALF)  # [ROWS, HALF]
        t_layout: gl.constexpr = _accumulator_layout(BM)  # [ROWS keys, BM queries]
        d_layout: gl.constexpr = _accumulator_layout(2 * HALF)  # [ROWS, 64]
        op_d: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)  # A of pT do
        op_h: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=half_layout, k_width=2)  # A of dsT q'
        row_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # o, do rows for delta
        rows = WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, half_layout))
        cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, half_layout))
        t_mask = gl.expand_dims(rows < seq_len, 1)
        if ROPE:  # the tables of this warpgroup's positions (its keys, and its queries for dq)
            t_off = gl.expand_dims(rows * stride_t, 1) + gl.expand_dims(cols, 0)
            c = gl.load(cos + t_off, mask=t_mask, other=0.0)
            sn = gl.load(sin + t_off, mask=t_mask, other=0.0)
        keys = WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, t_layout))
        queries = gl.arange(0, BM, layout=gl.SliceLayout(0, t_layout))
        valid = gl.expand_dims(keys < seq_len, 1) & gl.expand_dims(queries < seq_len, 0)
        dh1_buf = dh_bufs.index(2 * WG)  # [1, ROWS, HALF]: dk's first half, then dq's
        dh2_buf = dh_bufs.index(2 * WG + 1)
        dv_buf = dv_bufs.index(WG)
        step = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b = item // heads
            h = item % heads
            s = step % S
            phase = (step // S) & 1
            mbarrier.wait(ready.index(s), phase)
            q1v = q1_bufs.index(s).reshape([BM, HALF])
            q2v = q2_bufs.index(s).reshape([BM, HALF])
            k1v = k1_bufs.index(s).reshape([BM, HALF])
            k2v = k2_bufs.index(s).reshape([BM, HALF])
            # delta = rowsum(do * o) of this warpgroup's queries, shared with the other through shared memory
            o = o_bufs.index(s).reshape([BM, 2 * HALF]).slice(WG * ROWS, ROWS, dim=0).load(row_layout).to(gl.float32)
            do = do_bufs.index(s).reshape([BM, 2 * HALF]).slice(WG * ROWS, ROWS, dim=0).load(row_layout).to(gl.float32)
            delta_bufs.index(s).slice(WG * ROWS, ROWS, dim=0).store(gl.sum(o * do, axis=1))
            if ROPE:  # this warpgroup's rows of q and k, rotated in place for both warpgroups' products
                q1, q2 = _rotate(q1v.slice(WG * ROWS, ROWS, dim=0).load(half_layout),
                                 q2v.slice(WG * ROWS, ROWS, dim=0).load(half_layout), c, sn, dtype)
                q1v.slice(WG * ROWS, ROWS, dim=0).store(q1)
                q2v.slice(WG * ROWS, ROWS, dim=0).store(q2)
                k1, k2 = _rotate(k1v.slice(WG * ROWS, ROWS, dim=0).load(half_layout),
                                 k2v.slice(WG * ROWS, ROWS, dim=0).load(half_layout), c, sn, dtype)
                k1v.slice(WG * ROWS, ROWS, dim=0).store(k1)
                k2v.slice(WG * ROWS, ROWS, dim=0).store(k2)
            fence_async_shared()  # rotated rows for the wgmmas; every register read of the slot before its release
            mbarrier.arrive(rot_done.index(s), count=1)  # (both halves of q, k rotated and of delta written)
            mbarrier.wait(rot_done.index(s), phase)
            st = warpgroup_mma(k1v.slice(WG * ROWS, ROWS, dim=0), q1v.permute((1, 0)),
                               gl.zeros((ROWS, BM), dtype=gl.float32, layout=t_layout), use_acc=False, is_async=True)
            st = warpgroup_mma(k2v.slice(WG * ROWS, ROWS, dim=0), q2v.permute((1, 0)), st, is_async=True)
            st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
            lse_q = gl.load(lse + item.to(gl.int64) * seq_len + queries, mask=queries < seq_len, other=0.0)
            pt = gl.where(valid, gl.exp2(st * qk_scale - gl.expand_dims(lse_q, 0)), 0.0)
            do_v = do_bufs.index(s).reshape([BM, 2 * HALF])
            dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_d), do_v,
                               gl.zeros((ROWS, 2 * HALF), dtype=gl.float32, layout=d_layout), use_acc=False, is_async=True)
            dv = warpgroup_mma_wait(num_outstanding=0, deps=(dv, ))
            tma.store_wait(pendings=0)  # this warpgroup's previous outputs have left its buffers
            dv_buf.reshape([ROWS, 2 * HALF]).store(dv.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dfull_desc, [b, WG * ROWS, (2 * heads + h) * 2 * HALF], dv_buf)
            dpt = warpgroup_mma(v_bufs.index(s).reshape([BM, 2 * HALF]).slice(WG * ROWS, ROWS, dim=0), do_v.permute((1, 0)),
                                gl.zeros((ROWS, BM), dtype=gl.float32, layout=t_layout), use_acc=False, is_async=True)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt, ))
            delta = delta_bufs.index(s).load(gl.SliceLayout(0, t_layout))
            dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)  # [ROWS keys, BM queries]
            dk1 = warpgroup_mma(gl.convert_layout(dst, op_h), q1v, gl.zeros((ROWS, HALF), dtype=gl.float32,
                                layout=half_layout), use_acc=False, is_async=True)
            dk2 = warpgroup_mma(gl.convert_layout(dst, op_h), q2v, gl.zeros((ROWS, HALF), dtype=gl.float32,
                                layout=half_layout), use_acc=False, is_async=True)
            # dsT into shared memory for dq, once both warpgroups' dq of the previous item have read it
            mbarrier.wait(ds_free, (step & 1) ^ 1)
            ds_buf.slice(WG * ROWS, ROWS, dim=0).store(dst)
            fence_async_shared()
            mbarrier.arrive(ds_done, count=1)
            dk1, dk2 = warpgroup_mma_wait(num_outstanding=0, deps=(dk1, dk2))
            dk1 = dk1 * sm_scale
            dk2 = dk2 * sm_scale
            if ROPE:
                dk1, dk2 = _rotate(dk1, dk2, c, -sn, dtype)  # the transpose: the opposite angle
            dh1_buf.reshape([ROWS, HALF]).store(dk1.to(dtype))  # (the store_wait above covers these buffers too)
            dh2_buf.reshape([ROWS, HALF]).store(dk2.to(dtype))
            fence_async_shared()
            k_col = (heads + h) * 2 * HALF
            tma.async_copy_shared_to_global(dhalf_desc, [b, WG * ROWS, k_col], dh1_buf)
            tma.async_copy_shared_to_global(dhalf_desc, [b, WG * ROWS, k_col + HALF], dh2_buf)
            # dq of this warpgroup's queries: ds[rows] @ k' over every key
            mbarrier.wait(ds_done, step & 1)
            ds_rows = ds_buf.slice(WG * ROWS, ROWS, dim=1).permute((1, 0))  # [ROWS queries, BM keys]
            dq1 = warpgroup_mma(ds_rows, k1v, gl.zeros((ROWS, HALF), dtype=gl.float32, layout=half_layout), use_acc=False,
                                is_async=True)
            dq2 = warpgroup_mma(ds_rows, k2v, gl.zeros((ROWS, HALF), dtype=gl.float32, layout=half_layout), use_acc=False,
                                is_async=True)
            dq1, dq2 = warpgroup_mma_wait(num_outstanding=0, deps=(dq1, dq2))
            mbarrier.arrive(ds_free, count=1)
            mbarrier.arrive(empty.index(s), count=1)  # every read of the slot is complete (register reads fenced)
            dq1 = dq1 * sm_scale
            dq2 = dq2 * sm_scale
            if ROPE:
                dq1, dq2 = _rotate(dq1, dq2, c, -sn, dtype)
            tma.store_wait(pendings=0)
            dh1_buf.reshape([ROWS, HALF]).store(dq1.to(dtype))
            dh2_buf.reshape([ROWS, HALF]).store(dq2.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dhalf_desc, [b, WG * ROWS, h * 2 * HALF], dh1_buf)
            tma.async_copy_shared_to_global(dhalf_desc, [b, WG * ROWS, h * 2 * HALF + HALF], dh2_buf)
            step += 1
        tma.store_wait(pendings=0)


    @functools.lru_cache(maxsize=None)
    def _backward_kernel(rope: bool):
        ROPE = gl.constexpr(rope)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(half_desc, full_desc, o_desc, do_desc, dhalf_desc, dfull_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs,
                        o_bufs, do_bufs, ds_buf, dh_bufs, dv_bufs, delta_bufs, ready, empty, rot_done, ds_done, ds_free, cos, sin,
                        stride_t, lse, n_items, heads, seq_len, qk_scale, sm_scale):
                _consume_backward(half_desc, dhalf_desc, dfull_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, o_bufs, do_bufs,
                         ds_buf, dh_bufs, dv_bufs, delta_bufs, ready, empty, rot_done, ds_done, ds_free, cos, sin, stride_t, lse,
                         n_items, heads, seq_len, qk_scale, sm_scale, ROPE, WG)

            return warpgroup_jit(consume, wg)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(half_desc, full_desc, o_desc, do_desc, dhalf_desc, dfull_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs,
                     o_bufs, do_bufs, ds_buf, dh_bufs, dv_bufs, delta_bufs, ready, empty, rot_done, ds_done, ds_free, cos, sin,
                     stride_t, lse, n_items, heads, seq_len, qk_scale, sm_scale):
            _produce_backward(half_desc, full_desc, o_desc, do_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, o_bufs, do_bufs, ready,
                     empty, n_items, heads)

        @gluon.jit
        def rope_attention_backward_kernel(half_desc, full_desc, o_desc, do_desc, dhalf_desc, dfull_desc, cos, sin, stride_t, lse,
                                           n_items, heads, seq_len, qk_scale, sm_scale, SLOTS: gl.constexpr,
                                           CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = half_desc.dtype
            BM: gl.constexpr = half_desc.block_type.shape[1]
            q1_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            q2_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            k1_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            k2_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + half_desc.block_type.shape, half_desc.layout)
            v_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + full_desc.block_type.shape, full_desc.layout)
            o_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + full_desc.block_type.shape, full_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [SLOTS] + full_desc.block_type.shape, full_desc.layout)
            ds_buf = gl.allocate_shared_memory(dtype, [BM, BM], gl.NVMMASharedLayout.get_default_for([BM, BM], dtype))
            dh_bufs = gl.allocate_shared_memory(dtype, [4] + dhalf_desc.block_type.shape, dhalf_desc.layout)
            dv_bufs = gl.allocate_shared_memory(dtype, [2] + dfull_desc.block_type.shape, dfull_desc.layout)
            delta_bufs = gl.allocate_shared_memory(gl.float32, [SLOTS, BM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
            ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            rot_done = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
            ds_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(SLOTS):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)
                mbarrier.init(rot_done.index(i), count=2)
            mbarrier.init(ds_bars.index(0), count=2)  # both halves of dsT written
            mbarrier.init(ds_bars.index(1), count=2)  # both warpgroups' dq read dsT
            args = (half_desc, full_desc, o_desc, do_desc, dhalf_desc, dfull_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs,
                    o_bufs, do_bufs, ds_buf, dh_bufs, dv_bufs, delta_bufs, ready, empty, rot_done, ds_bars.index(0), ds_bars.index(1),
                    cos, sin, stride_t, lse, n_items, heads, seq_len, qk_scale, sm_scale)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return rope_attention_backward_kernel

def descriptors(qkv: torch.Tensor, out: torch.Tensor) -> tuple:
    """qkv's [batch, seq, 3 * heads * 64] view in [1, BLOCK, 32] (q, k halves) and [1, BLOCK, 64] (v)
    boxes, and out's [batch, seq, heads * 64] view in [1, BLOCK / 2, 64] boxes."""
    batch, seq = qkv.shape[:2]
    flat = qkv.view(batch, seq, -1)
    return (_desc(flat, [1, BLOCK, HEAD_DIM // 2]), _desc(flat, [1, BLOCK, HEAD_DIM]),
            _desc(out.view(batch, seq, -1), [1, BLOCK // 2, HEAD_DIM]))


def rope_attention_forward(qkv: torch.Tensor, cos, sin, programs: int | None = None, with_lse: bool = False):
    """out [batch, seq, heads, 64] (see the module docstring), or ``(out, lse)`` with ``with_lse``
    (lse [batch * heads, seq] fp32, base 2: ``rope_attention``'s backward reads it); the caller checks
    ``supported``. ``programs``: the persistent grid (default one program per SM)."""
    from hrm_kernels.precompile import launch

    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    out = torch.empty((batch, seq, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    n_items = batch * heads
    lse = torch.empty((n_items, seq), dtype=torch.float32, device=qkv.device) if with_lse else out
    launch(_kernel(cos is not None, with_lse), persistent_grid(programs, n_items, qkv.device, "rope_attention (Gluon)"),
           *descriptors(qkv, out),
           cos if cos is not None else qkv, sin if sin is not None else qkv, cos.stride(0) if cos is not None else 0,
           lse, n_items, heads, seq,
           math.log2(math.e) / math.sqrt(head_dim), SLOTS=SLOTS, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return (out, lse) if with_lse else out


def backward_supported(qkv: torch.Tensor, cos, sin, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor) -> bool:
    """``rope_attention_backward`` takes these: ``supported``'s conditions, and out, dout
    [batch, seq, heads, 64] contiguous in qkv's dtype, lse [batch * heads, seq] fp32 contiguous."""
    return (supported(qkv, cos, sin) and out.shape == dout.shape == (*qkv.shape[:2], qkv.shape[2] // 3, HEAD_DIM)
            and all(t.dtype == qkv.dtype and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (out, dout))
            and lse.dtype == torch.float32 and lse.is_contiguous()
            and lse.shape == (qkv.shape[0] * (qkv.shape[2] // 3), qkv.shape[1]))


def backward_descriptors(qkv, out, dout, dqkv) -> tuple:
    """q/k halves and v of qkv's [batch, seq, 3 heads 64] view, out's and dout's [batch, seq, heads 64]
    views (whole tiles), and dqkv's in [1, BLOCK / 2, ...] boxes (a warpgroup's rows)."""
    batch, seq = qkv.shape[:2]
    flat, dflat = qkv.view(batch, seq, -1), dqkv.view(batch, seq, -1)
    return (_desc(flat, [1, BLOCK, HEAD_DIM // 2]), _desc(flat, [1, BLOCK, HEAD_DIM]),
            _desc(out.view(batch, seq, -1), [1, BLOCK, HEAD_DIM]), _desc(dout.view(batch, seq, -1), [1, BLOCK, HEAD_DIM]),
            _desc(dflat, [1, BLOCK // 2, HEAD_DIM // 2]), _desc(dflat, [1, BLOCK // 2, HEAD_DIM]))


def rope_attention_backward(qkv: torch.Tensor, cos, sin, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                            programs: int | None = None) -> torch.Tensor:
    """dqkv [batch, seq, 3 * heads, 64] from the forward's out and lse and the output's gradient (the
    Triton ``_rope_attention_backward_kernel``'s math); the caller checks ``backward_supported``."""
    from hrm_kernels.precompile import launch

    batch, seq, three_heads, head_dim = qkv.shape
    heads = three_heads // 3
    dqkv = torch.empty_like(qkv)
    n_items = batch * heads
    launch(_backward_kernel(cos is not None), persistent_grid(programs, n_items, qkv.device,
                                                             "rope_attention backward (Gluon)"),
           *backward_descriptors(qkv, out, dout, dqkv),
           cos if cos is not None else qkv, sin if sin is not None else qkv, cos.stride(0) if cos is not None else 0,
           lse, n_items, heads, seq, math.log2(math.e) / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim),
           SLOTS=BACKWARD_SLOTS, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return dqkv
