"""The SwiGLU backward as the epilogue of the down projection's input-gradient GEMM, in Gluon, on
``_gluon_gemm``'s warp-specialised ping-pong design (see there: one producer warp fills a TMA ring,
two consumer warpgroups take alternate output tiles, an ``order`` mbarrier pair keeps the ring
consumed in fill order).

From dy [M, N], the down projection's weight [N, I] (``nn.Linear`` layout, row-contiguous: the
GEMM's B operand as stored) and the forward's gate_up [M, 2I] (gate columns, then up columns), with
``s = sigmoid(gate)``::

    dact  = dy @ weight                       [M, I], rounded to the dtype as cuBLAS writes it
    dgate = dact * up * s * (1 + gate * (1 - s))
    dup   = dact * gate * s                   -> dgate_up [M, 2I] = [dgate | dup]

Each consumer loads its tile's gate and up tiles by TMA while its main loop runs, and writes dgate
and dup from the same shared-memory buffers, so dact never leaves the chip (unfused: written and read
back, 2 x M x I x 2 bytes). The math is ``hrm_kernels.swiglu``'s backward kernel's, in fp32 from the
rounded dact (its products in another order, to keep fewer values in registers). Its prototype, with
that kernel's order, gave cuBLAS + that kernel's result bit for bit in 321 us against 477 (H100,
session 22, M=62976, N=512, I=1536, bf16).

Sizes: any M; N and I multiples of 8 (16-byte TMA rows; the up half starts I columns in); bf16 or
fp16. Hopper only; ``supported`` says where it runs; no interpreter path (CPU tests compile it for
sm_90, ``tests/test_compile_for_gpu.py``).
"""

from __future__ import annotations

import torch
import triton

from hrm_kernels._gluon_gemm import _HAVE_GLUON, _describe, available

if _HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

    from hrm_kernels._gluon_gemm import _accumulator_layout, _barriers, _fill_ring, _tile_origin, narrow, rounded

# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES). H100, M=62976, N=512, I=1536, bf16 (session 22): 371.5 us
# with 4 stages, 337.1 with 5, 321.0 with 6 (208 KiB of shared memory with the 4 epilogue buffers).
# Session 36, M = 86496: 439.5 us against 448.3-491.8 for [128, 64, 64] x 5, [128, 64, 128] x 3,
# [64, 128, 64] x 6 and [128, 64, 32] x 10 (benchmarks/tune_gluon_gemm.py).
CONFIG = (128, 64, 64, 6)
CONSUMER_REGISTERS = 232


def supported(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """``swiglu_linear_backward(dy, weight, gate_up)`` can run: Hopper, 2-byte floats of one dtype,
    contiguous 2-D operands of matching shapes, N and I multiples of 8, 16-byte aligned pointers."""
    if not (available(dy.device) and dy.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == dy.dtype == gate_up.dtype and dy.dim() == weight.dim() == gate_up.dim() == 2):
        return False
    n, inter = weight.shape
    return (dy.shape[1] == n and gate_up.shape == (dy.shape[0], 2 * inter) and n % 8 == 0 and inter % 8 == 0
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (dy, weight, gate_up)))


