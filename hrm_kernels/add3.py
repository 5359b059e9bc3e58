"""The sum of three tensors in one pass, rounded as HRM's eager code rounds it: the ungated
reasoning module's input ``own + (other + inj)``.

Shapes: ``a``, ``b``, ``c``: the same shape and dtype -> that shape and dtype::

    out   = a + round(b + c)        round: to the inputs' dtype; both sums in fp32
    da    = db = dc = dout

Two eager adds move six tensors' worth of memory (read two, write one, twice); the kernel reads
three and writes one. The intermediate rounding keeps the result bit-identical to the eager
expression, so checkpoints and the reference model's trajectories do not move.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hrm_kernels._math import cast
from hrm_kernels._utils import cdiv, check_float, check_same
from hrm_kernels.backend import triton_interpreting, use_triton
from hrm_kernels.precompile import launch

BLOCK = 4096  # elements per program: 8 KB of each bf16 input


@triton.jit
def _add3_kernel(A, B, C, OUT, n, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = OUT.dtype.element_ty
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    bc = cast(b + c, dtype, EMU_BF16).to(tl.float32)  # the eager code's intermediate tensor
    tl.store(OUT + offs, cast(a + bc, dtype, EMU_BF16), mask=mask)


def add3_forward(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a, b, c: one shape and dtype -> a + (b + c), contiguous (the kernel reads flat memory, so
    inputs of other layouts are made contiguous first: a copy only for those)."""
    a, b, c = (t.contiguous() for t in (a, b, c))
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if n:
        launch(_add3_kernel, (cdiv(n, BLOCK),), a, b, c, out, n, BLOCK=BLOCK,
               EMU_BF16=triton_interpreting() and a.dtype == torch.bfloat16, num_warps=8)
    return out


def _backward(ctx, dout):
    """The gradient of each input is the output's gradient itself."""
    return dout, dout, dout


class Add3Function(torch.autograd.Function):
    """Eager-mode entry."""

    @staticmethod
    def forward(ctx, a, b, c):
        return add3_forward(a, b, c)

    backward = staticmethod(_backward)


@torch.library.custom_op("hrm_kernels::add3", mutates_args=())
def _add3_op(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return add3_forward(a, b, c)


@_add3_op.register_fake
def _(a, b, c):
    return a.new_empty(a.shape)


_add3_op.register_autograd(_backward)


def add3_reference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """HRM's eager expression, also the CPU fallback."""
    return a + (b + c)


def add3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a + (b + c)`` for three tensors of one shape and dtype, in one kernel on CUDA."""
    op = "add3"
    for name, t in (("a", a), ("b", b), ("c", c)):
        check_float(name, t, op)
    for name, t in (("b", b), ("c", c)):
        check_same(op, "a", a, name, t)
    if not use_triton(a.device):
        return add3_reference(a, b, c)
    if torch.compiler.is_compiling():  # (add3_forward makes the inputs contiguous)
        return torch.ops.hrm_kernels.add3(a, b, c)
    return Add3Function.apply(a, b, c)
