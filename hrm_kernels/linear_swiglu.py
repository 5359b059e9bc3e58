"""The MLP's first half in one kernel: the gate_up projection with the SwiGLU activation as its
matmul epilogue.

Shapes: ``x``: [..., K], ``weight``: [2I, K] (``nn.Linear`` layout: rows ``0..I-1`` are the gate
projection, rows ``I..2I-1`` the up projection), result [..., I] in ``x``'s dtype::

    gate_up = x @ weight.T                        (rounded to x's dtype, as F.linear would)
    out     = silu(gate) * up,   gate, up = gate_up.chunk(2, -1)

With bf16/fp16 on CUDA the epilogue's sigmoid is ``hrm_kernels._math``'s one-instruction
``tanh.approx`` form (absolute error under 2^-12); the backward differentiates the stored
``gate_up`` with the exact sigmoid, as the reference does.

Each program computes one [BLOCK_M, BLOCK_N] tile of ``out`` from two fp32 accumulators (the
gate and up columns of the same tile), so the [M, 2I] ``gate_up`` never has to be written and read
back. When a gradient is needed, the kernel also stores ``gate_up`` (the backward needs it), which
still saves the activation's separate read of it. Backward, with ``dgate_up`` from the SwiGLU
backward kernel::

    dx = dgate_up @ weight,   dweight = dgate_up.T @ x

Most of an HRM training step's forward passes run without gradients (all but the last L and H
steps of a segment, and the whole continue-target pass), where the persistent TMA kernel beats
cuBLAS + ``swiglu`` (benchmarks/RESULTS.md); ``hrm.layers.SwiGLUMLP`` uses this op there. On a
Hopper GPU with bf16/fp16 those launches run ``hrm_kernels._gluon_gemm``'s warp-specialised GEMM
with the same epilogue instead (``USE_GLUON``; its sigmoid is exp and a division instead of
``tanh.approx``), and with ``GLUON_KEEPS_GATE_UP`` (on) so do the launches that keep
gate_up, through its ``"swiglu_keep"`` epilogue (``linear_swiglu_keep``).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import triton
import triton.language as tl

from hrm_kernels import _gluon_gemm
from hrm_kernels._math import fast_sigmoid_for, sigmoid
from hrm_kernels._utils import cdiv, check_float, check_same, next_power_of_2
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch
from hrm_kernels.swiglu import swiglu_backward, swiglu_reference


@triton.jit
def grouped_tile(tile, num_m, num_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row offset, column offset) of tile number ``tile`` of a [num_m, num_n] tile grid walked in
    grouped order: GROUP_M row blocks sweep every column block before the next group starts, so
    their rows of the left operand stay in L2 while every column block reads them."""
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return ((first_m + (tile % (GROUP_M * num_n)) % group_rows) * BLOCK_M,
            ((tile % (GROUP_M * num_n)) // group_rows) * BLOCK_N)


@triton.jit
def _linear_swiglu_kernel(X, W, OUT, GATE_UP, M, K, I, stride_x, stride_w, stride_out, stride_gu,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, STORE_GATE_UP: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    off_m, off_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(I, BLOCK_N), BLOCK_M, BLOCK_N, GROUP_M)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < I
    # Clamp out-of-range rows/cols to valid addresses (their results are never stored), so the
    # loads need no masks along M and N.
    x_ptrs = X + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_x + ks[None, :]
    w_rows = tl.where(col_ok, cols, 0).to(tl.int64)
    wg_ptrs = W + w_rows[None, :] * stride_w + ks[:, None]  # [BLOCK_K, BLOCK_N] view of W.T
    wu_ptrs = wg_ptrs + I * stride_w

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_ok = ks < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    # Round to the activation dtype first: the same numbers F.linear + swiglu would see.
    gate = acc_gate.to(OUT.dtype.element_ty)
    up = acc_up.to(OUT.dtype.element_ty)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if STORE_GATE_UP:
        gu_ptrs = GATE_UP + rows64[:, None] * stride_gu + cols[None, :]
        tl.store(gu_ptrs, gate, mask=mask)
        tl.store(gu_ptrs + I, up, mask=mask)
    gate32 = gate.to(tl.float32)
    out = gate32 * sigmoid(gate32, FAST_SIGMOID) * up.to(tl.float32)
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _linear_swiglu_tma_kernel(x_desc, wg_desc, wu_desc, out_desc, gate_desc, up_desc, M, K, I,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr,
                              STORE_GATE_UP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              FAST_SIGMOID: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr):
    """The same tiles as ``_linear_swiglu_kernel``, for Hopper and later: a persistent grid (one
    program per SM walks the tiles), operands through TMA descriptors (bounds handled by the
    hardware: zero fill on load, clipping on store). ``wg_desc``/``wu_desc`` view the gate and up
    halves of W, ``gate_desc``/``up_desc`` the two halves of the stored gate_up."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(I, BLOCK_N)
    num_tiles = num_m * num_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        off_m, off_n = grouped_tile(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([off_m, k * BLOCK_K])
            acc_gate = tl.dot(x, wg_desc.load([off_n, k * BLOCK_K]).T, acc_gate, input_precision=INPUT_PRECISION)
            acc_up = tl.dot(x, wu_desc.load([off_n, k * BLOCK_K]).T, acc_up, input_precision=INPUT_PRECISION)
        gate = acc_gate.to(out_desc.dtype)
        up = acc_up.to(out_desc.dtype)
        if STORE_GATE_UP:
            gate_desc.store([off_m, off_n], gate)
            up_desc.store([off_m, off_n], up)
        gate32 = gate.to(tl.float32)
        out_desc.store([off_m, off_n], (gate32 * sigmoid(gate32, FAST_SIGMOID) * up.to(tl.float32)).to(out_desc.dtype))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA; tuned on an H100 at HRM's sizes.
CUDA_CONFIG = (128, 128, 64, 8, 4)
GROUP_M = 8
# The TMA kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize, flatten).
# USE_TMA picks it wherever it can run (compute capability >= 9, 16-byte aligned rows), for the
# launches that do not keep gate_up for the backward, and also for those with TMA_STORES_GATE_UP.
# H100, bf16, M=62976, K=512, I=1536 (benchmarks/tune_linear_swiglu.py): without gate_up the TMA
# kernel takes 382 us against 479 (tiled) and 485 (cuBLAS + swiglu); storing gate_up, 558 against
# 512 (tiled), so the training forward keeps the tiled kernel.
TMA_CONFIG = (128, 128, 64, 8, 3, False, False)
USE_TMA = True
TMA_STORES_GATE_UP = False
# USE_GLUON: launches that keep no gate_up run the warp-specialised Gluon GEMM with the SwiGLU
# epilogue (hrm_kernels._gluon_gemm) where it can run (Hopper, bf16/fp16, K and I multiples of 8).
# H100, bf16, M=62976, K=512, I=1536 (session 22): 309.8 us against 386.9 for the TMA kernel; gated
# Sudoku training step 73.9 / 74.6 ms against 75.6 / 77.3 (same process, alternating; its 40 calls
# 12.8 ms against 15.5). Its sigmoid is exp and a division, not tanh.approx: no-grad launches round
# differently from the with-gradient ones (within the tests' tolerance of the reference), not bit
# for bit alike.
USE_GLUON = True
# GLUON_KEEPS_GATE_UP: launches that keep gate_up (with a gradient) run the Gluon GEMM's
# "swiglu_keep" epilogue, which writes gate_up beside the activation, where it can run. It replaces
# cuBLAS's gate_up (298.7 us at M=62976, K=512, 2I=3072 on an H100) and the SwiGLU kernel (192 us)
# in the training forward, at the price of the Gluon GEMM's ~0.9x of cuBLAS and 387 MB more stores
# than its "swiglu" form (309.8 us). H100, gated training step, same process alternating:
# Sudoku 70.5 / 70.8 ms against 71.9 / 71.5, ARC 125.6 / 126.1 against 126.7 / 127.0.
GLUON_KEEPS_GATE_UP = True


@functools.lru_cache(maxsize=None)
def _triton_has_tma() -> bool:
    """Host tensor descriptors and ``tl.range(warp_specialize=, flatten=)`` (Triton 3.4 or newer)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    params = inspect.signature(tl.range.__init__).parameters
    return "warp_specialize" in params and "flatten" in params


def tma_available(device: torch.device) -> bool:
    """TMA-descriptor kernels can run on ``device``: Triton with host descriptors, and Hopper or
    datacenter Blackwell (TMA and ~150 KB of shared memory) or the interpreter on the CPU."""
    from hrm_kernels.backend import triton_interpreting

    if not _triton_has_tma():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] in (9, 10)
    return triton_interpreting()


def _tma_ok(x: torch.Tensor, weight: torch.Tensor, store_gate_up: bool) -> bool:
    if not USE_TMA or (store_gate_up and not TMA_STORES_GATE_UP) or not tma_available(x.device):
        return False
    item = x.element_size()
    inter, k = weight.shape[0] // 2, weight.shape[1]
    # TMA: 16-byte aligned base addresses and row strides (the up halves start I columns/rows in).
    return ((k * item) % 16 == 0 and (inter * item) % 16 == 0 and x.data_ptr() % 16 == 0
            and weight.data_ptr() % 16 == 0 and x.stride(0) == k)


def tiled_config(on_cuda: bool, element_size: int) -> tuple:
    """The tiled kernel's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): ``CUDA_CONFIG`` on CUDA,
    with at most 3 stages for 4-byte operands (4 stages of fp32 tiles need 295 KB of shared memory,
    Hopper has 227 KB); small tiles in the interpreter."""
    if not on_cuda:
        return 16, 32, 32, 4, 1
    block_m, block_n, block_k, num_warps, num_stages = CUDA_CONFIG
    return block_m, block_n, block_k, num_warps, min(num_stages, 3) if element_size == 4 else num_stages


def tma_config(on_cuda: bool, element_size: int) -> tuple:
    """The TMA kernel's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize, flatten):
    ``TMA_CONFIG`` on CUDA, with at most 2 stages for 4-byte operands (their tiles are twice as
    large: 3 stages need 295 KB of shared memory, Hopper has 227 KB); small tiles in the interpreter."""
    if not on_cuda:
        return 16, 32, 32, 4, 1, False, False
    block_m, block_n, block_k, num_warps, num_stages, warp_specialize, flatten = TMA_CONFIG
    if element_size == 4:
        num_stages = min(num_stages, 2)
    return block_m, block_n, block_k, num_warps, num_stages, warp_specialize, flatten


def _launch_tma(x, weight, out, gate_up, store_gate_up: bool):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from hrm_kernels._utils import num_programs_for

    n_rows, k = x.shape
    inter = out.shape[1]
    block_m, block_n, block_k, num_warps, num_stages, warp_specialize, flatten = tma_config(x.is_cuda, x.element_size())
    block_n = min(block_n, max(16, next_power_of_2(inter)))
    block_k = min(block_k, max(16, next_power_of_2(k)))
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    wg_desc = TensorDescriptor.from_tensor(weight[:inter], [block_n, block_k])
    wu_desc = TensorDescriptor.from_tensor(weight[inter:], [block_n, block_k])
    out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n])
    halves = (gate_up[:, :inter], gate_up[:, inter:]) if store_gate_up else (out, out)
    gate_desc, up_desc = (TensorDescriptor.from_tensor(h, [block_m, block_n]) for h in halves)
    num_tiles = cdiv(n_rows, block_m) * cdiv(inter, block_n)
    programs = min(num_tiles, num_programs_for(x.device.type, x.device.index))
    launch(_linear_swiglu_tma_kernel, (programs,),
        x_desc, wg_desc, wu_desc, out_desc, gate_desc, up_desc, n_rows, k, inter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        STORE_GATE_UP=store_gate_up, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        FAST_SIGMOID=fast_sigmoid_for(x.dtype), WARP_SPECIALIZE=warp_specialize, FLATTEN=flatten, num_warps=num_warps, num_stages=num_stages)


