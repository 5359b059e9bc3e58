"""RoPE + bidirectional attention from a fused qkv tensor, forward without gradients (the model's
no-grad passes): triton (``rope_attention``: one kernel up to ``MAX_FUSED_SEQ``, rope kernel + SDPA
above) vs eager (``rope_reference`` + SDPA) vs
torch.compile of that eager code; plus the path the model took before (the ``rope`` kernel +
SDPA, i.e. cuDNN attention) in a second table. Bytes: qkv read once and the output written once,
4 x [B, S, H, Dh]; FLOPs: 4 B H S^2 Dh (the two matmuls, unpadded).

    python benchmarks/bench_rope_attention.py [--sweep]   # markdown tables; --sweep: tile configs
    python -m pytest benchmarks/bench_rope_attention.py   # pytest-benchmark
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.bench_train_step import switches  # noqa: E402
from benchmarks.common import (PROVIDERS, Case, against_unfused, bench_case,  # noqa: E402
                               fused_op_report, require_cuda, sweep_flag_main, tile_sweep)
from hrm_kernels import first_halves, rope_attention, rope_attention_reference, use_backend  # noqa: E402

kernel_module = importlib.import_module("hrm_kernels.rope_attention")

# (batch, seq, heads, head_dim): HRM's Sudoku (768 x 81 tokens + 1 puzzle token) and ARC shapes.
SHAPES = [(768, 82, 8, 64), (96, 901, 8, 64)]


def _tables(seq, head_dim):
    """The model's own tables (hrm.layers.RotaryEmbedding, base 10000)."""
    from hrm.layers import RotaryEmbedding

    return RotaryEmbedding(head_dim, seq, 10000.0).cuda()()


def _fused(qkv, cos, sin):
    """``rope_attention`` given the tables' first halves, as hrm.layers.Attention passes them."""
    return rope_attention(qkv, *first_halves(cos, sin))


def _triton(qkv, cos, sin):
    with use_backend("triton"), torch.no_grad():
        return _fused(qkv, cos, sin)


def _composed(qkv, cos, sin):
    """The unfused path (rope_qkv + SDPA) given the same half-width tables."""
    return kernel_module._composed(qkv, *first_halves(cos, sin))


def _rope_kernel_then_sdpa(qkv, cos, sin):
    with use_backend("triton"), torch.no_grad():
        return _composed(qkv, cos, sin)


def _eager(qkv, cos, sin):
    with torch.no_grad():
        return rope_attention_reference(qkv, cos, sin)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_eager, dynamic=False)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(rope_attention_reference, dynamic=False)


def _fwd_bwd(fn, qkv, cos, sin, dout, backend="triton"):
    """Forward with a gradient, then qkv's gradient for ``dout`` (qkv is a leaf that requires grad)."""
    with use_backend(backend), torch.enable_grad():
        return torch.autograd.grad(fn(qkv, cos, sin), qkv, dout)[0]


def _grad_inputs(shape):
    qkv, cos, sin = _inputs(shape)
    b, s, h, d = shape
    return qkv.requires_grad_(), cos, sin, torch.randn(b, s, h, d, device="cuda", dtype=qkv.dtype)


def _inputs(shape, dtype=torch.bfloat16):
    b, s, h, d = shape
    return torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype), *_tables(s, d)


def cases() -> list[Case]:
    out = []
    for shape in SHAPES:
        b, s, h, d = shape
        args = _inputs(shape)
        fns = {"triton": functools.partial(_triton, *args), "eager": functools.partial(_eager, *args),
               "compile": functools.partial(_compiled(), *args)}
        out.append(Case("rope_attention", "x".join(map(str, shape)), "fwd", 4 * b * s * h * d * 2, fns,
                        flops=4 * b * h * s * s * d))
        args = _grad_inputs(shape)
        fns = {"triton": functools.partial(_fwd_bwd, _fused, *args),
               "eager": functools.partial(_fwd_bwd, rope_attention_reference, *args),
               "compile": functools.partial(_fwd_bwd, _compiled_reference(), *args)}
        out.append(Case("rope_attention", "x".join(map(str, shape)), "fwd+bwd", 12 * b * s * h * d * 2, fns,
                        flops=14 * b * h * s * s * d))
    return out


@pytest.fixture(scope="module")
def all_cases():
    return {c.id: c for c in cases()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_id", ["rope_attention-" + "x".join(map(str, s)) + "-" + mode
                                     for s in SHAPES for mode in ("fwd", "fwd+bwd")])
def test_rope_attention(benchmark, all_cases, case_id, provider):
    bench_case(benchmark, all_cases[case_id], provider)


def against_model_path() -> str:
    """The kernels against the unfused path (rope kernel + SDPA; with a gradient rope_qkv + SDPA,
    what the model's gradient path ran before the fused backward), same process."""
    cases = []
    for b, s, h, d in SHAPES:
        label = "x".join(map(str, (b, s, h, d)))
        args = _inputs((b, s, h, d))
        cases.append((label + " fwd", functools.partial(_triton, *args),
                      functools.partial(_rope_kernel_then_sdpa, *args), 4 * b * h * s * s * d))
        args = _grad_inputs((b, s, h, d))
        cases.append((label + " fwd+bwd", functools.partial(_fwd_bwd, _fused, *args),
                      functools.partial(_fwd_bwd, _composed, *args), 14 * b * h * s * s * d))
    return against_unfused(cases, "rope(_qkv) + SDPA")


def sweep() -> str:
    """GPU time per tile configuration at the shapes the kernels take (seq <= MAX_FUSED_SEQ): the
    forward's (BLOCK_M, BLOCK_N, num_warps, num_stages, JOIN_HALVES), fastest eight; then fwd+bwd per backward
    (BLOCK_N, num_warps, num_stages, JOIN_HALVES). The Triton kernels' (the Gluon ones, which take
    these calls on Hopper by default, are off here)."""
    with switches("gluon_rope_attention=0,gluon_rope_attention_bwd=0"):
        return _sweep()


def _sweep() -> str:
    configs = [(bm, bn, w, st, join) for bm in (32, 64, 128) for bn in (16, 32, 64) for w in (4, 8) for st in (1, 2)
               for join in (False, True)]
    shapes = [s for s in SHAPES if s[1] <= kernel_module.MAX_FUSED_SEQ]
    forward = tile_sweep(kernel_module, "CUDA_CONFIG", configs, shapes,
                         lambda shape: functools.partial(_triton, *_inputs(shape)), keep=8)
    configs = [(bn, w, st, join) for bn in (16, 32, 64) for w in (4, 8) for st in (1, 2) for join in (False, True)]
    backward = tile_sweep(kernel_module, "CUDA_BACKWARD_CONFIG", configs, shapes,
                          lambda shape: functools.partial(_fwd_bwd, _fused, *_grad_inputs(shape)))
    return forward + "\nForward + backward, by the backward's tile:\n\n" + backward


def main(do_sweep: bool = False) -> str:
    return fused_op_report("RoPE + attention from qkv, bf16", "rope_attention", cases(), against_model_path,
                           "the unfused path (rope kernel or rope_qkv, then SDPA)", sweep if do_sweep else None)


if __name__ == "__main__":
    require_cuda(__file__)
    sweep_flag_main(main, __doc__)
