"""The gated blend's no-gradient forward (``hrm_kernels.gated_blend``'s math, no stats, no stored
hidden activations: the model's recurrence calls), and its backward's two kernels, as
warp-specialised Gluon kernels for Hopper. The forward::

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
difference is within the noise between runs). Requirements (``supported``): Hopper, bf16/fp16
activations and weights of one dtype (biases any float dtype), D a multiple of 64, R of 64 or
128, contiguous rows, 16-byte aligned pointers, M >= 1. No
interpreter path: CPU tests compile it for sm_90 (``tests/test_compile_for_gpu.py``).

The backward, two kernels, one per phase (``gated_blend.USE_GLUON_DPRE``, on, and
``USE_GLUON_BACKWARD_MAIN``, off: slower than the Triton phase at HRM's shapes; figures in
``gated_blend``). Its first kernel (``backward_dpre``, persistent)
computes, per 128-row tile::

    g     = sigmoid(z @ W2^T + round(b2))                  per source and 64-column chunk
    dz   += round(dout * src * g * (1 - g)) @ W2_chunk     [64, R] a consumer warpgroup
    dpre  = round(dz * s * (1 + pre * (1 - s))),  s = sigmoid(pre)
    db1_partial[2 * tile + half] = column sums of dpre

(``gated_blend._gated_blend_backward_dpre_kernel``'s math without the saturation term.) The
producer loads z [128, R] into a buffer of its own, then per chunk the dout tile (a ring stage
without a weight) and per source its tile and W2 tile [64, R], which serves both wgmmas: the
logits' (transposed) and d_logit's, whose A operand is the rounded d_logit in registers. Each
consumer loads its pre1 half by TMA into its output buffer at the tile's start.

Its second kernel (``backward_main``): a program owns one 64-column block of one source (kind k,
chunk c) and a contiguous split of the rows, walked in 64-row tiles::

    g     = sigmoid(z @ W2c^T + round(b2c))                   [64, 64]
    dl    = round(dout_c * x_kc * g * (1 - g));  db2c += column sums of dl
    dW2c += dl^T @ z                                           [64, R]
    dsrc  = round(dout_c * g + dpre @ W1c)                     the source's gradient, stored
    dW1c += dpre^T @ x_kc                                      [R, 64]

W2c [64, R] and W1c [R, 64] stay in shared memory; the producer streams each tile's z and d_pre1
[64, R] and dout's and the source's [64, 64] tiles. The gate warpgroup runs the first two products
(d_logit through shared memory as the transposed A operand) and hands ``dout * g`` (fp32) to the
weight warpgroup, which runs the other two and stores the source's gradient. Partial sums per
program ([splits, ...]; db2's per tile) are summed on the host, as the Triton kernel's are.
"""

from __future__ import annotations

import functools

import torch
import triton

from hrm_kernels._gluon_gemm import _HAVE_GLUON, _describe, available, persistent_grid

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

    from hrm_kernels._gluon_gemm import _accumulator_layout

