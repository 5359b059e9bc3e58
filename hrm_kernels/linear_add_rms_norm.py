"""A post-norm block's output projection with its residual add and RMSNorm as the matmul's epilogue.

Shapes: ``x``: [M, K], ``weight``: [N, K] (``nn.Linear`` layout), ``residual``: [M, N], all in one
float dtype; result [M, N] in that dtype::

    y   = x @ weight.T                     rounded to the dtype, as F.linear would
    h   = residual + y                     rounded to the dtype, as the eager add would
    out = h * rsqrt(mean(h^2, -1) + eps)   fp32 statistics (HRM's weightless RMSNorm)

which is ``rms_norm_reference(F.linear(x, weight), residual=residual)``: HRM's
``h = norm(h + o_proj(attn))`` and ``h = norm(h + down_proj(mlp))``. The unfused version writes y,
reads y and the residual back, and writes the result; here y never leaves the chip.

Each program owns BLOCK_M whole rows (a persistent grid over row blocks). Pass one walks the
columns BLOCK_N at a time: the matmul tile (operands through TMA descriptors), plus the residual,
stored as h, with the rows' sums of squares accumulated. Pass two reads the program's own h back
(just written, so from L2) and scales it in place. No gradient: the model uses this op in its
no-gradient passes (most of an HRM segment), like ``linear_swiglu``; with a gradient, or where
TMA is unavailable, the op runs as ``F.linear`` + ``hrm_kernels.rms_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hrm_kernels._utils import as_rows, cdiv, check_float, check_same, next_power_of_2
from hrm_kernels.backend import use_triton
from hrm_kernels.linear_swiglu import tma_available
from hrm_kernels.precompile import launch
from hrm_kernels.rms_norm import rms_norm, rms_norm_reference


@triton.jit
def _linear_add_rms_norm_kernel(x_desc, w_desc, RES, OUT, M, N, K, stride_res, stride_out, eps,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr):
    # A persistent grid (one program per SM at most); the program count is a runtime value, so
    # each row count does not compile its own variant.
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        off_m = tile * BLOCK_M
        rows = off_m + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for off_n in range(0, N, BLOCK_N):  # pass one: h = residual + x @ W^T, stored
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                acc = tl.dot(x_desc.load([off_m, k * BLOCK_K]), w_desc.load([off_n, k * BLOCK_K]).T, acc,
                             input_precision=INPUT_PRECISION)
            cols = off_n + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            res = tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            y = acc.to(OUT.dtype.element_ty).to(tl.float32)
            h = (res.to(tl.float32) + y).to(OUT.dtype.element_ty)
            tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, axis=1)
        rstd = tl.rsqrt(sum_sq / N + eps)
        tl.debug_barrier()  # this program's stores of h are visible to all its threads
        for off_n in range(0, N, BLOCK_N):  # pass two: scale this program's rows in place
            cols = off_n + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            ptrs = OUT + rows64[:, None] * stride_out + cols[None, :]
            h = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (h * rstd[:, None]).to(OUT.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # pass two's loads are done before the next tile's pass one


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA. H100, bf16, M=62976, N=512: the best
# of five tiles, 121 us at K=512 (cuBLAS + rms_norm: 121) and 261 us at K=1536 (cuBLAS + rms_norm:
# 202); the 128x128 tile took 147 and 398.
CUDA_CONFIG = (128, 256, 64, 8, 3)


def tile_config(on_cuda: bool, element_size: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): ``CUDA_CONFIG`` on CUDA, with at most 2
    stages for 4-byte operands (twice the shared memory per stage); small tiles in the interpreter."""
    if not on_cuda:
        return 16, 32, 32, 4, 1
    block_m, block_n, block_k, num_warps, num_stages = CUDA_CONFIG
    return block_m, block_n, block_k, num_warps, min(num_stages, 2) if element_size == 4 else num_stages


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA available, 16-byte aligned rows."""
    return (tma_available(x.device) and (x.shape[1] * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
            and weight.data_ptr() % 16 == 0 and x.stride(0) == x.shape[1] and weight.stride(0) == weight.shape[1])


def _launch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from hrm_kernels._utils import num_programs_for

    n_rows, k = x.shape
    n = weight.shape[0]
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    out = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = tile_config(x.is_cuda, x.element_size())
    block_n = min(block_n, max(16, next_power_of_2(n)))
    block_k = min(block_k, max(16, next_power_of_2(k)))
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    programs = min(cdiv(n_rows, block_m), num_programs_for(x.device.type, x.device.index))
    launch(_linear_add_rms_norm_kernel, (programs,), x_desc, w_desc, residual, out, n_rows, n, k,
           residual.stride(0), out.stride(0), float(eps), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
           INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
           num_warps=num_warps, num_stages=num_stages)
    return out


def linear_add_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                  eps: float = 1e-5) -> torch.Tensor:
    """HRM's eager math (``rms_norm_reference(F.linear(x, weight), residual=residual)``); also the
    CPU fallback."""
    return rms_norm_reference(F.linear(x, weight), residual=residual, eps=eps)


def linear_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                        eps: float = 1e-5) -> torch.Tensor:
    """``rms_norm(residual + x @ weight.T)`` (weightless RMSNorm over the last dimension).

    x: [..., K]; weight: [N, K] in x's dtype (cast fp32 parameters at use); residual: [..., N] like
    x's leading dimensions, same dtype. Returns [..., N]. Differentiable (through F.linear +
    ``rms_norm``; the fused kernel runs when no gradient is needed).
    """
    op = "linear_add_rms_norm"
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        check_float(name, t, op)
    check_same(op, "x", x, "weight", weight, shape=False)
    check_same(op, "x", x, "residual", residual, shape=False)
    if (weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]
            or residual.shape != (*x.shape[:-1], weight.shape[0])):
        raise ValueError(f"{op}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, residual "
                         f"{tuple(residual.shape)}; need x [..., K], weight [N, K] and residual [..., N]")
    if not use_triton(x.device):
        return linear_add_rms_norm_reference(x, weight, residual, eps)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or residual.requires_grad)
    x2 = as_rows(x, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 and x2.stride(0) == x2.shape[1] else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 and weight.stride(0) == weight.shape[1] else weight.contiguous()
    if grad or torch.compiler.is_compiling() or not _kernel_ok(x2, weight):
        return rms_norm(F.linear(x, weight), residual=residual, eps=eps)
    out = _launch(x2, weight, residual.reshape(x2.shape[0], weight.shape[0]), eps)
    return out.view(*x.shape[:-1], weight.shape[0])
