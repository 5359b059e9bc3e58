"""Run every kernel benchmark and write the combined markdown tables.

    python benchmarks/run_all.py --out benchmarks/RESULTS.md [--only rms_norm swiglu ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, require_cuda  # noqa: E402

MODULES = ("rms_norm", "add3", "swiglu", "linear_swiglu", "linear_add_rms_norm", "swiglu_linear", "rope_attention", "gated_blend", "adam_atan2")

HEADER = """# Benchmark results

Produced by `python benchmarks/run_all.py --out benchmarks/RESULTS.md` on the card named below.
Every ratio compares providers measured in the same process. Two times per provider:

- **wall**: CUDA-event median of back-to-back calls, as `triton.testing.do_bench` gives it; at
  these sizes it includes the host's launch overhead (Python, autograd, Triton's launcher), which
  on the benchmark machine is often larger than the kernel itself;
- **GPU**: the summed duration of the kernels a call launches (torch.profiler), i.e. the cost
  inside a CUDA graph or a pipeline where the host runs ahead. Bandwidth (GB/s) and TFLOP/s
  are computed from GPU time and the byte/FLOP counts stated in each benchmark's docstring.

`eager` is the PyTorch reference the kernels are tested against, `compile` is
`torch.compile` of that same reference.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    parser.add_argument("--only", nargs="*", default=list(MODULES), choices=MODULES)
    args = parser.parse_args()
    sections = [HEADER, f"Environment: {environment()}\n"]
    for name in args.only:
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
        except ModuleNotFoundError as e:
            print(f"skipping {name}: {e}", flush=True)
            continue
        sections.append(module.main())
    text = "\n".join(sections)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    require_cuda(__file__)
    main()
