"""The gated blend's forward without stats (``hrm_kernels.gated_blend``'s math: the model's
recurrence calls, and with ``store_hidden`` the calls a backward follows) and both phases of its
backward (d_pre1, then the gradients of the sources and weights), as warp-specialised Gluon kernels
for Hopper. The forward::

    pre = round(cat(own, other, inj) @ W1^T + round(b1))         [M, R]
    z   = round(silu(pre))                                          [M, R]
    g   = sigmoid(z @ W2^T + round(b2))                             [M, K*D]  (never in memory)
    out = round(sum_k g_k * src_k)                                  [M, D]

(K = 3 sources, or 2 with ``inj=None``; round: to the activations' dtype; the sigmoid is
``hrm_kernels._math``'s ``tanh.approx`` form, as the Triton kernel's for 2-byte activations.)

Per 128-row tile (one program per SM, tiles dealt round-robin), a producer warp streams through
one ring of ``STAGES`` shared-memory stages first every (source, 64-column) tile with its W1 tile
[R, 64], then, for each 64-column chunk of the output and each source, the source tile again
(now from L2) with its W2 tile [64, R] (the bytes of a W1 tile: the stage's weight buffer is
reinterpreted). Two consumer warpgroups take the tile's two 64-row halves: the hidden GEMM (m64,
n = R wgmma) into z in shared memory, then per chunk and source a [64, 64] logit wgmma from z, the
sigmoid and the blend in registers, the chunk stored by TMA. Each stage's ``empty`` mbarrier counts
both warpgroups' releases.

Why: the Triton kernel holds each program's rows through both GEMMs with a tl.dot pipeline; here
TMA loads run ahead of the tensor cores in their own warp. H100, bf16, GPU us against the Triton
kernel (session 28, measured before the release fence below was added): Sudoku's 62976 rows 174.9
vs 203.1 with inj, 120.8 vs 151.7 with inj=None; ARC's 86496 rows 252.8 vs 287.7 and 173.3 vs
214.2. A gated ARC training step with the fence: 122.2 / 123.0 vs 123.3 / 123.5 ms, GPU time
outside matmuls and attention 15.2 / 15.4 vs 15.7 / 15.7 ms (benchmarks/RESULTS.md; the step
difference is within the noise between runs). With ``store_hidden`` (``gated_blend.USE_GLUON_STORE``,
on: the forward a backward follows, when it has no stats) each consumer also writes its halves of
pre and z by TMA (session 42, H100: 177.3 vs the Triton kernel's 229.3 us at Sudoku with inj, 255.7
vs 327.1 at ARC). Requirements (``supported``): Hopper, bf16/fp16
activations and weights of one dtype (biases any float dtype), D a multiple of 64, R of 64 or
128, contiguous rows, 16-byte aligned pointers, M >= 1. No
interpreter path: CPU tests compile it for sm_90 (``tests/test_compile_for_gpu.py``).

The backward's d_pre1 kernel (``backward_dpre``, persistent; ``gated_blend.USE_GLUON_DPRE``, on;
figures in ``gated_blend``; the second phase is ``backward_main``, below) computes, per
128-row tile::

    g     = sigmoid(z @ W2^T + round(b2))                  per source and 64-column chunk
    dz   += round(dout * src * g * (1 - g)) @ W2_chunk     [64, R] a consumer warpgroup
    dpre  = round(dz * s * (1 + pre * (1 - s))),  s = sigmoid(pre)
    db1_partial[2 * tile + half] = column sums of dpre

(``gated_blend._gated_blend_backward_dpre_kernel``'s math without the saturation term.) The
producer loads z [128, R] into a buffer of its own, then per chunk the dout tile (a ring stage
without a weight) and per source its tile and W2 tile [64, R], which serves both wgmmas: the
logits' (transposed) and d_logit's, whose A operand is the rounded d_logit in registers. Each
consumer loads its pre1 half by TMA into its output buffer at the tile's start.

The backward's second kernel (``backward_main``, ``gated_blend.USE_GLUON_MAIN``, on) takes work
items of one 64-column block of one source and one split of the rows, walked in 64-row tiles (see
``backward_main`` for the math). The producer brings each tile's z and d_pre1 [64, R] once for both
consumer warpgroups, which take the block's two 32-column halves: each runs all four products of
its half as wgmmas with operands in shared memory (the logits', and dW1's product issued together;
then d_src's, started from ``dout * g``, and dW2's from the rounded d_logit it wrote to shared
memory), and keeps its dW1 and dW2^T accumulators [R, 32] in registers over the item. Session 30's
Gluon second phase (commit 56cf018) split the work by product instead (a gate warpgroup handing
``dout * g`` to a weight warpgroup through shared memory, each waiting on every wgmma) and was slower
than the Triton kernel (the whole backward 695.0 against 616.4 us at 62976 x 512, H100); this one
is faster (session 42, H100: 360.5 against 442.6 us at Sudoku, 438.3 against 556.3 at ARC;
``benchmarks/RESULTS.md``). A form with the consumers alternating whole-block tiles (64-wide
products, but [R, 64] accumulators) spilled at 232 registers and was slower (537.8 us at Sudoku);
its odd ring of 3 stages shared by alternate consumers was also unsafe (a consumer skipping a
stage's phases can pass a parity wait early), so it was removed (commit 14215ed has it).

Session 43 tried software-pipelined consumers in all three kernels (the next step's logit wgmma, and
in the second phase the next tile's dW1 wgmma, issued before this step's gates are computed; the
same bits): each was slower (H100, Sudoku with inj: forward with pre1/z 184.8 against 177.0 us,
d_pre1 156.9 against 150.4, second phase 311.3 against 305.7; 0.90-0.98x over both shapes with
and without inj), so they were removed (commit 941696f has them). Carrying a logit accumulator
over a loop's back edge while its wgmma is in flight made ptxas serialize every wgmma of the kernel
(its note C7514, which Triton does not show): ``tests/test_compile_for_gpu.py`` fails a Gluon kernel
on it (``benchmarks.sass.wgmma_serialized``).
"""