if _HAVE_GLUON:

    @gluon.jit
    def _produce(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready, empty,
                 order, epi_ready, M, I, K):
        """The producer warp (``_gluon_gemm._fill_ring``: dy tiles and [K, N]-major weight tiles)."""
        _fill_ring(dy_desc, w_desc, dy_bufs, w_bufs, ready, empty, M, I, K, w_desc.block_type.shape[1], False)

    @gluon.jit
    def _consume(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready, empty,
                 order, epi_ready, M, I, K, WARPGROUP: gl.constexpr):
        """One consumer warpgroup: the program's tiles j with j % 2 == WARPGROUP. Its gate and up tiles
        arrive in its own two epilogue buffers (``epi_ready``), which then carry dgate and dup out."""
        BLOCK_M: gl.constexpr = dy_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = dy_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        STAGES: gl.constexpr = dy_bufs.type.shape[0]
        EPI_BYTES: gl.constexpr = 2 * gate_desc.block_type.nbytes
        layout: gl.constexpr = _accumulator_layout(BLOCK_N)
        n_tiles_n = gl.cdiv(I, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        gate_buf = epi_bufs.index(2 * WARPGROUP)
        up_buf = epi_bufs.index(2 * WARPGROUP + 1)
        bar = epi_ready.index(WARPGROUP)
        j = 0
        for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles_n, gl.num_programs(0)):
            if j % 2 == WARPGROUP:
                if j > 0:  # the other warpgroup has issued its main loop: the ring stays in order
                    mbarrier.wait(order.index(WARPGROUP), ((j - 1) // 2) & 1)
                off_m, off_n = _tile_origin(tile, n_tiles_n, BLOCK_M, BLOCK_N)
                tma.store_wait(pendings=0)  # this warpgroup's last dgate/dup stores have left its buffers
                mbarrier.expect(bar, EPI_BYTES)
                tma.async_copy_global_to_shared(gate_desc, [off_m, off_n], bar, gate_buf)
                tma.async_copy_global_to_shared(up_desc, [off_m, off_n], bar, up_buf)
                acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
                step = j * k_steps
                for kk in range(k_steps):
                    s = step % STAGES
                    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                    acc = warpgroup_mma(dy_bufs.index(s), w_bufs.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    if kk > 0:  # the previous k-step's wgmma is done: its stage is free
                        mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                    step += 1
                mbarrier.arrive(order.index(1 - WARPGROUP), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
                mbarrier.wait(bar, (j // 2) & 1)
                # Few values live at once (232-240 registers): dup leaves through gate's buffer
                # before up is loaded, dgate through up's.
                dact_sig = rounded(acc, dgate_desc.dtype)  # dact, rounded as cuBLAS writes it
                gate = gate_buf.load(layout).to(gl.float32)
                sig = 1.0 / (1.0 + gl.exp(-gate))
                dact_sig = dact_sig * sig
                gate_buf.store(narrow(dact_sig * gate, dup_desc.dtype))  # dup = dact * s * gate
                dgate_factor = 1.0 + gate * (1.0 - sig)
                up = up_buf.load(layout).to(gl.float32)
                up_buf.store(narrow(dact_sig * up * dgate_factor, dgate_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(dup_desc, [off_m, off_n], gate_buf)
                tma.async_copy_shared_to_global(dgate_desc, [off_m, off_n], up_buf)
            j += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _first_warpgroup(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready,
                         empty, order, epi_ready, M, I, K):
        _consume(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready, empty,
                 order, epi_ready, M, I, K, 0)

    @gluon.jit
    def _second_warpgroup(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready,
                          empty, order, epi_ready, M, I, K):
        _consume(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready, empty,
                 order, epi_ready, M, I, K, 1)

    @gluon.jit
    def _swiglu_backward_gemm_kernel(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, M, I, K,
                                     STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        dtype: gl.constexpr = dy_desc.dtype
        dy_bufs = gl.allocate_shared_memory(dtype, [STAGES] + dy_desc.block_type.shape, dy_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        epi_bufs = gl.allocate_shared_memory(dtype, [4] + gate_desc.block_type.shape, gate_desc.layout)
        ready, empty, order, epi_ready = _barriers(STAGES)
        args = (dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, dy_bufs, w_bufs, epi_bufs, ready, empty,
                order, epi_ready, M, I, K)
        gl.warp_specialize([(_first_warpgroup, args), (_second_warpgroup, args), (_produce, args)], [4, 1],
                           [CONSUMER_REGS, 40])


def descriptors(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor, dgate_up: torch.Tensor) -> tuple:
    """TMA descriptors of dy, weight, the gate and up halves of gate_up and of dgate_up (host objects;
    CPU tensors work too)."""
    block_m, block_n, block_k, _ = CONFIG
    inter = weight.shape[1]
    return (_describe(dy, [block_m, block_k]), _describe(weight, [block_k, block_n]),
            *(_describe(half, [block_m, block_n]) for half in (gate_up[:, :inter], gate_up[:, inter:],
                                                               dgate_up[:, :inter], dgate_up[:, inter:])))


def swiglu_linear_backward(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor,
                           programs: int | None = None) -> torch.Tensor:
    """dgate_up [M, 2I] (module docstring); the caller checks ``supported`` first. ``programs``: the
    persistent grid (default one program per SM; tests pass a few to give each many tiles)."""
    from hrm_kernels.precompile import launch

    n_rows, n = dy.shape
    inter = weight.shape[1]
    dgate_up = torch.empty_like(gate_up)
    if dgate_up.numel() == 0:
        return dgate_up
    if n == 0:
        return dgate_up.zero_()
    if programs is not None and programs < 1:
        raise ValueError(f"swiglu_linear_backward: programs must be at least 1, got {programs}")
    block_m, block_n, _, stages = CONFIG
    tiles = triton.cdiv(n_rows, block_m) * triton.cdiv(inter, block_n)
    if programs is None:
        programs = torch.cuda.get_device_properties(dy.device).multi_processor_count
    launch(_swiglu_backward_gemm_kernel, (min(programs, tiles),), *descriptors(dy, weight, gate_up, dgate_up),
           n_rows, inter, n, STAGES=stages, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return dgate_up