def keeps_gate_up_in_gluon(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a launch that keeps gate_up runs the Gluon GEMM (``GLUON_KEEPS_GATE_UP`` on, Hopper,
    bf16/fp16 rows [M, K] with K and I multiples of 8)."""
    return GLUON_KEEPS_GATE_UP and use_triton(x.device) and _gluon_gemm.supported(x, weight, "swiglu_keep")


def _launch(x: torch.Tensor, weight: torch.Tensor, store_gate_up: bool):
    # Both kernels address rows with a unit column stride (the public wrapper guarantees it; a
    # custom op called directly might not).
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_rows, k = x.shape
    inter = weight.shape[0] // 2
    out = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    gate_up = torch.empty((n_rows, 2 * inter) if store_gate_up else (0, 2 * inter), dtype=x.dtype,
                          device=x.device)
    if out.numel() and store_gate_up and keeps_gate_up_in_gluon(x, weight):
        _gluon_gemm.gemm(x, weight, "swiglu_keep", out=out, gate_up=gate_up)
    elif out.numel() and USE_GLUON and not store_gate_up and _gluon_gemm.supported(x, weight, "swiglu"):
        _gluon_gemm.gemm(x, weight, "swiglu", out=out)
    elif out.numel() and _tma_ok(x, weight, store_gate_up):
        _launch_tma(x, weight, out, gate_up, store_gate_up)
    elif out.numel():
        block_m, block_n, block_k, num_warps, num_stages = tiled_config(x.is_cuda, x.element_size())
        block_n = min(block_n, max(16, next_power_of_2(inter)))
        block_k = min(block_k, max(16, next_power_of_2(k)))
        grid = (cdiv(n_rows, block_m) * cdiv(inter, block_n),)
        launch(_linear_swiglu_kernel, grid,
            x, weight, out, gate_up, n_rows, k, inter, x.stride(0), weight.stride(0), out.stride(0),
            gate_up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
            EVEN_K=k % block_k == 0, STORE_GATE_UP=store_gate_up,
            INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            FAST_SIGMOID=fast_sigmoid_for(x.dtype), num_warps=num_warps, num_stages=num_stages)
    return out, gate_up


def _backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor,
              swiglu_bwd=swiglu_backward):
    """(dx, dweight); ``swiglu_bwd``: the SwiGLU backward launch (its custom op under torch.compile)."""
    dgate_up = swiglu_bwd(dout.contiguous(), gate_up)
    return dgate_up @ weight, dgate_up.t() @ x


class LinearSwiGLUFunction(torch.autograd.Function):
    """Eager-mode entry (direct launches, low host overhead). x: [M, K], weight: [2I, K]."""

    @staticmethod
    def forward(ctx, x, weight):
        out, gate_up = _launch(x, weight, store_gate_up=True)
        ctx.save_for_backward(x, weight, gate_up)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        return _backward(dout, *ctx.saved_tensors)


@torch.library.custom_op("hrm_kernels::linear_swiglu", mutates_args=())
def _linear_swiglu_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _launch(x, weight, store_gate_up=False)[0]


@_linear_swiglu_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


@torch.library.custom_op("hrm_kernels::linear_swiglu_train", mutates_args=())
def _linear_swiglu_train_op(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, store_gate_up=True)


@_linear_swiglu_train_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] // 2), x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.mark_non_differentiable(output[1])


def _train_backward(ctx, dout, _dgate_up):
    return _backward(dout, *ctx.saved_tensors, swiglu_bwd=torch.ops.hrm_kernels.swiglu_bwd)


_linear_swiglu_train_op.register_autograd(_train_backward, setup_context=_setup_context)


def linear_swiglu_keep(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear_swiglu(x, weight), x @ weight.T)``: the activation [M, I] and the gate_up projection
    [M, 2I] it came from (what the activation's backward reads), from one kernel where one runs. No
    autograd: a caller that differentiates saves gate_up itself (``hrm.layers`` does). x: [M, K]
    rows, weight: [2I, K], one float dtype."""
    op = "linear_swiglu_keep"
    check_float("x", x, op)
    check_float("weight", weight, op)
    check_same(op, "x", x, "weight", weight, shape=False)
    if weight.dim() != 2 or weight.shape[0] % 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; need x [M, K] and "
                         "weight [2I, K] (gate rows, then up rows)")
    if not use_triton(x.device):
        gate_up = torch.nn.functional.linear(x, weight)
        return swiglu_reference(gate_up), gate_up
    with torch.no_grad():
        return _launch(x.contiguous(), weight.contiguous(), store_gate_up=True)


