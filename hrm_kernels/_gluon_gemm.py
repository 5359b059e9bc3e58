"""A warp-specialised, persistent Hopper GEMM written in Gluon (Triton's lower-level dialect), with
an epilogue of our own: ``out = epilogue(x @ weight.T)`` for x [M, K], weight [N, K] (``nn.Linear``
layout), both bf16 or fp16, fp32 accumulation.

Epilogues:

- ``"none"``: ``out = x @ weight.T`` ([M, N], rounded to x's dtype).
- ``"swiglu"``: weight holds gate rows [0, I) then up rows [I, 2I) (N = 2I);
  ``gate, up = x @ weight[:I].T, x @ weight[I:].T`` rounded to x's dtype as ``F.linear`` would, then
  ``out = silu(gate) * up`` in fp32 ([M, I], rounded once).
- ``"swiglu_keep"``: ``"swiglu"`` that also writes ``gate_up = [gate, up]`` [M, 2I] (what the
  activation's backward reads), for the passes with a gradient.
- ``"rope"``: x @ weight.T of a qkv projection (N = 3 x heads x head_dim), rounded to x's dtype,
  with RoPE applied to its q and k heads in fp32 (``hrm_kernels.rope``'s math; position = row %
  seq_len), rounded once more: where the attention does not rotate as it loads (sequences beyond
  ``rope_attention``'s kernel, FlashAttention, its switches off), RoPE is otherwise a pass of its
  own over q and k.

Two options on top (``hrm_kernels.deferred_norm``, the post-norm blocks' RMSNorm deferred into the
matmuls):

- a row scale (``gemm(..., ss=)``): x is read as ``rms_norm(x)``: each row of the fp32 accumulator is
  multiplied by ``rsqrt(sum(ss[m]) / K + eps)`` before the epilogue, ``ss`` [M, T] being partial sums
  of squares of x's rows;
- a residual (``gemm_add_sumsq``, plain epilogue): ``h = r + x @ weight.T`` (both terms rounded to
  the dtype), ``r`` a [M, N] tensor or its RMS norm; the residual tile arrives by TMA in the
  warpgroup's output buffer during the main loop, and the epilogue also writes each row's sum of
  squares of h over the tile's columns, [M, N / BLOCK_N] fp32.

Why Gluon: at HRM's K = 512 a GEMM tile runs only 8 k-steps, so the epilogue (fp32 -> 16-bit,
shared memory, TMA store) is a large share of a tile's time. cuBLAS hides it with warp
specialisation; Triton's ``tl.dot`` kernels cannot, and reach 540-610 TFLOP/s here against cuBLAS's
600-650 (benchmarks/RESULTS.md). Partitions of one program (12 warps):

- a producer warp issues the TMA loads of x [BM, BK] and weight [BN, BK] tiles (SwiGLU: BN weight
  rows hold BN / 2 gate rows and their up rows, interleaved by ``interleave_gate_up``) into a ring
  of ``STAGES`` shared-memory buffers, each with a ``ready`` mbarrier (its bytes have landed) and an
  ``empty`` one (its wgmmas are done);
- two consumer warpgroups take the program's output tiles in turn ("ping-pong"): while one runs its
  epilogue, the other's wgmmas use the tensor cores. An ``order`` mbarrier pair makes each start its
  main loop only once the other has issued its own, so the ring's stages are consumed in the order
  they were filled (an mbarrier's phase parity cannot tell a waiter two phases apart).

Output tiles are numbered row-major (all N tiles of a row block, then the next) and dealt to the
SM-count programs round-robin, so the programs running together share their x rows through L2.
Sizes: any M; K and N (I) multiples of 8 (TMA's 16-byte rows); tiles past the edges read zeros and
their stores are clipped. Hopper only (sm_90: wgmma); ``available(device)`` says where it runs.
There is no interpreter path: CPU tests compile it for sm_90 (``tests/test_compile_for_gpu.py``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the API this file is written against (Triton 3.6-3.8): warp_specialize over (function, args) pairs
    _HAVE_GLUON = (hasattr(gluon, "constexpr_function") and hasattr(gl, "warp_specialize")
                   and next(iter(inspect.signature(gl.warp_specialize).parameters), None) == "functions_and_args")
except (ImportError, AttributeError, ValueError, TypeError):  # older Triton: the callers keep their Triton kernels
    _HAVE_GLUON = False

EPILOGUES = {"none": 0, "swiglu": 1, "swiglu_keep": 2, "rope": 3}
# The kernel variants the library launches: (epilogue, row scale, residual: 0 none, 1 raw, 2 normalized).
VARIANTS = (("none", False, 0), ("swiglu", False, 0), ("none", True, 0), ("swiglu", True, 0), ("none", False, 1),
            ("none", False, 2), ("swiglu_keep", False, 0), ("rope", False, 0), ("rope", True, 0))
WEIGHT_ROWS_PER_COLUMN = {"none": 1, "swiglu": 2, "swiglu_keep": 2, "rope": 1}  # SwiGLU: a gate and an up row a column
ROPE_HEAD_DIMS = (16, 32, 64, 128)  # the "rope" epilogue's: a tile's 128 columns hold whole heads
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES) per epilogue. H100, M=62976, K=512, bf16: 4 stages against 3
# took the plain GEMM from 0.72-0.77x to 0.88-0.94x of cuBLAS (session 21), 5 stages to 0.89-0.99x
# (session 22: N x K 512x512 60.4 us vs cuBLAS 58.1, 1536x512 171.2 vs 152.9, 3072x512 320.7 vs 298.7,
# 512x1536 150.0 vs 148.2; [128, 128, 128] x 2 stages 0.56-0.69x). SwiGLU at BLOCK_N=64 (two [128, 64]
# fp32 accumulators a warpgroup): 309.8 us with 4 stages, 308.3 with 6, 323.0 with BLOCK_K=128 x 3.
# "swiglu_keep": as "swiglu", plus a gate and an up tile buffer per warpgroup (224 KB of shared memory).
# Session 26: the SwiGLU variants' BLOCK_N counts weight rows (gate and up interleaved, one n = 128
# wgmma a k-step; the output tile is [128, 64]), against two n = 64 wgmmas reading the same x tile
# (medians of 7 alternating rounds, H100, M = 62976 / 86496): with the row scale (the no-gradient
# blocks' calls) 311.7 / 426.3 us against 327.8 / 448.4; "swiglu_keep" 393.7 / 537.8 against
# 394.9 / 540.0; plain "swiglu" (no row scale: not in the default steps' large calls, which are all
# row-scaled; linear_swiglu's no-gradient path, e.g. DEFERRED_NORM off) 346.9 / 483.1 against
# 303.7 / 417.0
# (cuBLAS's plain 3072 x 512 GEMM: 292.3 / 412.0). Stages 4 / 5 / 6: plain 331.6 / 349.5 / 354.1,
# row scale 312.3 / 310.8 / 312.4.
# Session 36 (benchmarks/tune_gluon_gemm.py, H100, ARC's M = 86496, the no-gradient block's calls):
# each default the fastest of the sweep's candidates (benchmarks/RESULTS.md, session 36).
CONFIGS = {"none": (128, 128, 64, 5), "swiglu": (128, 128, 64, 4), "swiglu_keep": (128, 128, 64, 4),
           "rope": (128, 128, 64, 5)}
CONSUMER_REGISTERS = 232  # the second consumer's; the producer warp gets 40, the first consumer the rest


@functools.lru_cache(maxsize=None)
def available(device: torch.device) -> bool:
    """The kernel can run on ``device``: an NVIDIA Hopper GPU (compute capability 9.x; ROCm reports
    9.x for some AMD GPUs too) and a Triton with Gluon's Hopper API (3.6 or newer)."""
    return (_HAVE_GLUON and device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] == 9)


