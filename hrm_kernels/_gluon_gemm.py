"""A warp-specialised, persistent Hopper GEMM written in Gluon (Triton's lower-level dialect), with
an epilogue of our own: ``out = epilogue(x @ weight.T)`` for x [M, K], weight [N, K] (``nn.Linear``
layout), both bf16 or fp16, fp32 accumulation.

Epilogues:

- ``"none"``: ``out = x @ weight.T`` ([M, N], rounded to x's dtype).
- ``"swiglu"``: weight holds gate rows [0, I) then up rows [I, 2I) (N = 2I);
  ``gate, up = x @ weight[:I].T, x @ weight[I:].T`` rounded to x's dtype as ``F.linear`` would, then
  ``out = silu(gate) * up`` in fp32 ([M, I], rounded once).

Why Gluon: at HRM's K = 512 a GEMM tile runs only 8 k-steps, so the epilogue (fp32 -> 16-bit,
shared memory, TMA store) is a large share of a tile's time. cuBLAS hides it with warp
specialisation; Triton's ``tl.dot`` kernels cannot, and reach 540-610 TFLOP/s here against cuBLAS's
600-650 (benchmarks/RESULTS.md). Partitions of one program (12 warps):

- a producer warp issues the TMA loads of x [BM, BK] and weight [BN, BK] tiles (two weight tiles for
  SwiGLU: gate and up) into a ring of ``STAGES`` shared-memory buffers, each with a ``ready`` mbarrier
  (its bytes have landed) and an ``empty`` one (its wgmmas are done);
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

import functools
import inspect

import torch
import triton

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

EPILOGUES = {"none": 0, "swiglu": 1}
WEIGHT_ROWS_PER_COLUMN = {"none": 1, "swiglu": 2}  # SwiGLU: a gate row and an up row per output column
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES) per epilogue. H100, M=62976, K=512, bf16: 4 stages against 3
# took the plain GEMM from 0.72-0.77x to 0.88-0.94x of cuBLAS (session 21), 5 stages to 0.89-0.99x
# (session 22: N x K 512x512 60.4 us vs cuBLAS 58.1, 1536x512 171.2 vs 152.9, 3072x512 320.7 vs 298.7,
# 512x1536 150.0 vs 148.2; [128, 128, 128] x 2 stages 0.56-0.69x). SwiGLU at BLOCK_N=64 (two [128, 64]
# fp32 accumulators a warpgroup): 309.8 us with 4 stages, 308.3 with 6, 323.0 with BLOCK_K=128 x 3.
CONFIGS = {"none": (128, 128, 64, 5), "swiglu": (128, 64, 64, 4)}
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

    @gluon.constexpr_function
    def _accumulator_layout(BLOCK_N):
        n = 256  # the widest wgmma instruction that tiles BLOCK_N
        while n > BLOCK_N or BLOCK_N % n:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _tile_origin(tile, n_tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        return (tile // n_tiles_n) * BLOCK_M, (tile % n_tiles_n) * BLOCK_N

    @gluon.jit
    def _produce(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K,
                 EPILOGUE: gl.constexpr):
        """The producer warp: every k-step of every tile of this program, in order, into the ring."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + (1 + EPILOGUE) * w_desc.block_type.nbytes
        n_tiles_n = gl.cdiv(N_OUT, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        step = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles_n, gl.num_programs(0)):
            off_m, off_n = _tile_origin(tile, n_tiles_n, BLOCK_M, BLOCK_N)
            for kk in range(k_steps):
                s = step % STAGES
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
                mbarrier.expect(ready.index(s), NBYTES)
                tma.async_copy_global_to_shared(x_desc, [off_m, kk * BLOCK_K], ready.index(s), x_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [off_n, kk * BLOCK_K], ready.index(s), w_bufs.index(s))
                if EPILOGUE == 1:  # the up rows start N_OUT rows further down
                    tma.async_copy_global_to_shared(w_desc, [N_OUT + off_n, kk * BLOCK_K], ready.index(s),
                                                    w2_bufs.index(s))
                step += 1

    @gluon.jit
    def _consume(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K,
                 EPILOGUE: gl.constexpr, WARPGROUP: gl.constexpr):
        """One consumer warpgroup: the program's tiles j with j % 2 == WARPGROUP."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        layout: gl.constexpr = _accumulator_layout(BLOCK_N)
        n_tiles_n = gl.cdiv(N_OUT, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        out_buf = out_bufs.index(WARPGROUP)
        j = 0  # the program's tiles so far (both warpgroups count all of them)
        for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles_n, gl.num_programs(0)):
            if j % 2 == WARPGROUP:
                if j > 0:  # the other warpgroup has waited for every stage of tile j - 1
                    mbarrier.wait(order.index(WARPGROUP), ((j - 1) // 2) & 1)
                off_m, off_n = _tile_origin(tile, n_tiles_n, BLOCK_M, BLOCK_N)
                acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
                acc2 = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
                step = j * k_steps
                for kk in range(k_steps):
                    s = step % STAGES
                    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                    acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    if EPILOGUE == 1:
                        acc2 = warpgroup_mma(x_bufs.index(s), w2_bufs.index(s).permute((1, 0)), acc2, is_async=True)
                        acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
                    else:
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    if kk > 0:  # the previous k-step's wgmmas are done: its stage may refill
                        mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                    step += 1
                mbarrier.arrive(order.index(1 - WARPGROUP), count=1)  # the other warpgroup's turn
                if EPILOGUE == 1:
                    acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                if EPILOGUE == 1:
                    gate = acc.to(out_desc.dtype).to(gl.float32)
                    up = acc2.to(out_desc.dtype).to(gl.float32)
                    result = gate / (1.0 + gl.exp(-gate)) * up
                else:
                    result = acc
                tma.store_wait(pendings=0)  # this warpgroup's previous store has left out_buf
                out_buf.store(result.to(out_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_buf)
            j += 1
        tma.store_wait(pendings=0)

    def _partition_functions(epilogue: int) -> tuple:
        """The partitions' entry points for one epilogue: (first warpgroup, second warpgroup,
        producer). Gluon passes partition arguments as values, so the epilogue and the warpgroup
        are constants written into each function (the epilogue as a captured constexpr)."""
        EPI = gl.constexpr(epilogue)

        @gluon.jit
        def first(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K):
            _consume(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K,
                     EPI, 0)

        @gluon.jit
        def second(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K):
            _consume(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K,
                     EPI, 1)

        @gluon.jit
        def producer(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K):
            _produce(x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K,
                     EPI)

        return first, second, producer

    _first_warpgroup_none, _second_warpgroup_none, _producer_none = _partition_functions(0)
    _first_warpgroup_swiglu, _second_warpgroup_swiglu, _producer_swiglu = _partition_functions(1)

    @gluon.jit
    def _gemm_kernel(x_desc, w_desc, out_desc, M, N_OUT, K, STAGES: gl.constexpr, EPILOGUE: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr):
        dtype: gl.constexpr = x_desc.dtype
        x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        if EPILOGUE == 1:
            w2_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        else:
            w2_bufs = w_bufs
        out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(order.index(i), count=1)
        args = (x_desc, w_desc, out_desc, x_bufs, w_bufs, w2_bufs, out_bufs, ready, empty, order, M, N_OUT, K)
        if EPILOGUE == 1:
            gl.warp_specialize([(_first_warpgroup_swiglu, args), (_second_warpgroup_swiglu, args),
                                (_producer_swiglu, args)], [4, 1], [CONSUMER_REGS, 40])
        else:
            gl.warp_specialize([(_first_warpgroup_none, args), (_second_warpgroup_none, args),
                                (_producer_none, args)], [4, 1], [CONSUMER_REGS, 40])


def descriptors(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, epilogue: str) -> tuple:
    """The kernel's TMA descriptors of x, weight and out (host objects; CPU tensors work too)."""
    block_m, block_n, block_k, _ = CONFIGS[epilogue]
    dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    shared = gl.NVMMASharedLayout.get_default_for
    return (TensorDescriptor.from_tensor(x, [block_m, block_k], shared([block_m, block_k], dtype)),
            TensorDescriptor.from_tensor(weight, [block_n, block_k], shared([block_n, block_k], dtype)),
            TensorDescriptor.from_tensor(out, [block_m, block_n], shared([block_m, block_n], dtype)))


def gemm(x: torch.Tensor, weight: torch.Tensor, epilogue: str = "none", programs: int | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``epilogue(x @ weight.T)`` (module docstring); the caller checks ``supported`` first.
    ``programs``: the persistent grid (default: one program per SM; tests pass a few to give each
    program many tiles). ``out``: a contiguous [M, N] (SwiGLU: [M, I]) tensor of x's dtype to write."""
    from hrm_kernels.precompile import launch

    n_out = output_width(weight, epilogue)
    if out is None:
        out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    elif out.shape != (x.shape[0], n_out) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gemm: out must be a contiguous {x.dtype} tensor of shape {(x.shape[0], n_out)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if programs is not None and programs < 1:
        raise ValueError(f"gemm: programs must be at least 1, got {programs}")
    if out.numel() == 0 or x.shape[1] == 0:
        return out.zero_()
    block_m, block_n, _, stages = CONFIGS[epilogue]
    tiles = triton.cdiv(x.shape[0], block_m) * triton.cdiv(n_out, block_n)
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    launch(_gemm_kernel, (min(programs, tiles),), *descriptors(x, weight, out, epilogue), x.shape[0], n_out,
           x.shape[1], STAGES=stages, EPILOGUE=EPILOGUES[epilogue], CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return out
