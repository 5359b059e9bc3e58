"""SwiGLU activation in HRM's layout: ``silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``.

Shapes: ``gate_up``: [..., 2I] -> [..., I] in the same dtype. With ``s = sigmoid(gate)``::

    out   = gate * s * up
    dgate = dout * up * s * (1 + gate * (1 - s))
    dup   = dout * gate * s

Forward reads 2I and writes I, backward reads I + 2I and writes 2I per row: 8 passes over
[M, I] for forward + backward, all math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hrm_kernels._utils import as_rows, cdiv, check_float, row_tile, warps_for
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch


@triton.jit
def _swiglu_forward_kernel(GU, OUT, n_rows, n_cols, stride_gu, stride_out,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    gu = GU + rows.to(tl.int64)[:, None] * stride_gu + cols[None, :]
    gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu + n_cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DOUT, GU, DGU, n_rows, n_cols, stride_dout, stride_gu, stride_dgu,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)
    dout = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gu = GU + rows[:, None] * stride_gu + cols[None, :]
    gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu + n_cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    silu = gate * s
    dgate = dout * up * s * (1.0 + gate * (1.0 - s))
    dup = dout * silu
    dgu = DGU + rows[:, None] * stride_dgu + cols[None, :]
    tl.store(dgu, dgate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(dgu + n_cols, dup.to(DGU.dtype.element_ty), mask=mask)


def _launch_config(n_rows: int, n_cols: int):
    block_m, block_n = row_tile(min(n_cols, 2048), elements_per_tile=4096)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    return grid, block_m, block_n, warps_for(block_m * block_n)


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [M, 2I] (last dim contiguous) -> [M, I]."""
    n_rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid, block_m, block_n, num_warps = _launch_config(n_rows, n_cols)
        launch(_swiglu_forward_kernel, grid, gate_up, out, n_rows, n_cols, gate_up.stride(0), out.stride(0),
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out


def swiglu_backward(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dout: [M, I], gate_up: [M, 2I] -> dgate_up [M, 2I]."""
    n_rows, n_cols = dout.shape
    dgate_up = torch.empty((n_rows, 2 * n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if dout.numel():
        grid, block_m, block_n, num_warps = _launch_config(n_rows, n_cols)
        launch(_swiglu_backward_kernel, grid, dout, gate_up, dgate_up, n_rows, n_cols, dout.stride(0),
               gate_up.stride(0), dgate_up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dgate_up


class SwiGLUFunction(torch.autograd.Function):
    """Eager-mode entry: launches the kernels directly (lower host overhead than a custom op)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients carry no graph
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(dout.contiguous(), gate_up)


@torch.library.custom_op("hrm_kernels::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate_up)


@_swiglu_fwd_op.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("hrm_kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_backward(dout, gate_up)


@_swiglu_bwd_op.register_fake
def _(dout, gate_up):
    return torch.empty_like(gate_up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.hrm_kernels.swiglu_bwd(dout.contiguous(), gate_up)


# Under torch.compile the op is one opaque node of the graph, forward and backward.
_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """HRM's eager math (in the input dtype), also the CPU fallback."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.chunk(2, dim=-1)``: [..., 2I] -> [..., I]."""
    op = "swiglu"
    check_float("gate_up", gate_up, op)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"{op}: gate_up has shape {tuple(gate_up.shape)}; its last dimension must "
                         "be even (gate and up halves of equal width)")
    if not use_triton(gate_up.device):
        return swiglu_reference(gate_up)
    width = gate_up.shape[-1]
    rows = as_rows(gate_up, width)
    if torch.compiler.is_compiling():
        out = torch.ops.hrm_kernels.swiglu_fwd(rows)
    else:
        out = SwiGLUFunction.apply(rows)
    return out.view(*gate_up.shape[:-1], width // 2)
