"""``rope_attention``'s forward for short sequences (HRM's Sudoku: 82 tokens, head_dim
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
import triton

from hrm_kernels._gluon_gemm import _HAVE_GLUON, available

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from hrm_kernels._gluon_gemm import _accumulator_layout

BLOCK = 128  # positions a tile (queries and keys): sequences up to this length
HEAD_DIM = 64
SLOTS = 3  # 48 KiB a slot (q and k halves, v) + two 8 KiB output tiles
CONSUMER_REGISTERS = 232


def supported(qkv: torch.Tensor, cos, sin) -> bool:
    """The kernel takes these arguments (see the module docstring)."""
    if not (available(qkv.device) and qkv.dtype in (torch.bfloat16, torch.float16) and qkv.dim() == 4):
        return False
    batch, seq, three_heads, head_dim = qkv.shape
    if not (1 <= seq <= BLOCK and head_dim == HEAD_DIM and three_heads >= 3 and three_heads % 3 == 0 and batch >= 1
            and qkv.is_contiguous() and qkv.data_ptr() % 16 == 0):
        return False
    if cos is None:
        return sin is None
    return (sin is not None and sin.stride() == cos.stride()
            and all(t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] >= seq and t.shape[1] == HEAD_DIM // 2
                    and t.stride(1) == 1 for t in (cos, sin)))


if _HAVE_GLUON:

    @gluon.jit
    def _produce(half_desc, full_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, ready, empty, n_items, heads):
        """The producer warp: per item its q and k halves and v into the next free slot."""
        S: gl.constexpr = q1_bufs.type.shape[0]
        HALF: gl.constexpr = half_desc.block_type.shape[2]
        NBYTES: gl.constexpr = 4 * half_desc.block_type.nbytes + full_desc.block_type.nbytes
        step = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b = item // heads
            h = item % heads
            s = step % S
            mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), NBYTES)
            q_col = h * 2 * HALF
            k_col = (heads + h) * 2 * HALF
            tma.async_copy_global_to_shared(half_desc, [b, 0, q_col], ready.index(s), q1_bufs.index(s))
            tma.async_copy_global_to_shared(half_desc, [b, 0, q_col + HALF], ready.index(s), q2_bufs.index(s))
            tma.async_copy_global_to_shared(half_desc, [b, 0, k_col], ready.index(s), k1_bufs.index(s))
            tma.async_copy_global_to_shared(half_desc, [b, 0, k_col + HALF], ready.index(s), k2_bufs.index(s))
            tma.async_copy_global_to_shared(full_desc, [b, 0, (2 * heads + h) * 2 * HALF], ready.index(s),
                                            v_bufs.index(s))
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

            @gluon.jit
            def consume(half_desc, full_desc, out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready,
                        empty, k_done, cos, sin, stride_t, lse, n_items, heads, seq_len, qk_scale):
                _consume(out_desc, q1_bufs, q2_bufs, k1_bufs, k2_bufs, v_bufs, out_bufs, ready, empty, k_done, cos,
                         sin, stride_t, lse, n_items, heads, seq_len, qk_scale, ROPE, STORE_LSE, WG)

            return consume

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


def _desc(t: torch.Tensor, box: list[int]):
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dtype))


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
    if programs is None:
        programs = torch.cuda.get_device_properties(qkv.device).multi_processor_count
    if programs < 1:
        raise ValueError(f"rope_attention (Gluon): programs must be at least 1, got {programs}")
    launch(_kernel(cos is not None, with_lse), (min(programs, n_items),), *descriptors(qkv, out),
           cos if cos is not None else qkv, sin if sin is not None else qkv, cos.stride(0) if cos is not None else 0,
           lse, n_items, heads, seq,
           math.log2(math.e) / math.sqrt(head_dim), SLOTS=SLOTS, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return (out, lse) if with_lse else out