from __future__ import annotations

import functools

import torch
import triton

from hrm_kernels._gluon_gemm import _HAVE_GLUON, _describe, available, persistent_grid
from hrm_kernels._utils import num_programs_for

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

    from hrm_kernels._gluon_gemm import _accumulator_layout, narrow, rounded, warpgroup_jit

BLOCK_M = 128  # rows a tile: two warpgroups of 64
CHUNK = 64  # columns of D a k-step (the hidden GEMM) and an output chunk (the logit GEMM and blend)
STAGES = 4  # 176 KiB of shared memory with z and the output buffers (5: 208 KiB)
CONSUMER_REGISTERS = 232
GATE_HIDDEN_SIZES = (64, 128)  # R: the hidden GEMM's accumulator [64, R] is one wgmma's n
DPRE_STAGES = 4  # the backward's d_pre1 ring: 128 KiB, with z, pre1 and d_pre1's buffers 196 KiB (R = 128)
MAIN_TILE = 64  # rows a tile of the backward's second kernel (each consumer's wgmmas: m64 over them)
MAIN_HALF = 32  # a consumer's columns of the 64-column block
MAIN_STAGES = 3  # its ring: 3 x 48 KiB, with the weights, d_logit and output buffers 192 KiB (R = 128)
MAIN_ITEMS_PER_SM = 2  # row splits so that each program takes about this many (block, split) items