def output_width(weight: torch.Tensor, epilogue: str) -> int:
    """Columns of ``gemm``'s output for this weight."""
    return weight.shape[0] // WEIGHT_ROWS_PER_COLUMN[epilogue]


def supported(x: torch.Tensor, weight: torch.Tensor, epilogue: str) -> bool:
    """``gemm(x, weight, epilogue)`` can run: Hopper, 2-byte floats of one dtype, 2-D contiguous rows,
    K and the output width multiples of 8, 16-byte aligned pointers."""
    if not (available(x.device) and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]):
        return False
    n_out = output_width(weight, epilogue)
    return (x.shape[1] % 8 == 0 and n_out % 8 == 0 and weight.shape[0] == n_out * WEIGHT_ROWS_PER_COLUMN[epilogue]
            and x.stride(1) == 1 and x.stride(0) == x.shape[1] and weight.is_contiguous()
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


if _HAVE_GLUON:

    def warpgroup_jit(fn, warpgroup: int):
        """``gluon.jit(fn)`` under a name of its own for consumer ``warpgroup`` (``fn``: a partition
        function a kernel factory makes per warpgroup, closing over that warpgroup's constexpr).
        Triton names a called function's compiled body by module, qualified name and argument types
        alone, so two such closures in one kernel share the body compiled first: with three consumer
        warpgroups the third ran the second's rows (two ran apart only because the default partition
        is called without the workers' warp count in its name)."""
        fn.__qualname__ = f"{fn.__qualname__}_{warpgroup}"
        return gluon.jit(fn)

    @gluon.constexpr_function
    def _accumulator_layout(BLOCK_N):
        n = 256  # the widest wgmma instruction that tiles BLOCK_N
        while n > BLOCK_N or BLOCK_N % n:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    # narrow / rounded through cvt.rn.bf16x2.f32 (operand order checked in the LLVM IR and PTX: element 0 in
    # the low half, as Triton's own packed conversion). Off: session 38 (H100) timed it at 0.84-1.05x a call
    # (the swiglu + row scale epilogue slower, the gated blend 4-5% faster) and the rope epilogue's output
    # one bf16 ulp off the unpacked one in places (benchmarks/RESULTS.md, session 38).
    PACKED_CONVERSIONS = gl.constexpr(False)

    @gluon.jit
    def narrow(x, dtype: gl.constexpr):
        """``x.to(dtype)``, rounded to nearest even. From fp32 to bf16 with ``PACKED_CONVERSIONS``, two
        elements per ``cvt.rn.bf16x2.f32``: the compiler pairs two conversions only where both results
        go straight into one register for a store; elsewhere (a rounding the epilogue computes on, a
        tile whose layout was permuted) it converts one element per instruction, and an H100 issues
        conversions at 16 a clock per SM against 128 fp32 FMAs (the rope epilogue took 256 a thread
        and tile)."""
        if PACKED_CONVERSIONS and dtype == gl.bfloat16 and x.dtype == gl.float32:
            return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16,
                                             is_pure=True, pack=2)
        else:
            return x.to(dtype)

    @gluon.jit
    def narrow_for_widening(x, dtype: gl.constexpr):
        """``narrow(x, dtype)`` for a value the epilogue widens back to fp32 (SwiGLU's gate and up). To
        fp16 in explicit ``cvt.rn.f16x2.f32`` pairs (element 0 in the low half; the same rounding): from
        scalar conversions ptxas builds such pairs itself, out of the accumulator's registers, and then
        serializes every wgmma of the kernel (note C7514; session 45 found it, ``tests/test_compile_for_gpu.py``
        checks it). bf16 widens by a shift and is not re-paired: unchanged."""
        if dtype == gl.float16 and x.dtype == gl.float32:
            return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16,
                                             is_pure=True, pack=2)
        else:
            return narrow(x, dtype)

    @gluon.jit
    def rounded(x, dtype: gl.constexpr):
        """``x.to(dtype).to(float32)``: x rounded to the 2-byte ``dtype``, as a matmul writing that
        dtype rounds it. From fp32 to bf16 with ``PACKED_CONVERSIONS``, two elements per conversion,
        unpacked by bit operations (``narrow``'s reason)."""
        if PACKED_CONVERSIONS and dtype == gl.bfloat16 and x.dtype == gl.float32:
            return gl.inline_asm_elementwise(
                "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
                "=r,=r,r,r", [x], dtype=gl.float32, is_pure=True, pack=2)
        else:
            return x.to(dtype).to(gl.float32)

    @gluon.jit
    def _tile_origin(tile, n_tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        return (tile // n_tiles_n) * BLOCK_M, (tile % n_tiles_n) * BLOCK_N

    @gluon.jit
    def _fill_ring(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, BLOCK_N: gl.constexpr,
                   B_ROWS_ARE_N: gl.constexpr):
        """The producer warp of a ping-pong GEMM: every k-step of every output tile of this program,
        in order, into the ring: the A tile [BLOCK_M, BLOCK_K] at (off_m, k) and the B tile at
        (off_n, k) if ``B_ROWS_ARE_N`` (an [N, K] weight) else at (k, off_n) ([K, N])."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        NBYTES: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        n_tiles_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        step = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_origin(tile, n_tiles_n, BLOCK_M, BLOCK_N)
            for kk in range(k_steps):
                s = step % STAGES
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
                mbarrier.expect(ready.index(s), NBYTES)
                tma.async_copy_global_to_shared(a_desc, [off_m, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
                if B_ROWS_ARE_N:
                    tma.async_copy_global_to_shared(b_desc, [off_n, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
                else:
                    tma.async_copy_global_to_shared(b_desc, [kk * BLOCK_K, off_n], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N_OUT, K, SWIGLU: gl.constexpr):
        """The producer warp (``_fill_ring`` over the weight's rows: SwiGLU's are 2 * N_OUT, gate and
        up interleaved)."""
        _fill_ring(x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N_OUT * (1 + SWIGLU), K, w_desc.block_type.shape[0],
                   True)

    @gluon.jit
    def _barriers(STAGES: gl.constexpr):
        """The ping-pong GEMMs' mbarriers, initialised: ``ready`` / ``empty`` per ring stage (its bytes
        have landed / its wgmmas are done), ``order`` and ``epi_ready`` per consumer warpgroup (the
        other's main loop is issued / its epilogue operands have landed)."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        epi_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(order.index(i), count=1)
            mbarrier.init(epi_ready.index(i), count=1)
        return ready, empty, order, epi_ready

    @gluon.jit
    def _gate_up_columns(acc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """The gate and up columns [BLOCK_M, BLOCK_N / 2] of an accumulator tile over interleaved
        weight rows (``interleave_gate_up``: 8 gate rows, then their 8 up rows). Register
        renaming only: a thread of the wgmma layout holds both halves of each 16-column group, and
        the halves come out in the layout of an n = BLOCK_N / 2 accumulator (stmatrix stores)."""
        groups = gl.permute(gl.reshape(acc, [BLOCK_M, BLOCK_N // 16, 2, 8]), (0, 1, 3, 2))
        gate, up = gl.split(groups)
        return gl.reshape(gate, [BLOCK_M, BLOCK_N // 2]), gl.reshape(up, [BLOCK_M, BLOCK_N // 2])

    @gluon.jit
    def _head_halves(x, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The halves (x1, x2) [BLOCK_M, heads, HEAD_DIM / 2] of each head of a [BLOCK_M, BLOCK_N]
        accumulator-layout tile. Register renaming as in ``_gate_up_columns``: a thread holds both
        halves of its heads' pairs."""
        HALF: gl.constexpr = HEAD_DIM // 2
        return gl.split(gl.permute(gl.reshape(x, [BLOCK_M, BLOCK_N // HEAD_DIM, 2, HALF]), (0, 1, 3, 2)))

    @gluon.jit
    def _rope_tables(layout: gl.constexpr, cos, sin, off_m, seq_len, t_stride, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The cos and sin half tables of a tile's rows (position row % seq_len, ``cos[pos *
        t_stride + j]``, j < HEAD_DIM / 2), [BLOCK_M, 1, HEAD_DIM / 2] in the layout of
        ``_head_halves`` of an accumulator in ``layout``: one load serves all the tile's heads."""
        probe, _ = _head_halves(gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout), BLOCK_M, BLOCK_N, HEAD_DIM)
        table: gl.constexpr = gl.SliceLayout(1, probe.type.layout)  # [BLOCK_M, HEAD_DIM / 2]
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, table))
        j = gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, table))
        t = gl.expand_dims((rows % seq_len) * t_stride, 1) + gl.expand_dims(j, 0)
        return gl.expand_dims(gl.load(cos + t), 1), gl.expand_dims(gl.load(sin + t), 1)

    @gluon.jit
    def _rope_columns(x, c, s, off_n, rope_cols, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      HEAD_DIM: gl.constexpr):
        """RoPE (rotate-half) on a [BLOCK_M, BLOCK_N] fp32 tile at column off_n of a qkv projection:
        each head's halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) with c, s the rows' tables
        (``_rope_tables``), in the heads below column ``rope_cols`` (q and k); v's pass through."""
        HEADS: gl.constexpr = BLOCK_N // HEAD_DIM
        x1, x2 = _head_halves(x, BLOCK_M, BLOCK_N, HEAD_DIM)
        pairs: gl.constexpr = x1.type.layout  # [BLOCK_M, HEADS, HEAD_DIM / 2]
        heads = gl.arange(0, HEADS, layout=gl.SliceLayout(0, gl.SliceLayout(2, pairs)))
        rotated = gl.expand_dims(gl.expand_dims(off_n + heads * HEAD_DIM < rope_cols, 0), 2)  # q and k heads
        y = gl.join(gl.where(rotated, x1 * c - x2 * s, x1), gl.where(rotated, x2 * c + x1 * s, x2))
        return gl.reshape(gl.permute(y, (0, 1, 3, 2)), [BLOCK_M, BLOCK_N])

    @gluon.jit
    def _row_rstd(ss_in, rows, M, ss_in_tiles, width, eps):
        """``rsqrt(mean of squares + eps)`` for ``rows`` from their partial sums of squares
        ``ss_in`` [M, ss_in_tiles] (fp32, summed in column order) over ``width`` columns."""
        total = gl.load(ss_in + rows * ss_in_tiles, mask=rows < M, other=0.0)
        for t in range(1, ss_in_tiles):
            total += gl.load(ss_in + rows * ss_in_tiles + t, mask=rows < M, other=0.0)
        return gl.rsqrt(total / width + eps)

    @gluon.jit
    def _consume(x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, x_bufs, w_bufs, out_bufs, gu_bufs,
                 ready, empty, order, epi_ready, ss_in, ss_out, M, N_OUT, K, ss_in_tiles, eps, cos, sin, seq_len,
                 t_stride, rope_cols, EPILOGUE: gl.constexpr, ROW_SCALE: gl.constexpr, RESIDUAL: gl.constexpr,
                 WARPGROUP: gl.constexpr, HEAD_DIM: gl.constexpr):
        """One consumer warpgroup: the program's tiles j with j % 2 == WARPGROUP. With a residual,
        its tile arrives by TMA in the warpgroup's output buffer while the main loop runs. SwiGLU
        keeping gate_up stages the rounded gate and up tiles in ``gu_bufs`` [2 * WARPGROUP + 0/1]."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]  # weight rows a tile (SwiGLU: 2 x its output columns)
        BLOCK_N_OUT: gl.constexpr = out_desc.block_type.shape[1]
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        layout: gl.constexpr = _accumulator_layout(BLOCK_N)
        n_tiles_n = gl.cdiv(N_OUT, BLOCK_N_OUT)
        k_steps = gl.cdiv(K, BLOCK_K)
        # The rope epilogue's tables are loaded while the tile's last wgmmas run (ARC's no-gradient qkv
        # GEMM, H100: 264 against 289 us) where the registers allow it. Loaded early, the tables live
        # next to the accumulator, and ptxas spills at HEAD_DIM 128 and in several variants without the
        # row scale (sm_90 SASS under Triton 3.6 and 3.8); those load after the accumulator is complete.
        # Checked for CONFIGS["rope"] and CONSUMER_REGISTERS as they are: recheck if either changes.
        EARLY_TABLES: gl.constexpr = EPILOGUE == 3 and ROW_SCALE and HEAD_DIM <= 64
        # At HEAD_DIM 128 a thread's tables for the whole tile (128 registers) spill even after the
        # accumulator is complete (Triton 3.6): the tile is rounded into out_buf, then rotated there
        # in two row halves (the same rounding and math; sm_90 SASS without spills under 3.6 and 3.8).
        HALVES_ROPE: gl.constexpr = EPILOGUE == 3 and HEAD_DIM > 64
        out_buf = out_bufs.index(WARPGROUP)
        bar = epi_ready.index(WARPGROUP)
        j = 0  # the program's tiles so far (both warpgroups count all of them)
        for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles_n, gl.num_programs(0)):
            if j % 2 == WARPGROUP:
                if j > 0:  # the other warpgroup has waited for every stage of tile j - 1
                    mbarrier.wait(order.index(WARPGROUP), ((j - 1) // 2) & 1)
                off_m, off_n = _tile_origin(tile, n_tiles_n, BLOCK_M, BLOCK_N_OUT)
                if RESIDUAL > 0:  # the residual tile lands in out_buf once its previous store has left
                    tma.store_wait(pendings=0)
                    mbarrier.expect(bar, res_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(res_desc, [off_m, off_n], bar, out_buf)
                acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
                step = j * k_steps
                for kk in range(k_steps):
                    s = step % STAGES
                    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                    acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    if kk > 0:  # the previous k-step's wgmmas are done: its stage may refill
                        mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                    step += 1
                mbarrier.arrive(order.index(1 - WARPGROUP), count=1)  # the other warpgroup's turn
                if EARLY_TABLES:
                    cos_tile, sin_tile = _rope_tables(layout, cos, sin, off_m, seq_len, t_stride, BLOCK_M, BLOCK_N,
                                                      HEAD_DIM)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                if ROW_SCALE or RESIDUAL == 2:
                    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
                    rstd = gl.expand_dims(_row_rstd(ss_in, rows, M, ss_in_tiles, K if ROW_SCALE else N_OUT, eps), 1)
                    if ROW_SCALE:  # rms_norm(x) @ W.T as rstd * (x @ W.T)
                        acc = acc * rstd
                if EPILOGUE == 1 or EPILOGUE == 2:
                    gate, up = _gate_up_columns(acc, BLOCK_M, BLOCK_N)
                    gate_rounded = narrow_for_widening(gate, out_desc.dtype)
                    up_rounded = narrow_for_widening(up, out_desc.dtype)
                    if EPILOGUE == 2:  # this warpgroup's previous stores have left its buffers
                        tma.store_wait(pendings=0)
                        gu_bufs.index(2 * WARPGROUP).store(gate_rounded)
                        gu_bufs.index(2 * WARPGROUP + 1).store(up_rounded)
                    gate = gate_rounded.to(gl.float32)
                    up = up_rounded.to(gl.float32)
                    result = gate / (1.0 + gl.exp(-gate)) * up
                elif RESIDUAL > 0:  # h = residual + y in the activations' dtype, as the reference adds
                    mbarrier.wait(bar, (j // 2) & 1)
                    residual = out_buf.load(layout).to(gl.float32)
                    if RESIDUAL == 2:  # the residual is rms_norm(h_prev), rounded as the reference's norm
                        residual = (residual * rstd).to(out_desc.dtype).to(gl.float32)
                    result = (residual + acc.to(out_desc.dtype).to(gl.float32)).to(out_desc.dtype)
                    squares = result.to(gl.float32)
                    rows_out = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
                    gl.store(ss_out + rows_out * n_tiles_n + off_n // BLOCK_N_OUT, gl.sum(squares * squares, axis=1),
                             mask=rows_out < M)
                elif EPILOGUE == 3 and HALVES_ROPE:  # the rounded tile in out_buf, rotated there a half at a time
                    tma.store_wait(pendings=0)  # this warpgroup's previous store has left out_buf
                    out_buf.store(acc.to(out_desc.dtype))
                    for half in gl.static_range(2):  # each thread reads back the rows it wrote (same layout)
                        rows_half = out_buf.slice(half * (BLOCK_M // 2), BLOCK_M // 2, dim=0)
                        cos_tile, sin_tile = _rope_tables(layout, cos, sin, off_m + half * (BLOCK_M // 2), seq_len,
                                                          t_stride, BLOCK_M // 2, BLOCK_N, HEAD_DIM)
                        rows_half.store(narrow(_rope_columns(rows_half.load(layout).to(gl.float32), cos_tile, sin_tile,
                                                             off_n, rope_cols, BLOCK_M // 2, BLOCK_N, HEAD_DIM),
                                               out_desc.dtype))
                elif EPILOGUE == 3:  # q and k rotated as the reference rotates F.linear's rounded output
                    if not EARLY_TABLES:
                        cos_tile, sin_tile = _rope_tables(layout, cos, sin, off_m, seq_len, t_stride, BLOCK_M, BLOCK_N,
                                                          HEAD_DIM)
                    result = _rope_columns(rounded(acc, out_desc.dtype), cos_tile, sin_tile, off_n, rope_cols,
                                           BLOCK_M, BLOCK_N, HEAD_DIM)
                else:
                    result = acc
                if not (EPILOGUE == 3 and HALVES_ROPE):  # (that one is in out_buf already)
                    if RESIDUAL == 0 and EPILOGUE != 2:
                        tma.store_wait(pendings=0)  # this warpgroup's previous store has left out_buf
                    out_buf.store(narrow(result, out_desc.dtype))
                fence_async_shared()
                if EPILOGUE == 2:
                    tma.async_copy_shared_to_global(gate_desc, [off_m, off_n], gu_bufs.index(2 * WARPGROUP))
                    tma.async_copy_shared_to_global(up_desc, [off_m, off_n], gu_bufs.index(2 * WARPGROUP + 1))
                tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_buf)
            j += 1
        tma.store_wait(pendings=0)

    @functools.lru_cache(maxsize=None)
    def _kernel(epilogue: int, row_scale: bool, residual: int, head_dim: int = 0):
        """The GEMM kernel of one epilogue variant (``head_dim``: the "rope" epilogue's). Gluon passes
        partition arguments as values, so the variant's constants are written into each partition
        function (captured constexprs)."""
        EPI, SCALE, RES = gl.constexpr(epilogue), gl.constexpr(row_scale), gl.constexpr(residual)
        SWIGLU, HEAD_DIM = gl.constexpr(epilogue in (1, 2)), gl.constexpr(head_dim)

        def consumer(warpgroup: int):
            WARPGROUP = gl.constexpr(warpgroup)

            def consume(x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, x_bufs, w_bufs, out_bufs, gu_bufs,
                        ready, empty, order, epi_ready, ss_in, ss_out, M, N_OUT, K, ss_in_tiles, eps, cos, sin, seq_len,
                        t_stride, rope_cols):
                _consume(x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, x_bufs, w_bufs, out_bufs, gu_bufs,
                         ready, empty, order, epi_ready, ss_in, ss_out, M, N_OUT, K, ss_in_tiles, eps, cos, sin, seq_len,
                         t_stride, rope_cols, EPI, SCALE, RES, WARPGROUP, HEAD_DIM)

            return warpgroup_jit(consume, warpgroup)

        first, second = consumer(0), consumer(1)

        @gluon.jit
        def producer(x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, x_bufs, w_bufs, out_bufs, gu_bufs,
                     ready, empty, order, epi_ready, ss_in, ss_out, M, N_OUT, K, ss_in_tiles, eps, cos, sin, seq_len,
                     t_stride, rope_cols):
            _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N_OUT, K, SWIGLU)

        @gluon.jit
        def gemm_kernel(x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, ss_in, ss_out, M, N_OUT, K, ss_in_tiles,
                        eps, cos, sin, seq_len, t_stride, rope_cols, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
            dtype: gl.constexpr = x_desc.dtype
            x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
            w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
            out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
            if EPI == 2:  # a gate and an up tile per warpgroup
                gu_bufs = gl.allocate_shared_memory(out_desc.dtype, [4] + out_desc.block_type.shape, out_desc.layout)
            else:
                gu_bufs = out_bufs
            ready, empty, order, epi_ready = _barriers(STAGES)
            args = (x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc, x_bufs, w_bufs, out_bufs, gu_bufs,
                    ready, empty, order, epi_ready, ss_in, ss_out, M, N_OUT, K, ss_in_tiles, eps, cos, sin, seq_len,
                    t_stride, rope_cols)
            gl.warp_specialize([(first, args), (second, args), (producer, args)], [4, 1], [CONSUMER_REGS, 40])

        return gemm_kernel


def descriptors(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, epilogue: str) -> tuple:
    """The kernel's TMA descriptors of x, weight and out (host objects; CPU tensors work too)."""
    block_m, block_n, block_k, _ = CONFIGS[epilogue]
    return (_describe(x, [block_m, block_k]), _describe(weight, [block_n, block_k]),
            _describe(out, [block_m, block_n // WEIGHT_ROWS_PER_COLUMN[epilogue]]))


def persistent_grid(programs: int | None, work_items: int, device: torch.device, op: str) -> tuple[int]:
    """A persistent kernel's grid over ``work_items``: ``programs`` (default one per SM of ``device``),
    at most one per item; ``op`` names the caller in the error for fewer than one program."""
    if programs is None:
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    if programs < 1:
        raise ValueError(f"{op}: programs must be at least 1, got {programs}")
    return (min(programs, work_items),)


def _describe(t: torch.Tensor, box: list[int]):
    """A TMA descriptor of the 2-byte-float tensor ``t`` in ``box`` tiles (NVMMA shared layout)."""
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dtype))


def _launch(x, weight, out, epilogue: str, programs, ss_in=None, residual=None, residual_ss=None, eps=None,
            gate_up=None, rope=None):
    """One launch of the kernel variant these arguments ask for; returns the output's partial sums of
    squares [M, N tiles] when ``residual`` is given, else None. ``gate_up``: the [M, 2I] tensor
    ``"swiglu_keep"`` writes; ``rope``: the "rope" epilogue's (cos, sin, seq_len, head_dim), checked."""
    from hrm_kernels.precompile import launch

    n_rows, n_out = out.shape
    if programs is not None and programs < 1:
        raise ValueError(f"gemm: programs must be at least 1, got {programs}")
    if residual is not None and (epilogue != "none" or ss_in is not None):
        raise ValueError("gemm: a residual goes with the plain epilogue and no row scale (the kernel has no such variant)")
    if (ss_in is not None or residual_ss is not None) and eps is None:
        raise ValueError("gemm: pass the RMS norm's eps with ss / residual_ss")
    ss = ss_in if ss_in is not None else residual_ss
    if ss is not None and (ss.dtype != torch.float32 or ss.dim() != 2 or ss.shape[0] != n_rows):
        raise ValueError(f"gemm: ss must be fp32 [M={n_rows}, T] partial sums of squares, got {ss.dtype} "
                         f"{tuple(ss.shape)}")
    ss = None if ss is None else ss.contiguous()  # the kernel reads rows of T values
    block_m, block_n, _, stages = CONFIGS[epilogue]
    block_n_out = block_n // WEIGHT_ROWS_PER_COLUMN[epilogue]
    tiles = triton.cdiv(n_rows, block_m) * triton.cdiv(n_out, block_n_out)
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    x_desc, w_desc, out_desc = descriptors(x, weight, out, epilogue)
    res_desc = out_desc if residual is None else _describe(residual, [block_m, block_n_out])
    # the halves of gate_up, each [M, I] with row stride 2I: a tile's store is clipped at column I
    gate_desc, up_desc = ((out_desc, out_desc) if gate_up is None else
                          (_describe(gate_up[:, :n_out], [block_m, block_n_out]),
                           _describe(gate_up[:, n_out:], [block_m, block_n_out])))
    ss_out = None if residual is None else torch.empty((n_rows, triton.cdiv(n_out, block_n_out)), dtype=torch.float32,
                                                        device=x.device)
    unused = out.new_empty(1, dtype=torch.float32)  # pointer arguments of a variant that reads no such tensor
    cos, sin, seq_len, head_dim = (unused, unused, 1, 0) if rope is None else rope
    kernel = _kernel(EPILOGUES[epilogue], ss_in is not None, 0 if residual is None else 1 if residual_ss is None else 2,
                     head_dim)
    launch(kernel, (min(programs, tiles),), x_desc, w_desc, out_desc, res_desc, gate_desc, up_desc,
           unused if ss is None else ss,
           unused if ss_out is None else ss_out, n_rows, n_out, x.shape[1], 1 if ss is None else ss.shape[1],
           0.0 if eps is None else float(eps), cos, sin, seq_len, cos.stride(0), 2 * n_out // 3, STAGES=stages,
           CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return ss_out


def _output(x: torch.Tensor, n_out: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    if out.shape != (x.shape[0], n_out) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gemm: out must be a contiguous {x.dtype} tensor of shape {(x.shape[0], n_out)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def gemm(x: torch.Tensor, weight: torch.Tensor, epilogue: str = "none", programs: int | None = None,
         out: torch.Tensor | None = None, ss: torch.Tensor | None = None, eps: float | None = None,
         gate_up: torch.Tensor | None = None, rope: tuple | None = None) -> torch.Tensor:
    """``epilogue(x @ weight.T)`` (module docstring); the caller checks ``supported`` first.
    ``programs``: the persistent grid (default: one program per SM; tests pass a few to give each
    program many tiles). ``out``: a contiguous [M, N] (SwiGLU: [M, I]) tensor of x's dtype to write.
    ``ss``: partial sums of squares of x's rows [M, T] (fp32, as ``gemm_add_sumsq`` writes them):
    x is then read as ``rms_norm(x, eps)``, each row's accumulator scaled by
    ``rsqrt(sum(ss[m]) / K + eps)`` before the epilogue. ``gate_up``: with ``"swiglu_keep"`` (only),
    the contiguous [M, 2I] tensor of x's dtype that receives the rounded gate and up columns.
    ``rope``: with ``"rope"`` (only), ``(cos, sin, seq_len, head_dim)`` (``check_rope``)."""
    out = _output(x, output_width(weight, epilogue), out)
    if (gate_up is not None) != (epilogue == "swiglu_keep"):
        raise ValueError("gemm: the swiglu_keep epilogue, and it alone, writes gate_up: pass gate_up with it")
    if gate_up is not None and (gate_up.shape != (x.shape[0], 2 * out.shape[1]) or gate_up.dtype != x.dtype
                                or not gate_up.is_contiguous()):
        raise ValueError(f"gemm: gate_up must be a contiguous {x.dtype} tensor of shape "
                         f"{(x.shape[0], 2 * out.shape[1])}, got {gate_up.dtype} {tuple(gate_up.shape)}")
    if (rope is not None) != (epilogue == "rope"):
        raise ValueError("gemm: the rope epilogue, and it alone, takes rope=(cos, sin, seq_len, head_dim)")
    if rope is not None:
        rope = check_rope(x, out.shape[1], *rope)
    if out.numel() == 0 or x.shape[1] == 0:  # (K = 0: every product, gate and up is 0)
        if gate_up is not None:
            gate_up.zero_()
        return out.zero_()
    if WEIGHT_ROWS_PER_COLUMN[epilogue] == 2:
        weight = interleave_gate_up(weight)
    _launch(x, weight, out, epilogue, programs, ss_in=ss, eps=eps, gate_up=gate_up, rope=rope)
    return out


def check_rope(x: torch.Tensor, width: int, cos: torch.Tensor, sin: torch.Tensor, seq_len: int, head_dim: int) -> tuple:
    """The "rope" epilogue's arguments, checked, tables packed: the output [rows of x, width] is a
    qkv projection (q, k, v of width / 3 each, heads of ``head_dim`` in ``ROPE_HEAD_DIMS``, so that
    a 128-column tile holds whole heads whose halves sit in one thread's registers); its rows are
    [batch, seq_len] flattened; cos, sin are fp32 [positions >= seq_len, head_dim / 2] half tables on
    x's device (``hrm_kernels.rope.first_halves``: rotate-half RoPE's tables repeat their halves)."""
    from hrm_kernels.rope import packed_tables

    rows = x.shape[0]
    if head_dim not in ROPE_HEAD_DIMS or width % 3 or (width // 3) % head_dim:
        raise ValueError(f"gemm: the rope epilogue needs a qkv output (width {width} = 3 x heads x head_dim) with "
                         f"head_dim one of {ROPE_HEAD_DIMS}, got head_dim {head_dim}")
    if seq_len < 1 or rows % seq_len:
        raise ValueError(f"gemm: the rope epilogue's rows are [batch, seq_len] flattened: {rows} rows for "
                         f"seq_len {seq_len}")
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] < seq_len or t.shape[1] != head_dim // 2
                or t.device != x.device):
            raise ValueError(f"gemm: the rope epilogue's {name} must be the fp32 half table [positions >= {seq_len}, "
                             f"{head_dim // 2}] (rope.first_halves) on {x.device}, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    cos, sin = packed_tables(cos, sin)
    return cos, sin, seq_len, head_dim


def interleave_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """The SwiGLU kernels' weight order: ``weight`` [2I, K] (gate rows [0, I), up rows [I, 2I), I a
    multiple of 8) as groups of 8 gate rows each followed by the same 8 up rows (a copy). A tile's
    128 weight rows then give one n = 128 wgmma whose accumulator holds 64 gate columns and their
    64 up columns (``_gate_up_columns``). Inside ``shared_weight_layouts`` one copy per weight."""
    memo = _LAYOUTS.memo if _LAYOUTS.capturing == _capturing(weight) else None
    version = None if weight.is_inference() else weight._version  # (inference tensors keep none)
    entry = memo.get(weight) if memo is not None else None
    if entry is not None and entry[0] == version:
        return entry[1]
    rows, k = weight.shape
    interleaved = weight.view(2, rows // 16, 8, k).transpose(0, 1).reshape(rows, k)
    if memo is not None:
        memo[weight] = (version, interleaved)
    return interleaved


class _Layouts(threading.local):
    """``shared_weight_layouts``' state, per thread: the memo (None outside the block; weakly keyed
    by the weight tensor, so that a copy dies with its weight: a weight cast afresh at every call
    keeps no copies alive) and whether the block began inside a CUDA graph capture."""
    memo: WeakIdKeyDictionary | None = None
    capturing: bool | None = None


_LAYOUTS = _Layouts()


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def shared_weight_layouts():
    """Inside the block, ``interleave_gate_up`` makes its copy of a weight once (while the weight
    is the same tensor at the same version) instead of at every SwiGLU matmul: a recurrence that
    calls the same blocks several times (HRM: twelve calls a training step) reorders each weight
    once. It memoizes only in the capture state the block began in: a block entered inside a CUDA
    graph capture must end inside that capture (as a ``with`` block in the captured function
    does), so its copies are the graph's own; one entered outside memoizes nothing while a capture
    runs inside it (a replay would read a copy the graph never makes).
    Nested blocks share the outermost one's memo; its copies are freed when it ends. An inference
    tensor (made under ``torch.inference_mode``) has no version counter: an in-place change to
    one inside the block goes unseen, so such a weight must not change inside it."""
    if _LAYOUTS.memo is not None:
        yield
        return
    _LAYOUTS.memo = WeakIdKeyDictionary()
    _LAYOUTS.capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    try:
        yield
    finally:
        _LAYOUTS.memo, _LAYOUTS.capturing = None, None


def gemm_add_sumsq(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, residual_ss: torch.Tensor | None = None,
                   eps: float | None = None, programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = r + (x @ weight.T)`` with both terms in x's dtype (the reference's rounding), and each
    row's partial sums of squares of h, [M, ceil(N / BLOCK_N)] fp32 (the next ``gemm``'s ``ss``).
    ``r`` is ``residual`` [M, N], or with ``residual_ss`` its RMS norm ``residual * rsqrt(sum(ss) / N
    + eps)`` rounded to x's dtype. The caller checks ``supported(x, weight, "none")`` and that
    ``residual`` is a contiguous [M, N] tensor of x's dtype with K > 0."""
    n_out = output_width(weight, "none")
    if residual.shape != (x.shape[0], n_out) or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"gemm_add_sumsq: residual must be a contiguous {x.dtype} tensor of shape "
                         f"{(x.shape[0], n_out)}, got {residual.dtype} {tuple(residual.shape)}")
    out = _output(x, n_out, None)
    if out.numel() == 0 or x.shape[1] == 0:
        raise ValueError(f"gemm_add_sumsq: needs M, N and K > 0, got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return out, _launch(x, weight, out, "none", programs, residual=residual, residual_ss=residual_ss, eps=eps)
