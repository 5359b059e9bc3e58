"""Pick ``linear_swiglu``'s launch configurations on this GPU: sweeps the tiled kernel's
``CUDA_CONFIG`` and the persistent TMA kernel's ``TMA_CONFIG`` at HRM's sizes, checks every
configuration against cuBLAS + the ``swiglu`` kernel (the unfused path the model runs), and prints
GPU times (profiler) with TFLOP/s. Paste the winners into ``hrm_kernels/linear_swiglu.py``.

    python benchmarks/tune_linear_swiglu.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, gpu_us, require_cuda  # noqa: E402

TILED = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 5), (256, 64, 64, 8, 3)]
TMA = [(128, 128, 64, 8, 3, False, False), (128, 128, 64, 8, 4, False, False), (128, 128, 64, 8, 3, False, True),
       (128, 128, 64, 8, 3, True, False), (128, 128, 64, 8, 3, True, True), (256, 64, 64, 8, 3, False, False),
       (128, 64, 64, 8, 4, False, False), (64, 128, 64, 4, 4, False, False), (128, 128, 128, 8, 2, False, False)]


def main() -> None:
    mod = importlib.import_module("hrm_kernels.linear_swiglu")
    from hrm_kernels.swiglu import swiglu_forward

    print(environment())
    torch.manual_seed(0)
    for m in (768 * 82, 96 * 901):
        k, inter = 512, 1536
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(2 * inter, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        flops = 2 * m * k * 2 * inter
        unfused = swiglu_forward(F.linear(x, w))
        t_mm, t_unfused = gpu_us(lambda: F.linear(x, w)), gpu_us(lambda: swiglu_forward(F.linear(x, w)))
        print(f"\nM={m}: cuBLAS matmul {t_mm:.1f} us ({flops / t_mm / 1e6:.0f} TFLOP/s); "
              f"cuBLAS + swiglu {t_unfused:.1f} us", flush=True)
        rows = []
        for use_tma, configs in ((False, TILED), (True, TMA)):
            mod.USE_TMA = mod.TMA_STORES_GATE_UP = use_tma
            for cfg in configs:
                setattr(mod, "TMA_CONFIG" if use_tma else "CUDA_CONFIG", cfg)
                try:
                    out, gate_up = mod._launch(x, w, True)
                    bad = (out != unfused).float().mean().item()
                    ok = torch.allclose(out.float(), unfused.float(), atol=1e-2, rtol=1e-2)
                    t = gpu_us(lambda: mod._launch(x, w, False))
                    t_store = gpu_us(lambda: mod._launch(x, w, True))
                except Exception as e:  # out of shared memory, unsupported option on this Triton
                    print(f"  {'tma' if use_tma else 'tiled'} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                rows.append((t, use_tma, cfg))
                print(f"  {'tma' if use_tma else 'tiled'} {cfg}: no grad {t:.1f} us ({flops / t / 1e6:.0f} TFLOP/s), "
                      f"storing gate_up {t_store:.1f} us; vs unfused: {'ok' if ok else 'MISMATCH'} "
                      f"({bad:.1%} of elements differ)", flush=True)
        for use_tma in (False, True):
            best = min((r for r in rows if r[1] == use_tma), default=None)
            if best:
                print(f"best {'TMA_CONFIG' if use_tma else 'CUDA_CONFIG'} = {best[2]}: {best[0]:.1f} us, "
                      f"{t_unfused / best[0]:.2f}x vs cuBLAS + swiglu")


if __name__ == "__main__":
    require_cuda(__file__, parses_args=False)
    main()
