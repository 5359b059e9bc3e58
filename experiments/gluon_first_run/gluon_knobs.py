"""Session 45: the Gluon gated-blend kernels' tuning constants, one at a time, on the GPU (bf16,
``benchmarks.bench_gated_blend``'s inputs at Sudoku's and ARC's rows, with and without inj): each
kernel alone (the forward storing pre1 and z, the forward without them, d_pre1, the second phase),
GPU us from the profiler, the fastest of 2 rounds alternating with the default, and whether its
outputs are bit-identical to the default's. A value that does not compile or fit is reported and
skipped.

    python experiments/gluon_first_run/gluon_knobs.py [--shapes sudoku,arc] [--budget 240]
"""
import argparse
import os
import sys
import time

import torch
sys.path.insert(0, os.getcwd())
from benchmarks.bench_gated_blend import SHAPES, make_inputs  # noqa: E402
from benchmarks.common import environment, gpu_us  # noqa: E402
from hrm_kernels import _gluon_gated_blend as gg  # noqa: E402

# constant -> values to try (the default is timed next to each)
KNOBS = {
    "STAGES": (3, 5),
    "DPRE_STAGES": (2, 3),
    "MAIN_STAGES": (2,),
    "MAIN_ITEMS_PER_SM": (1, 3, 4),
    "CONSUMER_REGISTERS": (224, 240),
}
# which kernels each constant reaches
REACHES = {"STAGES": ("forward", "forward_nograd"), "DPRE_STAGES": ("dpre",), "MAIN_STAGES": ("main",),
           "MAIN_ITEMS_PER_SM": ("main",), "CONSUMER_REGISTERS": ("forward", "forward_nograd", "dpre", "main")}


HEADER = ("| shape | inj | kernel | constant | default us | value us | speed-up | vs default |\n"
          "|---|---|---|---|---:|---:|---:|---|")


def kernels(rows, inj):
    leaves, dout = make_inputs(rows, inj)
    own, other, inj_t, w1, b1, w2, b2 = [t.detach() if t is not None else None for t in leaves]
    _, pre1, z = gg.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, store_hidden=True)
    dpre, _ = gg.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z)

    def main():
        d_own, d_other = torch.empty_like(own), torch.empty_like(other)
        d_inj = torch.empty_like(inj_t) if inj_t is not None else None
        parts = gg.backward_main(dout, own, other, inj_t, w1, w2, b2, z, dpre, d_own, d_other, d_inj)
        return (d_own, d_other) + ((d_inj,) if d_inj is not None else ()) + tuple(parts)

    return {"forward": lambda: gg.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, store_hidden=True),
            # the model's no-gradient calls (most of them): no pre1, z
            "forward_nograd": lambda: (gg.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2),),
            "dpre": lambda: gg.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z),
            "main": main}


def same(name, a, b):
    """'bits' if identical, else the largest difference relative to the default's largest value (the
    second phase's weight-gradient partials compared by their sums: the row splits may differ)."""
    if name == "main":
        a, b = ([x.sum(0) if x.dtype == torch.float32 else x for x in t] for t in (a, b))
    pairs = list(zip(a, b))
    if all(torch.equal(x, y) for x, y in pairs):
        return "bits"
    return "rel " + f"{max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item() for x, y in pairs):.1e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="sudoku,arc")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds; no case starts after budget - 90 (a case compiles up to 3 kernels)")
    args = parser.parse_args()
    print(environment(), flush=True)
    print(HEADER, flush=True)  # (the rows print as they are measured)
    start = time.time()
    for shape in args.shapes.split(","):
        for inj in ("tensor", "none"):
            calls = kernels(SHAPES[shape], inj)
            for knob, values in KNOBS.items():
                default = getattr(gg, knob)
                for value in values:
                    if time.time() - start > args.budget - 90:
                        print("budget spent", flush=True)
                        return
                    for name in REACHES[knob]:
                        fn = calls[name]
                        ref = fn()
                        try:
                            setattr(gg, knob, value)
                            got = fn()
                            verdict = same(name, got, ref)
                            ts = {"default": [], "value": []}
                            for _ in range(2):
                                for k in ts:
                                    setattr(gg, knob, default if k == "default" else value)
                                    ts[k].append(gpu_us(fn))
                            t0, t1 = min(ts["default"]), min(ts["value"])
                            line = (f"| {shape} | {inj} | {name} | {knob}={value} (default {default}) | {t0:.1f} | "
                                    f"{t1:.1f} | {t0 / t1:.3f}x | {verdict} |")
                        except Exception as e:  # noqa: BLE001 - a value may not compile or fit
                            line = f"| {shape} | {inj} | {name} | {knob}={value} | - | - | - | {type(e).__name__}: {str(e)[:80]} |"
                        finally:
                            setattr(gg, knob, default)
                        print(line, flush=True)


if __name__ == "__main__":
    main()