def supported(own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor) -> bool:
    """``gated_blend_forward(own, other, inj, w1, b1, w2, b2)`` can run: Hopper, contiguous 2-D
    [M >= 1, D] sources and weights of one 2-byte dtype, D a multiple of 64, R in
    ``GATE_HIDDEN_SIZES``, 16-byte aligned pointers; contiguous biases [R], [3D]."""
    if not (available(own.device) and own.dtype in (torch.bfloat16, torch.float16) and own.dim() == 2):
        return False
    m, d = own.shape
    r = w1.shape[0]
    tensors = (own, other, w1, w2) + (() if inj is None else (inj,))
    return (m > 0 and d % CHUNK == 0 and r in GATE_HIDDEN_SIZES and w1.shape == (r, 3 * d) and w2.shape == (3 * d, r)
            and other.shape == own.shape and (inj is None or inj.shape == own.shape)
            and all(t.dtype == own.dtype and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
            and b1.shape == (r,) and b2.shape == (3 * d,) and b1.is_contiguous() and b2.is_contiguous())


if _HAVE_GLUON:

    @gluon.jit
    def _fast_sigmoid(x):
        """``hrm_kernels._math.sigmoid(x, FAST=True)``: (1 + tanh(x / 2)) / 2, one MUFU instruction."""
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=gl.float32, is_pure=True,
                                      pack=1)
        return 0.5 + 0.5 * t

    @gluon.jit
    def _source_desc(kind: gl.constexpr, own_desc, other_desc, inj_desc):
        """The descriptor of source ``kind``: 0 own, 1 other, 2 inj."""
        if kind == 0:
            return own_desc
        elif kind == 1:
            return other_desc
        else:
            return inj_desc

    @gluon.jit
    def _produce(own_desc, other_desc, inj_desc, w1_desc, w2_desc, x_bufs, w_bufs, ready, empty, M, D,
                 KINDS: gl.constexpr):
        """The producer warp: per tile of BM rows, the hidden GEMM's k-steps (a source tile [BM, BK]
        and its W1 tile [R, BK], sources in turn), then per output chunk and source the source tile
        again and its W2 tile [BK, R], each into the next ring stage once both consumers freed it."""
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        S: gl.constexpr = x_bufs.type.shape[0]
        NBYTES: gl.constexpr = own_desc.block_type.nbytes + w1_desc.block_type.nbytes
        chunks = D // BK
        step = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BM), gl.num_programs(0)):
            off_m = tile * BM
            for kind in gl.static_range(KINDS):  # GEMM 1: pre += src_kind @ W1[:, kind*D:(kind+1)*D]^T
                src = _source_desc(kind, own_desc, other_desc, inj_desc)
                for kk in range(chunks):
                    s = step % S
                    mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), NBYTES)
                    tma.async_copy_global_to_shared(src, [off_m, kk * BK], ready.index(s), x_bufs.index(s))
                    tma.async_copy_global_to_shared(w1_desc, [0, kind * D + kk * BK], ready.index(s), w_bufs.index(s))
                    step += 1
            for c in range(chunks):  # GEMM 2 and the blend, chunk by chunk
                for kind in gl.static_range(KINDS):
                    src = _source_desc(kind, own_desc, other_desc, inj_desc)
                    s = step % S
                    mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), NBYTES)
                    tma.async_copy_global_to_shared(src, [off_m, c * BK], ready.index(s), x_bufs.index(s))
                    w2_buf = w_bufs.index(s)._reinterpret(w2_desc.dtype, w2_desc.block_type.shape, w2_desc.layout)
                    tma.async_copy_global_to_shared(w2_desc, [kind * D + c * BK, 0], ready.index(s), w2_buf)
                    step += 1

    @gluon.jit
    def _consume(own_desc, w2_desc, out_desc, pre_desc, z_desc, x_bufs, w_bufs, z_bufs, pre_bufs, out_bufs, ready, empty,
                 b1, b2, M, D, KINDS: gl.constexpr, STORE: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup ``WG``: rows [WG * BM / 2, (WG + 1) * BM / 2) of every tile. The
        hidden GEMM's [BM / 2, R] accumulator, pre and z rounded as the Triton kernel rounds them,
        z into shared memory (the logit GEMM's A operand), then per output chunk [BM / 2, BK] the
        logits of each source's gates, their sigmoid and the blend; the chunk leaves by TMA.
        ``STORE``: pre and z [BM / 2, R] leave by TMA too (what the backward reads)."""
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        S: gl.constexpr = x_bufs.type.shape[0]
        R: gl.constexpr = w_bufs.type.shape[1]
        HALF: gl.constexpr = BM // 2
        dtype: gl.constexpr = own_desc.dtype
        hidden_layout: gl.constexpr = _accumulator_layout(R)
        chunk_layout: gl.constexpr = _accumulator_layout(BK)
        chunks = D // BK
        z_buf = z_bufs.index(WG)
        out_buf = out_bufs.index(WG)
        r_idx = gl.arange(0, R, layout=gl.SliceLayout(0, hidden_layout))
        bias1 = gl.expand_dims(rounded(gl.load(b1 + r_idx), dtype), 0)
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, chunk_layout))
        step = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BM), gl.num_programs(0)):
            off_m = tile * BM
            acc = gl.zeros((HALF, R), dtype=gl.float32, layout=hidden_layout)
            for kk in range(KINDS * chunks):
                s = step % S
                mbarrier.wait(ready.index(s), (step // S) & 1)
                acc = warpgroup_mma(x_bufs.index(s).slice(WG * HALF, HALF, dim=0), w_bufs.index(s).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                if kk > 0:
                    mbarrier.arrive(empty.index((step - 1) % S), count=1)
                step += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((step - 1) % S), count=1)
            pre = rounded(acc + bias1, dtype)
            z = narrow(pre / (1.0 + gl.exp(-pre)), dtype)
            z_buf.store(z)  # (the previous tile's logit wgmmas have completed: each was waited for)
            if STORE:  # (the previous tile's stores from z_buf and pre_buf: waited for before its first chunk's)
                pre_buf = pre_bufs.index(WG)
                pre_buf.store(narrow(pre, dtype))
            fence_async_shared()
            if STORE:
                tma.async_copy_shared_to_global(z_desc, [off_m + WG * HALF, 0], z_buf)
                tma.async_copy_shared_to_global(pre_desc, [off_m + WG * HALF, 0], pre_buf)
            for c in range(chunks):
                out = gl.zeros((HALF, BK), dtype=gl.float32, layout=chunk_layout)
                for kind in gl.static_range(KINDS):
                    s = step % S
                    bias2 = gl.expand_dims(rounded(gl.load(b2 + kind * D + c * BK + cols), dtype), 0)
                    mbarrier.wait(ready.index(s), (step // S) & 1)
                    w2_buf = w_bufs.index(s)._reinterpret(w2_desc.dtype, w2_desc.block_type.shape, w2_desc.layout)
                    logit = warpgroup_mma(z_buf, w2_buf.permute((1, 0)), gl.zeros((HALF, BK), dtype=gl.float32,
                                          layout=chunk_layout), use_acc=False, is_async=True)
                    logit = warpgroup_mma_wait(num_outstanding=0, deps=(logit, ))
                    x = x_bufs.index(s).slice(WG * HALF, HALF, dim=0).load(chunk_layout).to(gl.float32)
                    # The x tile was read by ordinary shared-memory loads; the TMA that refills the
                    # stage writes through the async proxy, so the reads are fenced before release.
                    # Without the fence (H100, 62976 rows): 45-64 thousand wrong outputs, max error 5.2.
                    fence_async_shared()
                    mbarrier.arrive(empty.index(s), count=1)
                    out += _fast_sigmoid(logit + bias2) * x
                    step += 1
                tma.store_wait(pendings=0)  # this warpgroup's previous chunk has left out_buf
                out_buf.store(narrow(out, dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [off_m + WG * HALF, c * BK], out_buf)
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(kinds: int, store: bool = False):
        """The kernel for ``kinds`` sources (3, or 2 with inj=None); ``store``: pre1 and z written out.
        Gluon passes partition arguments as values, so the constants are written into each partition
        function (as in _gluon_gemm)."""
        KINDS = gl.constexpr(kinds)
        STORE = gl.constexpr(store)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, pre_desc, z_desc, x_bufs, w_bufs,
                        z_bufs, pre_bufs, out_bufs, ready, empty, b1, b2, M, D):
                _consume(own_desc, w2_desc, out_desc, pre_desc, z_desc, x_bufs, w_bufs, z_bufs, pre_bufs, out_bufs, ready,
                         empty, b1, b2, M, D, KINDS, STORE, WG)

            return warpgroup_jit(consume, wg)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, pre_desc, z_desc, x_bufs, w_bufs,
                     z_bufs, pre_bufs, out_bufs, ready, empty, b1, b2, M, D):
            _produce(own_desc, other_desc, inj_desc, w1_desc, w2_desc, x_bufs, w_bufs, ready, empty, M, D, KINDS)

        @gluon.jit
        def gated_blend_kernel(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, pre_desc, z_desc, b1, b2, M,
                               D, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = own_desc.dtype
            R: gl.constexpr = w1_desc.block_type.shape[0]
            HALF: gl.constexpr = own_desc.block_type.shape[0] // 2
            x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + own_desc.block_type.shape, own_desc.layout)
            w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w1_desc.block_type.shape, w1_desc.layout)
            z_bufs = gl.allocate_shared_memory(dtype, [2, HALF, R], gl.NVMMASharedLayout.get_default_for([HALF, R], dtype))
            out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
            if STORE:
                pre_bufs = gl.allocate_shared_memory(dtype, [2] + pre_desc.block_type.shape, pre_desc.layout)
            else:  # (pre_desc and z_desc are placeholders then)
                pre_bufs = out_bufs
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each stage
            args = (own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, pre_desc, z_desc, x_bufs, w_bufs, z_bufs,
                    pre_bufs, out_bufs, ready, empty, b1, b2, M, D)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return gated_blend_kernel


    # ------------------------------------------------------------------ the backward's d_pre1 kernel

    @gluon.jit
    def _produce_dpre(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, x_bufs, w_bufs, z_buf, ready, empty,
                      z_ready, z_empty, M, D, KINDS: gl.constexpr):
        """The backward's producer warp: per tile of BM rows and 64-column chunk the dout tile (a ring
        stage without a weight tile) and per source its tile with its W2 tile [BK, R]; after the
        first dout tile, z [BM, R] into its own buffer once both consumers are done with the
        previous tile's."""
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        S: gl.constexpr = x_bufs.type.shape[0]
        X_BYTES: gl.constexpr = own_desc.block_type.nbytes
        W_BYTES: gl.constexpr = w2_desc.block_type.nbytes
        chunks = D // BK
        step = 0
        t = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BM), gl.num_programs(0)):
            off_m = tile * BM
            for c in range(chunks):
                s = step % S
                mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
                mbarrier.expect(ready.index(s), X_BYTES)
                tma.async_copy_global_to_shared(dout_desc, [off_m, c * BK], ready.index(s), x_bufs.index(s))
                step += 1
                if c == 0:  # z once the previous tile's is free: the first dout tile is already on its way
                    mbarrier.wait(z_empty, (t & 1) ^ 1)
                    mbarrier.expect(z_ready, z_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(z_desc, [off_m, 0], z_ready, z_buf)
                for kind in gl.static_range(KINDS):
                    src = _source_desc(kind, own_desc, other_desc, inj_desc)
                    s = step % S
                    mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), X_BYTES + W_BYTES)
                    tma.async_copy_global_to_shared(src, [off_m, c * BK], ready.index(s), x_bufs.index(s))
                    tma.async_copy_global_to_shared(w2_desc, [kind * D + c * BK, 0], ready.index(s), w_bufs.index(s))
                    step += 1
            t += 1

    @gluon.jit
    def _consume_dpre(dout_desc, w2_desc, pre_desc, dpre_desc, x_bufs, w_bufs, z_buf, out_bufs, ready, empty, z_ready,
                      z_empty, pre_bars, b2, db1_partial, M, D, KINDS: gl.constexpr, WG: gl.constexpr):
        """The backward's consumer warpgroup ``WG``: rows [WG * BM / 2, (WG + 1) * BM / 2) of every
        tile. Per chunk and source the [BM / 2, BK] logits from z, the gates, d_logit rounded to the
        activations' dtype, and ``dz += d_logit @ W2_chunk`` with d_logit as the wgmma's register
        operand and the same W2 tile, untransposed; at the tile's end d_pre1 from pre1 (loaded by TMA
        into the output buffer at the tile's start), stored by TMA, and db1's partial sums."""
        BM: gl.constexpr = x_bufs.type.shape[1]
        BK: gl.constexpr = x_bufs.type.shape[2]
        R: gl.constexpr = w_bufs.type.shape[2]
        S: gl.constexpr = x_bufs.type.shape[0]
        HALF: gl.constexpr = BM // 2
        dtype: gl.constexpr = dout_desc.dtype
        hidden_layout: gl.constexpr = _accumulator_layout(R)
        chunk_layout: gl.constexpr = _accumulator_layout(BK)
        dl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=hidden_layout, k_width=2)
        chunks = D // BK
        out_buf = out_bufs.index(WG)
        pre_bar = pre_bars.index(WG)
        z_half = z_buf.slice(WG * HALF, HALF, dim=0)
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, chunk_layout))
        r_idx = gl.arange(0, R, layout=gl.SliceLayout(0, hidden_layout))
        step = 0
        t = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BM), gl.num_programs(0)):
            off_m = tile * BM
            tma.store_wait(pendings=0)  # the previous tile's d_pre1 has left out_buf
            mbarrier.expect(pre_bar, pre_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(pre_desc, [off_m + WG * HALF, 0], pre_bar, out_buf)
            mbarrier.wait(z_ready, t & 1)
            dz = gl.zeros((HALF, R), dtype=gl.float32, layout=hidden_layout)
            for c in range(chunks):
                s = step % S
                mbarrier.wait(ready.index(s), (step // S) & 1)
                dout = x_bufs.index(s).slice(WG * HALF, HALF, dim=0).load(chunk_layout)
                fence_async_shared()  # register reads of a stage the TMA refills (see _consume)
                mbarrier.arrive(empty.index(s), count=1)
                step += 1
                for kind in gl.static_range(KINDS):
                    s = step % S
                    bias2 = gl.expand_dims(rounded(gl.load(b2 + kind * D + c * BK + cols), dtype), 0)
                    mbarrier.wait(ready.index(s), (step // S) & 1)
                    w2_buf = w_bufs.index(s)  # [BK, R]: W2's rows for this chunk's gates
                    logit = warpgroup_mma(z_half, w2_buf.permute((1, 0)), gl.zeros((HALF, BK), dtype=gl.float32,
                                          layout=chunk_layout), use_acc=False, is_async=True)
                    logit = warpgroup_mma_wait(num_outstanding=0, deps=(logit, ))
                    x = x_bufs.index(s).slice(WG * HALF, HALF, dim=0).load(chunk_layout).to(gl.float32)
                    g = _fast_sigmoid(logit + bias2)
                    dl = gl.convert_layout(narrow(dout.to(gl.float32) * x * g * (1.0 - g), dtype), dl_layout)
                    dz = warpgroup_mma(dl, w2_buf, dz, is_async=True)
                    dz = warpgroup_mma_wait(num_outstanding=0, deps=(dz, ))
                    fence_async_shared()
                    mbarrier.arrive(empty.index(s), count=1)
                    step += 1
            mbarrier.arrive(z_empty, count=1)  # every wgmma that read z has been waited for
            mbarrier.wait(pre_bar, t & 1)
            pre = out_buf.load(hidden_layout).to(gl.float32)  # rows past M load as 0
            sg = 1.0 / (1.0 + gl.exp(-pre))
            dpre = narrow(dz * sg * (1.0 + pre * (1.0 - sg)), dtype)
            # db1's partial sum over this tile half (rows past M: dout loads as 0, so d_pre1 is 0
            # there); a sum carried over the tiles in registers made ptxas spill
            gl.store(db1_partial + (tile * 2 + WG) * R + r_idx, gl.sum(dpre.to(gl.float32), axis=0))
            out_buf.store(dpre)  # (the TMA load into it is complete: its barrier was waited for)
            fence_async_shared()
            tma.async_copy_shared_to_global(dpre_desc, [off_m + WG * HALF, 0], out_buf)
            t += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _dpre_kernel(kinds: int):
        """The backward's d_pre1 kernel for ``kinds`` sources (see ``_kernel``)."""
        KINDS = gl.constexpr(kinds)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, pre_desc, dpre_desc, x_bufs,
                        w_bufs, z_buf, out_bufs, ready, empty, z_ready, z_empty, pre_bars, b2, db1_partial, M, D):
                _consume_dpre(dout_desc, w2_desc, pre_desc, dpre_desc, x_bufs, w_bufs, z_buf, out_bufs, ready, empty,
                              z_ready, z_empty, pre_bars, b2, db1_partial, M, D, KINDS, WG)

            return warpgroup_jit(consume, wg)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, pre_desc, dpre_desc, x_bufs, w_bufs,
                     z_buf, out_bufs, ready, empty, z_ready, z_empty, pre_bars, b2, db1_partial, M, D):
            _produce_dpre(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, x_bufs, w_bufs, z_buf, ready,
                          empty, z_ready, z_empty, M, D, KINDS)

        @gluon.jit
        def gated_blend_dpre_kernel(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, pre_desc, dpre_desc,
                                    b2, db1_partial, M, D, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = own_desc.dtype
            x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + own_desc.block_type.shape, own_desc.layout)
            w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w2_desc.block_type.shape, w2_desc.layout)
            z_buf = gl.allocate_shared_memory(dtype, z_desc.block_type.shape, z_desc.layout)
            out_bufs = gl.allocate_shared_memory(dtype, [2] + dpre_desc.block_type.shape, dpre_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            z_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            pre_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each stage
            mbarrier.init(z_bars.index(0), count=1)
            mbarrier.init(z_bars.index(1), count=2)
            mbarrier.init(pre_bars.index(0), count=1)  # a consumer's own TMA load of its pre1 half
            mbarrier.init(pre_bars.index(1), count=1)
            args = (dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, pre_desc, dpre_desc, x_bufs, w_bufs,
                    z_buf, out_bufs, ready, empty, z_bars.index(0), z_bars.index(1), pre_bars, b2, db1_partial, M, D)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return gated_blend_dpre_kernel

    # ------------------------------------------------------------------- the backward's second kernel

    @gluon.jit
    def _source_by_kind(kind, own_desc, other_desc, inj_desc, dst, off_m, col, bar):
        """TMA load of source ``kind`` (a runtime value: 0 own, 1 other, 2 inj) at [off_m, col]."""
        if kind == 0:
            tma.async_copy_global_to_shared(own_desc, [off_m, col], bar, dst)
        elif kind == 1:
            tma.async_copy_global_to_shared(other_desc, [off_m, col], bar, dst)
        else:
            tma.async_copy_global_to_shared(inj_desc, [off_m, col], bar, dst)

    @gluon.jit
    def _store_by_kind(kind, down_desc, dother_desc, dinj_desc, src, off_m, col):
        """TMA store of ``src`` to the gradient of source ``kind`` (as ``_source_by_kind``) at [off_m, col]."""
        if kind == 0:
            tma.async_copy_shared_to_global(down_desc, [off_m, col], src)
        elif kind == 1:
            tma.async_copy_shared_to_global(dother_desc, [off_m, col], src)
        else:
            tma.async_copy_shared_to_global(dinj_desc, [off_m, col], src)

    @gluon.jit
    def _main_item(item, blocks, chunks, rows_per_split, M, BK: gl.constexpr):
        """Work item ``item`` -> (kind, first column of its 64-column block in the source, split, its
        rows [row_start, row_end)): items walk the blocks fastest, so that the programs running at
        once share rows (z and d_pre1 in L2)."""
        block = item % blocks
        split = item // blocks
        row_start = split * rows_per_split
        return block // chunks, (block % chunks) * BK, split, row_start, gl.minimum(row_start + rows_per_split, M)

    @gluon.jit
    def _produce_main(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, z_bufs, dp_bufs,
                      do_bufs, x_bufs, w1_bufs, w2_bufs, ready, empty, w_ready, w_empty, M, D, n_items, blocks,
                      rows_per_split):
        """The producer warp: per work item the block's two halves of W2's rows [BH, R] and W1's
        columns [R, BH] once both consumers are done with the previous item's, then per tile of BM
        rows z and d_pre1 [BM, R] and the two [BM, BH] halves of dout's and the source's block."""
        S: gl.constexpr = z_bufs.type.shape[0]
        BM: gl.constexpr = z_bufs.type.shape[1]
        BH: gl.constexpr = do_bufs.type.shape[2]
        W_BYTES: gl.constexpr = 2 * (w1_desc.block_type.nbytes + w2_desc.block_type.nbytes)
        NBYTES: gl.constexpr = 2 * z_desc.block_type.nbytes + 4 * dout_desc.block_type.nbytes
        chunks = D // (2 * BH)
        step = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            kind, col, split, row_start, row_end = _main_item(item, blocks, chunks, rows_per_split, M, 2 * BH)
            gcol = kind * D + col
            mbarrier.wait(w_empty, (it & 1) ^ 1)
            mbarrier.expect(w_ready, W_BYTES)
            for h in gl.static_range(2):
                tma.async_copy_global_to_shared(w2_desc, [gcol + h * BH, 0], w_ready, w2_bufs.index(h))
                tma.async_copy_global_to_shared(w1_desc, [0, gcol + h * BH], w_ready, w1_bufs.index(h))
            for off_m in range(row_start, row_end, BM):
                s = step % S
                mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
                mbarrier.expect(ready.index(s), NBYTES)
                tma.async_copy_global_to_shared(z_desc, [off_m, 0], ready.index(s), z_bufs.index(s))
                tma.async_copy_global_to_shared(dpre_desc, [off_m, 0], ready.index(s), dp_bufs.index(s))
                for h in gl.static_range(2):
                    tma.async_copy_global_to_shared(dout_desc, [off_m, col + h * BH], ready.index(s),
                                                    do_bufs.index(2 * s + h))
                    _source_by_kind(kind, own_desc, other_desc, inj_desc, x_bufs.index(2 * s + h), off_m,
                                    col + h * BH, ready.index(s))
                step += 1
            it += 1

    @gluon.jit
    def _consume_main(dout_desc, down_desc, dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w1_bufs, w2_bufs,
                      dl_bufs, out_bufs, ready, empty, w_ready, w_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D,
                      n_items, blocks, rows_per_split, width, WG: gl.constexpr):
        """Consumer warpgroup ``WG``: columns [WG * BH, (WG + 1) * BH) of each item's block, every
        tile. Per tile four wgmmas::

            logits = z @ W2h^T                 [BM, BH]   (z, W2h from shared memory)
            dW1h  += dpre^T @ x_h              [R, BH]    (dpre read transposed; issued with the logits)
            (logits waited for) g, dl = round(dout * x * g * (1 - g)) -> shared memory; db2 += dl
            d_src  = dout * g + dpre @ W1h     [BM, BH]   (dout * g the accumulator's start)
            dW2h^T += z^T @ dl                 [R, BH]
            (d_src waited for) round(d_src), stored by TMA

        then the stage is released once all four are done. The accumulators dW1h and dW2h^T stay in
        registers over the item's rows and go to its split's partial sums at the end."""
        BM: gl.constexpr = z_bufs.type.shape[1]
        R: gl.constexpr = z_bufs.type.shape[2]
        S: gl.constexpr = z_bufs.type.shape[0]
        BH: gl.constexpr = do_bufs.type.shape[2]
        dtype: gl.constexpr = dout_desc.dtype
        layout: gl.constexpr = _accumulator_layout(BH)
        chunks = D // (2 * BH)
        dl_buf = dl_bufs.index(WG)
        out_buf = out_bufs.index(WG)
        w2_buf = w2_bufs.index(WG)  # [BH, R]: W2's rows of this half's gates
        w1_buf = w1_bufs.index(WG)  # [R, BH]: W1's columns of this half's inputs
        cols = gl.arange(0, BH, layout=gl.SliceLayout(0, layout))
        r_idx = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
        step = 0
        it = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            kind, col, split, row_start, row_end = _main_item(item, blocks, chunks, rows_per_split, M, 2 * BH)
            scol = col + WG * BH  # this half's first column in the source
            gcol = kind * D + scol  # and among the gates
            bias2 = gl.expand_dims(rounded(gl.load(b2 + gcol + cols), dtype), 0)
            dw1 = gl.zeros((R, BH), dtype=gl.float32, layout=layout)
            dw2t = gl.zeros((R, BH), dtype=gl.float32, layout=layout)
            db2 = gl.zeros((BH, ), dtype=gl.float32, layout=gl.SliceLayout(0, layout))
            mbarrier.wait(w_ready, it & 1)
            n_tiles = gl.cdiv(row_end - row_start, BM)
            for t in range(n_tiles):
                s = (step + t) % S
                off_m = row_start + t * BM
                mbarrier.wait(ready.index(s), ((step + t) // S) & 1)
                z_buf = z_bufs.index(s)
                dp_buf = dp_bufs.index(s)
                x_buf = x_bufs.index(2 * s + WG)
                logit = warpgroup_mma(z_buf, w2_buf.permute((1, 0)),
                                      gl.zeros((BM, BH), dtype=gl.float32, layout=layout), use_acc=False, is_async=True)
                dw1 = warpgroup_mma(dp_buf.permute((1, 0)), x_buf, dw1, is_async=True)
                logit = warpgroup_mma_wait(num_outstanding=1, deps=(logit, ))
                # rows past M (the last tile): dout, x, z and d_pre1 load as 0, so dl and d_src are 0
                g = _fast_sigmoid(logit + bias2)
                dg = do_bufs.index(2 * s + WG).load(layout).to(gl.float32) * g
                dl = narrow(dg * x_buf.load(layout).to(gl.float32) * (1.0 - g), dtype)
                db2 += gl.sum(dl.to(gl.float32), axis=0)  # (a [BM, BH] sum in registers made ptxas spill)
                dl_buf.store(dl)  # (its reader, the previous tile's dW2 wgmma, was waited for)
                fence_async_shared()  # dl for the wgmma; the stage's register reads before its release
                dsrc = warpgroup_mma(dp_buf, w1_buf, dg, is_async=True)
                dw2t = warpgroup_mma(z_buf.permute((1, 0)), dl_buf, dw2t, is_async=True)
                dsrc = warpgroup_mma_wait(num_outstanding=1, deps=(dsrc, ))
                tma.store_wait(pendings=0)  # the previous tile's gradient has left out_buf
                out_buf.store(narrow(dsrc, dtype))
                fence_async_shared()
                _store_by_kind(kind, down_desc, dother_desc, dinj_desc, out_buf, off_m, scol)
                dw1, dw2t = warpgroup_mma_wait(num_outstanding=0, deps=(dw1, dw2t))
                mbarrier.arrive(empty.index(s), count=1)
            step += n_tiles
            mbarrier.arrive(w_empty, count=1)  # every wgmma that read the item's weights was waited for
            base = split.to(gl.int64) * width * R
            # dw1_partial [splits, R, width], dw2_partial [splits, width, R], db2_partial [splits, width]
            gl.store(dw1_partial + base + gl.expand_dims(r_idx * width, 1) + gl.expand_dims(gcol + cols, 0), dw1)
            gl.store(dw2_partial + base + gl.expand_dims(r_idx, 1) + gl.expand_dims((gcol + cols) * R, 0), dw2t)
            gl.store(db2_partial + split.to(gl.int64) * width + gcol + cols, db2)
            it += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _main_kernel():
        """The backward's second kernel (see ``backward_main``)."""

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            def consume(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc,
                        dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w1_bufs, w2_bufs, dl_bufs, out_bufs,
                        ready, empty, w_ready, w_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D, n_items,
                        blocks, rows_per_split, width):
                _consume_main(dout_desc, down_desc, dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w1_bufs,
                              w2_bufs, dl_bufs, out_bufs, ready, empty, w_ready, w_empty, b2, dw1_partial, dw2_partial,
                              db2_partial, M, D, n_items, blocks, rows_per_split, width, WG)

            return warpgroup_jit(consume, wg)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc,
                     dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w1_bufs, w2_bufs, dl_bufs, out_bufs,
                     ready, empty, w_ready, w_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D, n_items, blocks,
                     rows_per_split, width):
            _produce_main(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, z_bufs,
                          dp_bufs, do_bufs, x_bufs, w1_bufs, w2_bufs, ready, empty, w_ready, w_empty, M, D, n_items,
                          blocks, rows_per_split)

        @gluon.jit
        def gated_blend_main_kernel(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc,
                                    down_desc, dother_desc, dinj_desc, b2, dw1_partial, dw2_partial, db2_partial, M, D,
                                    n_items, blocks, rows_per_split, width, STAGES: gl.constexpr,
                                    CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = own_desc.dtype
            z_bufs = gl.allocate_shared_memory(dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
            dp_bufs = gl.allocate_shared_memory(dtype, [STAGES] + dpre_desc.block_type.shape, dpre_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [2 * STAGES] + dout_desc.block_type.shape, dout_desc.layout)
            x_bufs = gl.allocate_shared_memory(dtype, [2 * STAGES] + own_desc.block_type.shape, own_desc.layout)
            w1_bufs = gl.allocate_shared_memory(dtype, [2] + w1_desc.block_type.shape, w1_desc.layout)
            w2_bufs = gl.allocate_shared_memory(dtype, [2] + w2_desc.block_type.shape, w2_desc.layout)
            dl_bufs = gl.allocate_shared_memory(dtype, [2] + own_desc.block_type.shape, own_desc.layout)
            out_bufs = gl.allocate_shared_memory(dtype, [2] + down_desc.block_type.shape, down_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            w_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each stage
            mbarrier.init(w_bars.index(0), count=1)  # the item's weight tiles have landed
            mbarrier.init(w_bars.index(1), count=2)  # both consumers are done with them
            args = (dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc,
                    dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w1_bufs, w2_bufs, dl_bufs, out_bufs,
                    ready, empty, w_bars.index(0), w_bars.index(1), b2, dw1_partial, dw2_partial, db2_partial, M, D,
                    n_items, blocks, rows_per_split, width)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return gated_blend_main_kernel


def descriptors(own, other, inj, w1, w2, out, pre1=None, z=None) -> tuple:
    """TMA descriptors of own, other, inj (own's when None: not read), W1, W2, out, and pre1 and z
    (out's, as placeholders the kernel without ``store`` never reads, when None)."""
    r = w1.shape[0]
    src_box = [BLOCK_M, CHUNK]
    out_desc = _describe(out, [BLOCK_M // 2, CHUNK])
    return (_describe(own, src_box), _describe(other, src_box), _describe(inj if inj is not None else own, src_box),
            _describe(w1, [r, CHUNK]), _describe(w2, [CHUNK, r]), out_desc,
            _describe(pre1, [BLOCK_M // 2, r]) if pre1 is not None else out_desc,
            _describe(z, [BLOCK_M // 2, r]) if z is not None else out_desc)


def gated_blend_forward(own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, programs: int | None = None, store_hidden: bool = False):
    """``out`` [M, D] (see the module docstring); with ``store_hidden`` ``(out, pre1, z)``, the hidden
    activations [M, R] the backward reads. The caller checks ``supported``. ``programs``: the
    persistent grid (default one program per SM; tests pass fewer to give each several tiles)."""
    from hrm_kernels.precompile import launch

    m, d = own.shape
    out = torch.empty_like(own)
    pre1 = z = None
    if store_hidden:
        pre1, z = own.new_empty((m, w1.shape[0])), own.new_empty((m, w1.shape[0]))
    tiles = triton.cdiv(m, BLOCK_M)
    launch(_kernel(2 if inj is None else 3, store_hidden),
           persistent_grid(programs, tiles, own.device, "gated_blend (Gluon)"),
           *descriptors(own, other, inj, w1, w2, out, pre1, z),
           b1, b2, m, d, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return (out, pre1, z) if store_hidden else out


def dpre_supported(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w2: torch.Tensor, b2: torch.Tensor,
                   pre1: torch.Tensor, z: torch.Tensor) -> bool:
    """``backward_dpre(...)`` can run: the forward's requirements on the sources and W2 (W1 is not
    read), and dout, pre1, z contiguous, 16-byte aligned, in the activations' dtype."""
    if not (available(own.device) and own.dtype in (torch.bfloat16, torch.float16) and own.dim() == 2):
        return False
    m, d = own.shape
    r = w2.shape[-1]
    tensors = (dout, own, other, w2, pre1, z) + (() if inj is None else (inj,))
    return (m > 0 and d % CHUNK == 0 and r in GATE_HIDDEN_SIZES and w2.shape == (3 * d, r)
            and dout.shape == other.shape == own.shape and (inj is None or inj.shape == own.shape)
            and pre1.shape == z.shape == (m, r)
            and all(t.dtype == own.dtype and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
            and b2.shape == (3 * d,) and b2.is_contiguous())


def dpre_descriptors(dout, own, other, inj, w2, z, pre1, dpre) -> tuple:
    """TMA descriptors of dout, own, other, inj (own's when None), W2, z, pre1 and d_pre1."""
    r = w2.shape[1]
    src_box = [BLOCK_M, CHUNK]
    return (_describe(dout, src_box), _describe(own, src_box), _describe(other, src_box),
            _describe(inj if inj is not None else own, src_box), _describe(w2, [CHUNK, r]),
            _describe(z, [BLOCK_M, r]), _describe(pre1, [BLOCK_M // 2, r]), _describe(dpre, [BLOCK_M // 2, r]))


def backward_dpre(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w2: torch.Tensor, b2: torch.Tensor,
                  pre1: torch.Tensor, z: torch.Tensor, programs: int | None = None):
    """(d_pre1 [M, R], db1 partial sums [2 * tiles, R] fp32): ``gated_blend``'s backward first
    kernel without the saturation term (see the module docstring); the caller checks
    ``dpre_supported``. ``programs`` as in ``gated_blend_forward``."""
    from hrm_kernels.precompile import launch

    m, d = own.shape
    r = w2.shape[1]
    dpre = torch.empty_like(z)
    tiles = triton.cdiv(m, BLOCK_M)
    grid = persistent_grid(programs, tiles, own.device, "gated_blend backward (Gluon)")
    db1_partial = torch.empty((2 * tiles, r), dtype=torch.float32, device=own.device)
    launch(_dpre_kernel(2 if inj is None else 3), grid,
           *dpre_descriptors(dout, own, other, inj, w2, z, pre1, dpre), b2, db1_partial, m, d, STAGES=DPRE_STAGES,
           CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return dpre, db1_partial


def main_supported(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor,
                   w2: torch.Tensor, b2: torch.Tensor, z: torch.Tensor, dpre: torch.Tensor) -> bool:
    """``backward_main(...)`` can run: ``dpre_supported``'s requirements (d_pre1 in pre1's place),
    and W1 [R, 3D] like W2."""
    return (dpre_supported(dout, own, other, inj, w2, b2, dpre, z) and w1.shape == (w2.shape[1], w2.shape[0])
            and w1.dtype == own.dtype and w1.is_contiguous() and w1.data_ptr() % 16 == 0)


def main_descriptors(dout, own, other, inj, z, dpre, w1, w2, d_own, d_other, d_inj) -> tuple:
    """TMA descriptors of the backward's second kernel (inj and d_inj: own's and d_own's when None)."""
    r = z.shape[1]
    box = [MAIN_TILE, MAIN_HALF]
    return (_describe(dout, box), _describe(own, box), _describe(other, box),
            _describe(inj if inj is not None else own, box), _describe(z, [MAIN_TILE, r]),
            _describe(dpre, [MAIN_TILE, r]), _describe(w1, [r, MAIN_HALF]), _describe(w2, [MAIN_HALF, r]),
            _describe(d_own, box), _describe(d_other, box), _describe(d_inj if inj is not None else d_own, box))


def backward_main(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, z: torch.Tensor, dpre: torch.Tensor, d_own: torch.Tensor, d_other: torch.Tensor,
                  d_inj, programs: int | None = None, splits: int | None = None):
    """The backward's second phase, ``gated_blend._gated_blend_backward_kernel``'s math without the
    saturation term: writes d_own, d_other and d_inj (unless inj is None)::

        g     = sigmoid(z @ W2b^T + round(b2b))           per 64-column block b of a source k
        dl    = round(dout_b * src_kb * g * (1 - g))      db2b += column sums of dl
        d_src = round(dout_b * g + d_pre1 @ W1b)          W1b: W1's columns of block b
        dW1b += d_pre1^T @ src_kb,  dW2b += dl^T @ z

    and returns the partial sums (dW1 [splits, R, width], dW2 [splits, width, R], db2 [splits,
    width]; width = kinds * D) for ``gated_blend._weight_grads``. A work item is one block and one
    split of the rows, walked in 64-row tiles; each of two consumer warpgroups takes half the
    block's columns (all four products are m64 or m128 wgmmas with operands in shared memory), so z
    and d_pre1 reach shared memory once a block, not once a half. ``programs``: the persistent grid
    (default one program per SM: 192 KiB of shared memory each); ``splits``: row splits (default:
    about ``MAIN_ITEMS_PER_SM`` items a program). The caller checks ``main_supported``."""
    from hrm_kernels.precompile import launch

    m, d = own.shape
    r = z.shape[1]
    kinds = 3 if inj is not None else 2
    width = kinds * d
    blocks = kinds * (d // CHUNK)
    tiles = triton.cdiv(m, MAIN_TILE)
    if splits is None:
        splits = max(1, round(MAIN_ITEMS_PER_SM * num_programs_for(own.device.type, own.device.index) / blocks))
    if splits < 1:
        raise ValueError(f"gated_blend backward (Gluon): splits must be at least 1, got {splits}")
    rows_per_split = triton.cdiv(tiles, min(tiles, splits)) * MAIN_TILE
    splits = triton.cdiv(m, rows_per_split)
    n_items = blocks * splits
    dw1_partial = torch.empty((splits, r, width), dtype=torch.float32, device=own.device)
    dw2_partial = torch.empty((splits, width, r), dtype=torch.float32, device=own.device)
    db2_partial = torch.empty((splits, width), dtype=torch.float32, device=own.device)
    launch(_main_kernel(), persistent_grid(programs, n_items, own.device, "gated_blend backward (Gluon)"),
           *main_descriptors(dout, own, other, inj, z, dpre, w1, w2, d_own, d_other, d_inj),
           b2, dw1_partial, dw2_partial, db2_partial, m, d, n_items, blocks, rows_per_split, width,
           STAGES=MAIN_STAGES, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return dw1_partial, dw2_partial, db2_partial