BLOCK_M = 128  # rows a tile: two warpgroups of 64
CHUNK = 64  # columns of D a k-step (the hidden GEMM) and an output chunk (the logit GEMM and blend)
STAGES = 4  # 176 KiB of shared memory with z and the output buffers (5: 208 KiB)
CONSUMER_REGISTERS = 232
GATE_HIDDEN_SIZES = (64, 128)  # R: the hidden GEMM's accumulator [64, R] is one wgmma's n
DPRE_STAGES = 4  # the backward's d_pre1 ring: 128 KiB, with z, pre1 and d_pre1's buffers 196 KiB (R = 128)
BACKWARD_TILE = 64  # rows a tile of the backward's second kernel
BACKWARD_STAGES = 3  # its ring: 3 x 48 KiB, with the weights, d_logit, dout * g (fp32), out: 208 KiB (R = 128)


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
    def _consume(own_desc, w2_desc, out_desc, x_bufs, w_bufs, z_bufs, out_bufs, ready, empty, b1, b2, M, D,
                 KINDS: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup ``WG``: rows [WG * BM / 2, (WG + 1) * BM / 2) of every tile. The
        hidden GEMM's [BM / 2, R] accumulator, pre and z rounded as the Triton kernel rounds them,
        z into shared memory (the logit GEMM's A operand), then per output chunk [BM / 2, BK] the
        logits of each source's gates, their sigmoid and the blend; the chunk leaves by TMA."""
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
        bias1 = gl.expand_dims(gl.load(b1 + r_idx).to(dtype).to(gl.float32), 0)
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
            pre = (acc + bias1).to(dtype).to(gl.float32)
            z = (pre / (1.0 + gl.exp(-pre))).to(dtype)
            z_buf.store(z)  # (the previous tile's logit wgmmas have completed: each was waited for)
            fence_async_shared()
            for c in range(chunks):
                out = gl.zeros((HALF, BK), dtype=gl.float32, layout=chunk_layout)
                for kind in gl.static_range(KINDS):
                    s = step % S
                    bias2 = gl.expand_dims(gl.load(b2 + kind * D + c * BK + cols).to(dtype).to(gl.float32), 0)
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
                out_buf.store(out.to(dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [off_m + WG * HALF, c * BK], out_buf)
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(kinds: int):
        """The kernel for ``kinds`` sources (3, or 2 with inj=None). Gluon passes partition arguments
        as values, so the constants are written into each partition function (as in _gluon_gemm)."""
        KINDS = gl.constexpr(kinds)

        def consumer(wg: int):
            WG = gl.constexpr(wg)

            @gluon.jit
            def consume(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, x_bufs, w_bufs, z_bufs, out_bufs,
                        ready, empty, b1, b2, M, D):
                _consume(own_desc, w2_desc, out_desc, x_bufs, w_bufs, z_bufs, out_bufs, ready, empty, b1, b2, M, D,
                         KINDS, WG)

            return consume

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, x_bufs, w_bufs, z_bufs, out_bufs,
                     ready, empty, b1, b2, M, D):
            _produce(own_desc, other_desc, inj_desc, w1_desc, w2_desc, x_bufs, w_bufs, ready, empty, M, D, KINDS)

        @gluon.jit
        def gated_blend_kernel(own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, b1, b2, M, D,
                               STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = own_desc.dtype
            R: gl.constexpr = w1_desc.block_type.shape[0]
            HALF: gl.constexpr = own_desc.block_type.shape[0] // 2
            x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + own_desc.block_type.shape, own_desc.layout)
            w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w1_desc.block_type.shape, w1_desc.layout)
            z_bufs = gl.allocate_shared_memory(dtype, [2, HALF, R], gl.NVMMASharedLayout.get_default_for([HALF, R], dtype))
            out_bufs = gl.allocate_shared_memory(dtype, [2] + out_desc.block_type.shape, out_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each stage
            args = (own_desc, other_desc, inj_desc, w1_desc, w2_desc, out_desc, x_bufs, w_bufs, z_bufs, out_bufs, ready,
                    empty, b1, b2, M, D)
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
                    bias2 = gl.expand_dims(gl.load(b2 + kind * D + c * BK + cols).to(dtype).to(gl.float32), 0)
                    mbarrier.wait(ready.index(s), (step // S) & 1)
                    w2_buf = w_bufs.index(s)  # [BK, R]: W2's rows for this chunk's gates
                    logit = warpgroup_mma(z_half, w2_buf.permute((1, 0)), gl.zeros((HALF, BK), dtype=gl.float32,
                                          layout=chunk_layout), use_acc=False, is_async=True)
                    logit = warpgroup_mma_wait(num_outstanding=0, deps=(logit, ))
                    x = x_bufs.index(s).slice(WG * HALF, HALF, dim=0).load(chunk_layout).to(gl.float32)
                    g = _fast_sigmoid(logit + bias2)
                    dl = gl.convert_layout((dout.to(gl.float32) * x * g * (1.0 - g)).to(dtype), dl_layout)
                    dz = warpgroup_mma(dl, w2_buf, dz, is_async=True)
                    dz = warpgroup_mma_wait(num_outstanding=0, deps=(dz, ))
                    fence_async_shared()
                    mbarrier.arrive(empty.index(s), count=1)
                    step += 1
            mbarrier.arrive(z_empty, count=1)  # every wgmma that read z has been waited for
            mbarrier.wait(pre_bar, t & 1)
            pre = out_buf.load(hidden_layout).to(gl.float32)  # rows past M load as 0
            sg = 1.0 / (1.0 + gl.exp(-pre))
            dpre = (dz * sg * (1.0 + pre * (1.0 - sg))).to(dtype)
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

            @gluon.jit
            def consume(dout_desc, own_desc, other_desc, inj_desc, w2_desc, z_desc, pre_desc, dpre_desc, x_bufs,
                        w_bufs, z_buf, out_bufs, ready, empty, z_ready, z_empty, pre_bars, b2, db1_partial, M, D):
                _consume_dpre(dout_desc, w2_desc, pre_desc, dpre_desc, x_bufs, w_bufs, z_buf, out_bufs, ready, empty,
                              z_ready, z_empty, pre_bars, b2, db1_partial, M, D, KINDS, WG)

            return consume

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

    # ------------------------------------------------------- the backward's second kernel

    @gluon.jit
    def _produce_bwd(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, z_bufs, dp_bufs,
                     do_bufs, x_bufs, w_bufs, ready, empty, w_ready, M, D, rows_per_split):
        """The backward's producer warp: the program's W2 and W1 tiles once, then per 64-row tile of its
        split z and d_pre1 [64, R], dout's and the source's [64, 64] tiles of its column block."""
        S: gl.constexpr = z_bufs.type.shape[0]
        BM: gl.constexpr = z_bufs.type.shape[1]
        BK: gl.constexpr = do_bufs.type.shape[2]
        NBYTES: gl.constexpr = 2 * z_desc.block_type.nbytes + 2 * dout_desc.block_type.nbytes
        chunks = D // BK
        kind = gl.program_id(0) // chunks
        col = (gl.program_id(0) % chunks) * BK
        mbarrier.expect(w_ready, w1_desc.block_type.nbytes + w2_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w2_desc, [kind * D + col, 0], w_ready, w_bufs.index(0))
        w1_buf = w_bufs.index(1)._reinterpret(w1_desc.dtype, w1_desc.block_type.shape, w1_desc.layout)
        tma.async_copy_global_to_shared(w1_desc, [0, kind * D + col], w_ready, w1_buf)
        row_start = gl.program_id(1) * rows_per_split
        row_end = gl.minimum(row_start + rows_per_split, M)
        step = 0
        for off_m in range(row_start, row_end, BM):
            s = step % S
            mbarrier.wait(empty.index(s), ((step // S) & 1) ^ 1)
            mbarrier.expect(ready.index(s), NBYTES)
            tma.async_copy_global_to_shared(z_desc, [off_m, 0], ready.index(s), z_bufs.index(s))
            tma.async_copy_global_to_shared(dpre_desc, [off_m, 0], ready.index(s), dp_bufs.index(s))
            tma.async_copy_global_to_shared(dout_desc, [off_m, col], ready.index(s), do_bufs.index(s))
            if kind == 0:
                tma.async_copy_global_to_shared(own_desc, [off_m, col], ready.index(s), x_bufs.index(s))
            elif kind == 1:
                tma.async_copy_global_to_shared(other_desc, [off_m, col], ready.index(s), x_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(inj_desc, [off_m, col], ready.index(s), x_bufs.index(s))
            step += 1


    @gluon.jit
    def _consume_gates(dout_desc, w1_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, ready, empty, w_ready,
                       dg_full, dg_empty, b2, dw2_partial, db2_partial, M, D, width, rows_per_split):
        """The gate warpgroup: per tile the logits, the gates, d_logit (its column sums: db2), dW2c, and
        ``dout * g`` handed to the weight warpgroup through ``dg_buf`` (fp32)."""
        S: gl.constexpr = z_bufs.type.shape[0]
        BM: gl.constexpr = z_bufs.type.shape[1]
        R: gl.constexpr = z_bufs.type.shape[2]
        BK: gl.constexpr = do_bufs.type.shape[2]
        dtype: gl.constexpr = dout_desc.dtype
        chunk_layout: gl.constexpr = _accumulator_layout(BK)
        hidden_layout: gl.constexpr = _accumulator_layout(R)
        chunks = D // BK
        kind = gl.program_id(0) // chunks
        gcol = kind * D + (gl.program_id(0) % chunks) * BK  # the block's first gate column
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, chunk_layout))
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])  # db2's tile sums, one store a thread
        vcols = gl.arange(0, BK, layout=vec_layout)
        bias2 = gl.expand_dims(gl.load(b2 + gcol + cols).to(dtype).to(gl.float32), 0)
        w2_buf = w_bufs.index(0)  # [BK, R]
        mbarrier.wait(w_ready, 0)
        dw2 = gl.zeros((BK, R), dtype=gl.float32, layout=hidden_layout)
        row_start = gl.program_id(1) * rows_per_split
        row_end = gl.minimum(row_start + rows_per_split, M)
        step = 0
        for off_m in range(row_start, row_end, BM):
            s = step % S
            mbarrier.wait(ready.index(s), (step // S) & 1)
            z_buf = z_bufs.index(s)
            logit = warpgroup_mma(z_buf, w2_buf.permute((1, 0)), gl.zeros((BM, BK), dtype=gl.float32, layout=chunk_layout),
                                  use_acc=False, is_async=True)
            logit = warpgroup_mma_wait(num_outstanding=0, deps=(logit, ))
            dout = do_bufs.index(s).load(chunk_layout).to(gl.float32)
            x = x_bufs.index(s).load(chunk_layout).to(gl.float32)
            g = _fast_sigmoid(logit + bias2)
            mbarrier.wait(dg_empty, (step & 1) ^ 1)  # the weight warpgroup has read the previous tile's
            dg_buf.store(dout * g)
            mbarrier.arrive(dg_full, count=1)
            # rows past M (a split's last tile): dout and x load as 0, so dl is 0 there
            dl = (dout * x * g * (1.0 - g)).to(dtype)
            db2_tile = gl.convert_layout(gl.sum(dl.to(gl.float32), axis=0), vec_layout)
            gl.store(db2_partial + (off_m // BM) * width + gcol + vcols, db2_tile)
            dl_buf.store(dl)  # (the previous tile's dW2c wgmma, its reader, was waited for)
            fence_async_shared()  # dl for the wgmma; the stage's register reads before its release
            dw2 = warpgroup_mma(dl_buf.permute((1, 0)), z_buf, dw2, is_async=True)
            dw2 = warpgroup_mma_wait(num_outstanding=0, deps=(dw2, ))
            mbarrier.arrive(empty.index(s), count=1)
            step += 1
        rows = gl.arange(0, BK, layout=gl.SliceLayout(1, hidden_layout))
        r_idx = gl.arange(0, R, layout=gl.SliceLayout(0, hidden_layout))
        base = dw2_partial + gl.program_id(1).to(gl.int64) * width * R
        gl.store(base + gl.expand_dims((gcol + rows) * R, 1) + gl.expand_dims(r_idx, 0), dw2)


    @gluon.jit
    def _consume_weights(w1_desc, down_desc, dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dg_buf,
                         out_buf, ready, empty, w_ready, dg_full, dg_empty, dw1_partial, M, D, width, rows_per_split):
        """The weight warpgroup: per tile ``dsrc = dout * g + dpre @ W1c`` (stored by TMA) and
        ``dW1c += dpre^T @ x_kc``."""
        S: gl.constexpr = z_bufs.type.shape[0]
        BM: gl.constexpr = z_bufs.type.shape[1]
        R: gl.constexpr = z_bufs.type.shape[2]
        BK: gl.constexpr = do_bufs.type.shape[2]
        dtype: gl.constexpr = do_bufs.dtype
        chunk_layout: gl.constexpr = _accumulator_layout(BK)
        chunks = D // BK
        kind = gl.program_id(0) // chunks
        col = (gl.program_id(0) % chunks) * BK
        gcol = kind * D + col
        w1_buf = w_bufs.index(1)._reinterpret(w1_desc.dtype, w1_desc.block_type.shape, w1_desc.layout)  # [R, BK]
        mbarrier.wait(w_ready, 0)
        dw1 = gl.zeros((R, BK), dtype=gl.float32, layout=chunk_layout)
        row_start = gl.program_id(1) * rows_per_split
        row_end = gl.minimum(row_start + rows_per_split, M)
        step = 0
        for off_m in range(row_start, row_end, BM):
            s = step % S
            mbarrier.wait(ready.index(s), (step // S) & 1)
            dp_buf = dp_bufs.index(s)
            part = warpgroup_mma(dp_buf, w1_buf, gl.zeros((BM, BK), dtype=gl.float32, layout=chunk_layout), use_acc=False,
                                 is_async=True)
            dw1 = warpgroup_mma(dp_buf.permute((1, 0)), x_bufs.index(s), dw1, is_async=True)
            part = warpgroup_mma_wait(num_outstanding=1, deps=(part, ))
            mbarrier.wait(dg_full, step & 1)
            dsrc = (part + dg_buf.load(chunk_layout)).to(dtype)
            mbarrier.arrive(dg_empty, count=1)
            tma.store_wait(pendings=0)  # the previous tile's gradient has left out_buf
            out_buf.store(dsrc)
            fence_async_shared()
            if kind == 0:
                tma.async_copy_shared_to_global(down_desc, [off_m, col], out_buf)
            elif kind == 1:
                tma.async_copy_shared_to_global(dother_desc, [off_m, col], out_buf)
            else:
                tma.async_copy_shared_to_global(dinj_desc, [off_m, col], out_buf)
            dw1 = warpgroup_mma_wait(num_outstanding=0, deps=(dw1, ))
            mbarrier.arrive(empty.index(s), count=1)  # (only wgmmas and TMA read this stage here)
            step += 1
        rows = gl.arange(0, R, layout=gl.SliceLayout(1, chunk_layout))
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, chunk_layout))
        base = dw1_partial + gl.program_id(1).to(gl.int64) * R * width
        gl.store(base + gl.expand_dims(rows * width, 1) + gl.expand_dims(gcol + cols, 0), dw1)
        tma.store_wait(pendings=0)


    @functools.lru_cache(maxsize=None)
    def _backward_kernel():
        """The backward's second kernel (see the module docstring)."""

        @gluon.jit
        def gates(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc, dother_desc,
                  dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, out_buf, ready, empty, w_ready,
                  dg_full, dg_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D, width, rows_per_split):
            _consume_gates(dout_desc, w1_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, ready, empty,
                           w_ready, dg_full, dg_empty, b2, dw2_partial, db2_partial, M, D, width, rows_per_split)

        @gluon.jit
        def weights(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc, dother_desc,
                    dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, out_buf, ready, empty, w_ready,
                    dg_full, dg_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D, width, rows_per_split):
            _consume_weights(w1_desc, down_desc, dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dg_buf,
                             out_buf, ready, empty, w_ready, dg_full, dg_empty, dw1_partial, M, D, width, rows_per_split)

        @gluon.jit
        def producer(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc,
                     dother_desc, dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, out_buf, ready,
                     empty, w_ready, dg_full, dg_empty, b2, dw1_partial, dw2_partial, db2_partial, M, D, width,
                     rows_per_split):
            _produce_bwd(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, z_bufs, dp_bufs,
                     do_bufs, x_bufs, w_bufs, ready, empty, w_ready, M, D, rows_per_split)

        @gluon.jit
        def gated_blend_backward_kernel(dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc,
                                        down_desc, dother_desc, dinj_desc, b2, dw1_partial, dw2_partial, db2_partial, M, D,
                                        width, rows_per_split, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = own_desc.dtype
            BM: gl.constexpr = own_desc.block_type.shape[0]
            BK: gl.constexpr = own_desc.block_type.shape[1]
            z_bufs = gl.allocate_shared_memory(dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
            dp_bufs = gl.allocate_shared_memory(dtype, [STAGES] + dpre_desc.block_type.shape, dpre_desc.layout)
            do_bufs = gl.allocate_shared_memory(dtype, [STAGES] + dout_desc.block_type.shape, dout_desc.layout)
            x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + own_desc.block_type.shape, own_desc.layout)
            w_bufs = gl.allocate_shared_memory(dtype, [2] + w2_desc.block_type.shape, w2_desc.layout)
            dl_buf = gl.allocate_shared_memory(dtype, own_desc.block_type.shape, own_desc.layout)
            dg_buf = gl.allocate_shared_memory(gl.float32, [BM, BK], gl.SwizzledSharedLayout(2, 1, 8, [1, 0]))  # (swizzled:
        # the accumulator layout's rows 256 B apart would share banks)
            out_buf = gl.allocate_shared_memory(dtype, down_desc.block_type.shape, down_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each stage
            mbarrier.init(bars.index(0), count=1)  # the weight tiles
            mbarrier.init(bars.index(1), count=1)  # dout * g written (the gate warpgroup)
            mbarrier.init(bars.index(2), count=1)  # dout * g read (the weight warpgroup)
            args = (dout_desc, own_desc, other_desc, inj_desc, z_desc, dpre_desc, w1_desc, w2_desc, down_desc, dother_desc,
                    dinj_desc, z_bufs, dp_bufs, do_bufs, x_bufs, w_bufs, dl_buf, dg_buf, out_buf, ready, empty,
                    bars.index(0), bars.index(1), bars.index(2), b2, dw1_partial, dw2_partial, db2_partial, M, D, width,
                    rows_per_split)
            gl.warp_specialize([(gates, args), (weights, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return gated_blend_backward_kernel

def descriptors(own, other, inj, w1, w2, out) -> tuple:
    """TMA descriptors of own, other, inj (own's when None: not read), W1, W2 and out."""
    r = w1.shape[0]
    src_box = [BLOCK_M, CHUNK]
    return (_describe(own, src_box), _describe(other, src_box), _describe(inj if inj is not None else own, src_box),
            _describe(w1, [r, CHUNK]), _describe(w2, [CHUNK, r]), _describe(out, [BLOCK_M // 2, CHUNK]))


def gated_blend_forward(own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """``out`` [M, D] (see the module docstring); the caller checks ``supported``. ``programs``: the
    persistent grid (default one program per SM; tests pass fewer to give each several tiles)."""
    from hrm_kernels.precompile import launch

    m, d = own.shape
    out = torch.empty_like(own)
    tiles = triton.cdiv(m, BLOCK_M)
    launch(_kernel(2 if inj is None else 3), persistent_grid(programs, tiles, own.device, "gated_blend (Gluon)"),
           *descriptors(own, other, inj, w1, w2, out),
           b1, b2, m, d, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return out


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


def backward_supported(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, z: torch.Tensor, dpre: torch.Tensor) -> bool:
    """``backward_main(...)`` can run: ``dpre_supported``'s requirements, and W1 [R, 3D] and d_pre1
    like them."""
    return (dpre_supported(dout, own, other, inj, w2, b2, dpre, z) and w1.shape == (w2.shape[1], w2.shape[0])
            and w1.dtype == own.dtype and w1.is_contiguous() and w1.data_ptr() % 16 == 0)


def backward_descriptors(dout, own, other, inj, z, dpre, w1, w2, d_own, d_other, d_inj) -> tuple:
    """TMA descriptors of the backward's second kernel (inj and d_inj: own's and d_own's when None)."""
    r = z.shape[1]
    box = [BACKWARD_TILE, CHUNK]
    return (_describe(dout, box), _describe(own, box), _describe(other, box),
            _describe(inj if inj is not None else own, box), _describe(z, [BACKWARD_TILE, r]),
            _describe(dpre, [BACKWARD_TILE, r]), _describe(w1, [r, CHUNK]), _describe(w2, [CHUNK, r]),
            _describe(d_own, box), _describe(d_other, box), _describe(d_inj if inj is not None else d_own, box))


def backward_main(dout: torch.Tensor, own: torch.Tensor, other: torch.Tensor, inj, w1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, z: torch.Tensor, dpre: torch.Tensor, d_own: torch.Tensor, d_other: torch.Tensor,
                  d_inj, splits_per_block: int = 0):
    """The backward's second kernel: writes d_own, d_other, d_inj (unless inj is None) and returns
    the partial sums (dW1 [splits, R, width], dW2 [splits, width, R], db2 [tiles, width]; width =
    kinds * D). The caller checks ``backward_supported``. ``splits_per_block``: row splits per
    64-column block (default: as many as fill the SMs once)."""
    from hrm_kernels.precompile import launch

    m, d = own.shape
    r = z.shape[1]
    kinds = 3 if inj is not None else 2
    width = kinds * d
    blocks = kinds * (d // CHUNK)
    tiles = triton.cdiv(m, BACKWARD_TILE)
    if splits_per_block < 1:  # one program an SM (208 KiB of shared memory each)
        splits_per_block = max(1, torch.cuda.get_device_properties(own.device).multi_processor_count // blocks)
    rows_per_split = triton.cdiv(tiles, min(tiles, splits_per_block)) * BACKWARD_TILE
    splits = triton.cdiv(m, rows_per_split)
    dw1_partial = torch.empty((splits, r, width), dtype=torch.float32, device=own.device)
    dw2_partial = torch.empty((splits, width, r), dtype=torch.float32, device=own.device)
    db2_partial = torch.empty((tiles, width), dtype=torch.float32, device=own.device)
    launch(_backward_kernel(), (blocks, splits),
           *backward_descriptors(dout, own, other, inj, z, dpre, w1, w2, d_own, d_other, d_inj),
           b2, dw1_partial, dw2_partial, db2_partial, m, d, width, rows_per_split, STAGES=BACKWARD_STAGES,
           CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return dw1_partial, dw2_partial, db2_partial