def linear_swiglu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HRM's eager math: ``swiglu(F.linear(x, weight))`` in x's dtype; also the CPU fallback."""
    return swiglu_reference(torch.nn.functional.linear(x, weight))


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``gate, up = (x @ weight.T).chunk(2, -1)``.

    x: [..., K]; weight: [2I, K] in x's dtype (cast fp32 parameters at use, as ``CastedLinear``
    does). Returns [..., I]. Gradients flow to both.
    """
    op = "linear_swiglu"
    check_float("x", x, op)
    check_float("weight", weight, op)
    check_same(op, "x", x, "weight", weight, shape=False)
    if weight.dim() != 2 or weight.shape[0] % 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; weight must "
                         "be [2I, K] (gate rows, then up rows) with K = x.shape[-1]")
    if not use_triton(x.device):
        return linear_swiglu_reference(x, weight)
    k = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) != k):
        rows = rows.contiguous()
    weight = weight.contiguous()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if torch.compiler.is_compiling():
        out = (torch.ops.hrm_kernels.linear_swiglu_train(rows, weight)[0] if needs_grad
               else torch.ops.hrm_kernels.linear_swiglu(rows, weight))
    elif needs_grad:
        out = LinearSwiGLUFunction.apply(rows, weight)
    else:
        out = _launch(rows, weight, store_gate_up=False)[0]
    return out.view(*x.shape[:-1], weight.shape[0] // 2)
