"""Elementwise math shared by the Triton kernels.

``sigmoid(x, FAST)``: with ``FAST``, ``sigmoid(x) = (1 + tanh(x / 2)) / 2`` through the GPU's
``tanh.approx.f32``: one special-function instruction where ``tl.sigmoid`` takes two (an ``ex2`` and
a reciprocal). In the gate kernels and the SwiGLU GEMM epilogue at HRM's sizes (tens of millions of
sigmoids per call) this measured 14-20% (gated_blend fwd+bwd) and 7% (linear_swiglu forward) on an
H100 (benchmarks/RESULTS.md). A Newton-iteration reciprocal on the FMA units instead was slower
than ``tl.sigmoid``.

Error: ``tanh.approx`` has a relative error of at most about 2^-11, so the sigmoid is off by at
most about 2^-12 in absolute terms (relative to the result, that is large only where the result is
below ~1/16). The kernels that use it round their results to bf16/fp16 (2^-9 / 2^-11 relative),
and where silu(x) = x sigmoid(x) is small (x < -2) the rounding of x itself to bf16 already moves
it by more (its relative condition number there is about 1 - x). Only for 2-byte activations on
CUDA (``fast_sigmoid_for``); fp32 and the interpreter (no inline assembly) take ``tl.sigmoid``.
"""

import torch
import triton
import triton.language as tl

from hrm_kernels.backend import triton_interpreting


# Off: every kernel takes tl.sigmoid (for A/B runs: ``bench_train_step.py --switches fast_sigmoid=0``).
FAST_SIGMOID = True


def fast_sigmoid_for(dtype: torch.dtype) -> bool:
    """Whether kernels computing in ``dtype`` take the one-instruction sigmoid."""
    return (FAST_SIGMOID and dtype in (torch.bfloat16, torch.float16) and not triton_interpreting()
            and torch.version.hip is None)


@triton.jit
def sigmoid(x, FAST: tl.constexpr):
    """Elementwise sigmoid of an fp32 tensor (see the module docstring)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 + 0.5 * t
    else:
        return tl.sigmoid(x)


@triton.jit
def cast(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """``x.to(dtype)``. EMU_BF16 (bf16 under the interpreter, which truncates fp32 -> bf16): round
    to nearest even first, as the GPU does, so that interpreter tests see the GPU's rounding."""
    if EMU_BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        x = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)
