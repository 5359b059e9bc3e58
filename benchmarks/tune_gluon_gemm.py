"""Sweep the Gluon GEMMs' tile configurations (``hrm_kernels._gluon_gemm.CONFIGS``) at the calls the
no-gradient deferred-norm block makes (``hrm.layers.Block.deferred``), and the SwiGLU backward's
(``hrm_kernels._gluon_swiglu_backward.CONFIG``) at the with-gradient blocks' call, against cuBLAS at
the same shapes: GPU times from the profiler (``benchmarks.common.gpu_us``: kernels only, so the host's
descriptor building is not in them), TFLOP/s, and the largest difference from the default
configuration's output. Paste a winner into ``CONFIGS`` (or ``CONFIG``); then A/B it in the training step
(``bench_train_step.py``), since the GEMM's time moves by up to ~1.5 ms a step between runs.

    python benchmarks/tune_gluon_gemm.py [--shape sudoku arc] [--calls qkv o gate_up down down_grad]

Calls (M = batch x tokens, hidden 512, intermediate 1536):
- ``qkv``: ``norm_linear(h, ss, W_qkv)``, the plain epilogue with the row scale (ARC: the "rope"
  epilogue, which needs 128-column tiles: only its stages are swept);
- ``o``: ``linear_add_sumsq(attn, W_o, h, ss)``, K = N = 512, the normalized residual;
- ``gate_up``: ``norm_linear(h, ss, W_gate_up, "swiglu")``, N = 3072 weight rows -> 1536 columns;
- ``down``: ``linear_add_sumsq(act, W_down, h, ss)``, K = 1536, N = 512;
- ``down_grad``: the with-gradient blocks' ``swiglu_linear_backward(dy, W_down, gate_up)``
  (``hrm_kernels._gluon_swiglu_backward``: dy @ W_down with the SwiGLU backward as its epilogue,
  K = 512, I = 1536; its own ``CONFIG``), against cuBLAS's dy @ W_down alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, gpu_us  # noqa: E402

SHAPES = {"sudoku": (768, 82), "arc": (96, 901)}  # batch, tokens (with the puzzle token)
HIDDEN, INTER, HEAD_DIM = 512, 1536, 64
CALLS = ["qkv", "o", "gate_up", "down", "down_grad"]
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES); the first of each list is the library's default. Block
# shapes must be powers of two; shared memory holds STAGES x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes
# plus two output tiles (one a consumer warpgroup).
CANDIDATES = {
    "none": [None, (128, 128, 64, 4), (128, 128, 32, 8), (64, 256, 64, 4), (64, 128, 64, 8), (256, 64, 64, 4)],
    "swiglu": [None, (128, 128, 64, 5), (128, 128, 32, 8), (64, 256, 64, 4)],
    "rope": [None, (128, 128, 64, 4), (128, 128, 32, 8)],
    # the with-gradient down projection's input gradient with the SwiGLU backward as its epilogue
    # (``_gluon_swiglu_backward.CONFIG``): 4 epilogue buffers of [BLOCK_M, BLOCK_N] besides the ring;
    # [128, 128, 64] x 3 fits (224 KiB) but spills (Triton 3.8, sm_90)
    "swiglu_backward": [None, (128, 64, 64, 5), (128, 64, 128, 3), (64, 128, 64, 6), (128, 64, 32, 10)],
}


def get_config(epilogue: str) -> tuple:
    """The library's current configuration for ``epilogue`` (a CANDIDATES key)."""
    from hrm_kernels import _gluon_gemm, _gluon_swiglu_backward

    return _gluon_swiglu_backward.CONFIG if epilogue == "swiglu_backward" else _gluon_gemm.CONFIGS[epilogue]


def set_config(epilogue: str, config: tuple) -> None:
    """Make ``config`` the one the library's launcher for ``epilogue`` reads at its next call."""
    from hrm_kernels import _gluon_gemm, _gluon_swiglu_backward

    if epilogue == "swiglu_backward":
        _gluon_swiglu_backward.CONFIG = config
    else:
        _gluon_gemm.CONFIGS[epilogue] = config


