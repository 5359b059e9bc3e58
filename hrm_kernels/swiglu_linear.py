"""The MLP's second half: SwiGLU, then the down projection, with the SwiGLU backward as the
epilogue of the down projection's input-gradient matmul.

Shapes: ``gate_up``: [..., 2I] (HRM's layout: gate columns, then up columns), ``weight``: [N, I]
(``nn.Linear`` layout), result [..., N], all in one float dtype. With ``s = sigmoid(gate)``::

    act   = silu(gate) * up                     (hrm_kernels.swiglu)
    y     = act @ weight.T                      (cuBLAS)
  backward, from dy [..., N]:
    dact  = dy @ weight                         rounded to the dtype, as the unfused matmul writes it
    dgate = dact * up * s * (1 + gate * (1 - s))
    dup   = dact * gate * s
    dweight = dy.T @ act                        (cuBLAS)

Unfused, ``dact`` [M, I] is written by one matmul and read back by the SwiGLU backward kernel. Here
each program computes [BLOCK_M, BLOCK_N] tiles of ``dact`` and turns them into the matching tiles
of dgate and dup before anything leaves the chip (operands through TMA descriptors: Hopper or
datacenter Blackwell, or the interpreter). Off by default (``FUSED_BACKWARD``): on an H100 it is
not faster than the unfused pair (benchmarks/RESULTS.md). Elsewhere, for
rows not 16-byte aligned, and under torch.compile the op runs as ``F.linear(swiglu(gate_up),
weight)`` with ``hrm_kernels.swiglu``'s kernels, the same math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hrm_kernels import _gluon_swiglu_backward
from hrm_kernels._utils import cdiv, check_float, check_same, next_power_of_2, num_programs_for
from hrm_kernels.backend import use_triton
from hrm_kernels.linear_swiglu import grouped_tile, tma_available
from hrm_kernels.precompile import launch
from hrm_kernels.swiglu import swiglu, swiglu_backward, swiglu_forward, swiglu_reference


@triton.jit
def _swiglu_linear_backward_kernel(dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, GU, DGU, M, K, I,
                                   stride_gu, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TMA_EPILOGUE: tl.constexpr,
                                   WARP_SPECIALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Programs walk the [BLOCK_M, BLOCK_N] tiles of [M, I] in grouped order (``grouped_tile``: dy
    rows stay in L2); with one program per tile the loop runs once. ``w_desc`` views the weight
    [K, I] in [BLOCK_K, BLOCK_N] tiles (dact = dy @ weight needs no transpose). The epilogue reads
    gate/up and writes dgate/dup through the TMA descriptors of the halves of gate_up and its
    gradient (TMA_EPILOGUE), or through pointers (GU, DGU: [M, 2I] with row stride ``stride_gu``;
    registers only, leaving shared memory to the mainloop). WARP_SPECIALIZE: Triton's producer/consumer warp groups over the tile loop (its
    loads for the next tile overlap this tile's epilogue; for persistent grids)."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(I, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        off_m, off_n = grouped_tile(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            acc = tl.dot(dy_desc.load([off_m, k * BLOCK_K]), w_desc.load([k * BLOCK_K, off_n]), acc,
                         input_precision=INPUT_PRECISION)
        dact = acc.to(DGU.dtype.element_ty).to(tl.float32)  # the unfused matmul's rounding
        if TMA_EPILOGUE:
            gate = gate_desc.load([off_m, off_n]).to(tl.float32)
            up = up_desc.load([off_m, off_n]).to(tl.float32)
        else:
            rows = off_m + tl.arange(0, BLOCK_M)
            cols = off_n + tl.arange(0, BLOCK_N)
            mask = (rows < M)[:, None] & (cols < I)[None, :]
            offsets = rows.to(tl.int64)[:, None] * stride_gu + cols[None, :]
            gate = tl.load(GU + offsets, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(GU + offsets + I, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(gate)
        dgate = (dact * up * s * (1.0 + gate * (1.0 - s))).to(DGU.dtype.element_ty)
        dup = (dact * gate * s).to(DGU.dtype.element_ty)
        if TMA_EPILOGUE:
            dgate_desc.store([off_m, off_n], dgate)
            dup_desc.store([off_m, off_n], dup)
        else:
            tl.store(DGU + offsets, dgate, mask=mask)
            tl.store(DGU + offsets + I, dup, mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA_EPILOGUE, programs per SM or 0 for one
# per tile, WARP_SPECIALIZE) on CUDA. H100, bf16, M=62976, N=512, I=1536 (12 tiles swept,
# benchmarks/RESULTS.md): this one 496.7 us GPU, cuBLAS + the SwiGLU backward kernel 480.3 us; the
# persistent TMA-epilogue tile of linear_swiglu 558.1 us.
CUDA_CONFIG = (64, 128, 64, 4, 4, False, 0, False)
GROUP_M = 8
# Fuse wherever the kernel can run; off: cuBLAS for dact, then the SwiGLU backward kernel. Off by
# default: on an H100 the fused kernel moves its 838 MB at 1.7 TB/s (the mainloop and the
# memory-bound epilogue take turns), and the unfused pair is 3% faster; in the Sudoku training
# step on / off measured 79.0, 79.5 / 79.6, 79.2 ms. Kept for GPUs and Triton versions where
# the epilogue overlaps the mainloop.
FUSED_BACKWARD = False
# USE_GLUON: the Gluon kernel (hrm_kernels._gluon_swiglu_backward) takes the gradient on Hopper
# where it can. H100, bf16 (session 22): prototype 321 us against 477 for cuBLAS + the SwiGLU
# backward kernel at M=62976, N=512, I=1536; gated Sudoku training step 73.0 / 73.4 ms against
# 73.3 / 75.8 (same process, alternating; GPU "other" 15.9 against 18.5 ms, matmul 44.2 against 42.3).
USE_GLUON = True


def tile_config(on_cuda: bool, element_size: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA_EPILOGUE, programs per SM,
    WARP_SPECIALIZE): ``CUDA_CONFIG`` on CUDA, at most 2 stages for 4-byte operands (twice the
    shared memory per stage); small tiles in the interpreter."""
    if not on_cuda:
        return 16, 32, 32, 4, 1, True, 0, False
    block_m, block_n, block_k, num_warps, num_stages, tma_epilogue, per_sm, warp_specialize = CUDA_CONFIG
    return (block_m, block_n, block_k, num_warps, min(num_stages, 2) if element_size == 4 else num_stages,
            tma_epilogue, per_sm, warp_specialize)