def calls(shape: str) -> dict:
    """name -> (configuration key, launch(), flops, cuBLAS launch()) for the block's four matmuls and
    the SwiGLU backward at ``shape``."""
    from hrm_kernels import _gluon_gemm as gemm
    from hrm_kernels._gluon_swiglu_backward import swiglu_linear_backward
    from hrm_kernels.rope import first_halves

    batch, tokens = SHAPES[shape]
    m, dt, eps = batch * tokens, torch.bfloat16, 1e-5
    torch.manual_seed(0)

    def rows(k):
        return torch.randn(m, k, device="cuda", dtype=dt)

    def weight(n, k):
        return (torch.randn(n, k, device="cuda") / k ** 0.5).to(dt)

    h, attn, act = rows(HIDDEN), rows(HIDDEN), rows(INTER)
    ss = h.float().square().reshape(m, 4, -1).sum(-1).contiguous()  # 4 tiles of 128 columns, as written
    w_qkv, w_o, w_gate_up, w_down = weight(3 * HIDDEN, HIDDEN), weight(HIDDEN, HIDDEN), weight(2 * INTER, HIDDEN), weight(
        HIDDEN, INTER)
    out = {}
    if shape == "arc":  # past rope_attention's fused length: q and k rotated in the qkv epilogue
        angles = torch.outer(torch.arange(tokens, device="cuda", dtype=torch.float32),
                             1e4 ** -(torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM))
        cos, sin = first_halves(torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin())
        out["qkv"] = ("rope", lambda: gemm.gemm(h, w_qkv, "rope", ss=ss, eps=eps, rope=(cos, sin, tokens, HEAD_DIM)),
                      2 * m * HIDDEN * 3 * HIDDEN)
    else:
        out["qkv"] = ("none", lambda: gemm.gemm(h, w_qkv, "none", ss=ss, eps=eps), 2 * m * HIDDEN * 3 * HIDDEN)
    out["o"] = ("none", lambda: gemm.gemm_add_sumsq(attn, w_o, h, ss, eps)[0], 2 * m * HIDDEN * HIDDEN)
    out["gate_up"] = ("swiglu", lambda: gemm.gemm(h, w_gate_up, "swiglu", ss=ss, eps=eps), 2 * m * HIDDEN * 2 * INTER)
    out["down"] = ("none", lambda: gemm.gemm_add_sumsq(act, w_down, h, ss, eps)[0], 2 * m * INTER * HIDDEN)
    gate_up = rows(2 * INTER)  # the forward's [gate | up], for the backward
    out["down_grad"] = ("swiglu_backward", lambda: swiglu_linear_backward(attn, w_down, gate_up),
                        2 * m * HIDDEN * INTER)
    cublas = {"qkv": lambda: h @ w_qkv.T, "o": lambda: attn @ w_o.T, "gate_up": lambda: h @ w_gate_up.T,
              "down": lambda: act @ w_down.T, "down_grad": lambda: attn @ w_down}
    return {name: (*spec, cublas[name]) for name, spec in out.items()}


def main(argv=None) -> None:
    from hrm_kernels import _gluon_gemm as gemm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--calls", nargs="*", default=CALLS, choices=CALLS)
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and gemm.available(torch.device("cuda"))):
        raise SystemExit("tune_gluon_gemm: the Gluon GEMM runs on a Hopper GPU (none here)")
    print(environment())
    for shape in args.shape:
        specs = calls(shape)
        for name in args.calls:
            epilogue, launch, flops, cublas = specs[name]
            t_cublas = gpu_us(cublas)
            print(f"\n{shape} {name} ({epilogue}): cuBLAS plain matmul {t_cublas:.1f} us "
                  f"({flops / t_cublas / 1e6:.0f} TFLOP/s)", flush=True)
            default = get_config(epilogue)
            reference = None
            try:
                for cfg in CANDIDATES[epilogue]:
                    set_config(epilogue, default if cfg is None else cfg)
                    label = f"{get_config(epilogue)}{' (default)' if cfg is None else ''}"
                    try:
                        result = launch()
                        torch.cuda.synchronize()
                        t = gpu_us(launch)
                    except Exception as e:  # noqa: BLE001 - out of shared memory, a refused block shape
                        print(f"  {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:140]}", flush=True)
                        continue
                    if reference is None:
                        reference = result
                    diff = (result.float() - reference.float()).abs().max().item()
                    print(f"  {label}: {t:.1f} us ({flops / t / 1e6:.0f} TFLOP/s, {t_cublas / t:.2f}x cuBLAS); "
                          f"max |diff| vs default {diff:.3g}", flush=True)
            finally:
                set_config(epilogue, default)


if __name__ == "__main__":
    main()