def _kernel_ok(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """TMA: 16-byte aligned bases and row strides (the up half starts I columns in)."""
    item = dy.element_size()
    n, inter = weight.shape
    return (FUSED_BACKWARD and tma_available(dy.device) and (n * item) % 16 == 0 and (inter * item) % 16 == 0
            and all(t.data_ptr() % 16 == 0 for t in (dy, weight, gate_up)))


def _fused_backward(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dgate_up [M, 2I] from dy [M, N], weight [N, I], gate_up [M, 2I] (all contiguous)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n_rows, n = dy.shape
    inter = weight.shape[1]
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgate_up.numel() == 0:
        return dgate_up
    block_m, block_n, block_k, num_warps, num_stages, tma_epilogue, per_sm, warp_specialize = tile_config(
        dy.is_cuda, dy.element_size())
    block_n = min(block_n, max(16, next_power_of_2(inter)))
    block_k = min(block_k, max(16, next_power_of_2(n)))
    dy_desc = TensorDescriptor.from_tensor(dy, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_k, block_n])
    gate_desc, up_desc, dgate_desc, dup_desc = (
        TensorDescriptor.from_tensor(half, [block_m, block_n])
        for half in (gate_up[:, :inter], gate_up[:, inter:], dgate_up[:, :inter], dgate_up[:, inter:]))
    tiles = cdiv(n_rows, block_m) * cdiv(inter, block_n)
    programs = min(tiles, per_sm * num_programs_for(dy.device.type, dy.device.index)) if per_sm else tiles
    launch(_swiglu_linear_backward_kernel, (programs,),
           dy_desc, w_desc, gate_desc, up_desc, dgate_desc, dup_desc, gate_up, dgate_up, n_rows, n, inter,
           gate_up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
           TMA_EPILOGUE=tma_epilogue, WARP_SPECIALIZE=warp_specialize,
           INPUT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
    return dgate_up


def swiglu_linear_backward(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dgate_up [M, 2I] (the Gluon kernel on Hopper, else the fused Triton kernel where it is on and
    runs, else cuBLAS + the SwiGLU backward kernel).
    dy: [M, N], weight: [N, I], gate_up: [M, 2I], one dtype."""
    dy, weight, gate_up = dy.contiguous(), weight.contiguous(), gate_up.contiguous()
    if USE_GLUON and _gluon_swiglu_backward.supported(dy, weight, gate_up):
        return _gluon_swiglu_backward.swiglu_linear_backward(dy, weight, gate_up)
    if _kernel_ok(dy, weight, gate_up):
        return _fused_backward(dy, weight, gate_up)
    return swiglu_backward(dy @ weight, gate_up)


class SwiGLULinearFunction(torch.autograd.Function):
    """gate_up: [M, 2I] and weight: [N, I], both row-contiguous."""

    @staticmethod
    def forward(ctx, gate_up, weight):
        act = swiglu_forward(gate_up)
        ctx.save_for_backward(gate_up, weight, act)
        return act @ weight.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        gate_up, weight, act = ctx.saved_tensors
        dgate_up = swiglu_linear_backward(dy, weight, gate_up) if ctx.needs_input_grad[0] else None
        dweight = dy.t() @ act if ctx.needs_input_grad[1] else None
        return dgate_up, dweight


def swiglu_linear_reference(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HRM's eager math: ``F.linear(swiglu(gate_up), weight)`` in gate_up's dtype; also the CPU
    fallback."""
    return F.linear(swiglu_reference(gate_up), weight)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` with ``gate, up = gate_up.chunk(2, -1)``.

    gate_up: [..., 2I]; weight: [N, I] in gate_up's dtype (cast fp32 parameters at use). Returns
    [..., N]. Gradients flow to both; the gate_up gradient comes from the fused kernel (module
    docstring) where it runs.
    """
    op = "swiglu_linear"
    check_float("gate_up", gate_up, op)
    check_float("weight", weight, op)
    check_same(op, "gate_up", gate_up, "weight", weight, shape=False)
    if weight.dim() != 2 or gate_up.dim() == 0 or gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"{op}: gate_up has shape {tuple(gate_up.shape)} and weight {tuple(weight.shape)}; "
                         "need gate_up [..., 2I] (gate columns, then up columns) and weight [N, I]")
    if not use_triton(gate_up.device):
        return swiglu_linear_reference(gate_up, weight)
    needs_grad = torch.is_grad_enabled() and (gate_up.requires_grad or weight.requires_grad)
    if not needs_grad or torch.compiler.is_compiling():
        return F.linear(swiglu(gate_up), weight)
    rows = gate_up.reshape(math.prod(gate_up.shape[:-1]), gate_up.shape[-1]).contiguous()
    out = SwiGLULinearFunction.apply(rows, weight.contiguous())
    return out.view(*gate_up.shape[:-1], weight.shape[0])
