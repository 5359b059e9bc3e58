"""Session 44: the backward's weight-gradient sums as one Triton kernel (``gated_blend.FUSED_WEIGHT_SUMS``
on: ``_weight_grads_kernel``) against their torch form (off: ``_weight_grads_torch``, the code before), on
the GPU, bf16, ``benchmarks.bench_gated_blend``'s inputs at Sudoku's and ARC's rows, with and without inj:

1. accuracy at the real calls (the partials captured from the op): each gradient's max error against
   float64 sums of the same partials, the kernel's no worse than torch's (up to half an ulp at the scale);
2. the sums alone, kernel against torch (GPU us, profiler);
3. the op fwd+bwd: torch.compile of the eager code, switch on, switch off (2 alternating rounds, the
   fastest), GB/s and TFLOP/s as ``bench_gated_blend.counts`` counts them, peak memory of eager,
   torch.compile and the kernels;
4. the op's per-kernel profile with the switch on.

    bash experiments/gluon_first_run/run_44.sh
"""
import importlib
import os
import sys

import torch
sys.path.insert(0, os.getcwd())
from benchmarks.bench_gated_blend import SHAPES, counts, make_inputs, peak_memory_mb, step_fn  # noqa: E402
from benchmarks.common import environment, gpu_us  # noqa: E402
gb = importlib.import_module("hrm_kernels.gated_blend")
weight_grads = gb._weight_grads


def with_switch(fused):
    """``gb._weight_grads`` with ``FUSED_WEIGHT_SUMS`` set to ``fused`` for the call."""
    def call(*a):
        default, gb.FUSED_WEIGHT_SUMS = gb.FUSED_WEIGHT_SUMS, fused
        try:
            return weight_grads(*a)
        finally:
            gb.FUSED_WEIGHT_SUMS = default
    return call


new_weight_grads, old_weight_grads = with_switch(True), with_switch(False)


def capture(leaves, dout):
    got = []
    def spy(*a):
        got.append([t.clone() for t in a])
        return old_weight_grads(*a)  # (the kernel's first GPU call is the checked one below)
    gb._weight_grads = spy
    step_fn("triton", leaves, dout, True)()
    gb._weight_grads = weight_grads
    return got[0]


print(environment(), flush=True)
table, fails = [], 0
for shape in ("sudoku", "arc"):
    for inj in ("tensor", "none"):
        rows = SHAPES[shape]
        leaves, dout = make_inputs(rows, inj)
        args = capture(leaves, dout)
        w1, b1, w2, b2, db1p, dw1p, dw2p, db2p = args
        new, old = new_weight_grads(*args), old_weight_grads(*args)
        ref = old_weight_grads(w1.double(), b1.double(), w2.double(), b2.double(), *[t.double() for t in args[4:]])
        for name, n, o, r in zip(("dW1", "db1", "dW2", "db2"), new, old, ref):
            scale = r.abs().max().item()
            en, eo = (n.double() - r).abs().max().item(), (o.double() - r).abs().max().item()
            # no worse than torch's, up to half an ulp of the weights' dtype at the scale (2^-8 of it for
            # bf16, at least half an ulp): another order of fp32 sums can round the other way
            slack = (2**-8 if n.dtype == torch.bfloat16 else 2**-23) * scale
            ok = n.dtype == o.dtype and n.shape == o.shape and en <= eo + slack
            fails += not ok
            print(f"{shape}/{inj} {name} {tuple(n.shape)} parts {args[4 if name == 'db1' else 5].shape[0]}: "
                  f"max|new-f64| {en:.3g} max|old-f64| {eo:.3g} (max|f64| {scale:.3g}) "
                  f"{'ok' if ok else 'WORSE'}", flush=True)
        ts = {"new": [], "old": []}
        for _ in range(2):
            for k, f in (("new", new_weight_grads), ("old", old_weight_grads)):
                ts[k].append(gpu_us(lambda: f(*args)))
        print(f"{shape}/{inj} sums alone: new {min(ts['new']):.1f} us, old {min(ts['old']):.1f} us", flush=True)
        op = {"compile": [], "new": [], "old": []}
        for _ in range(2):
            for k in op:
                gb.FUSED_WEIGHT_SUMS = k == "new"
                fn = step_fn("compile" if k == "compile" else "triton", leaves, dout, True)
                fn(); fn(); torch.cuda.synchronize()
                op[k].append(gpu_us(fn))
        gb.FUSED_WEIGHT_SUMS = True  # (the peak memory and the profile below: the kernel's)
        c, n, o = min(op["compile"]), min(op["new"]), min(op["old"])
        nbytes, flop = counts(rows, inj, True)
        peaks = {p: peak_memory_mb(step_fn(p if p != "new" else "triton", leaves, dout, True))
                 for p in ("eager", "compile", "new")}
        table.append(f"| {shape} | {inj} | {c:.1f} | {n:.1f} ({c / n:.2f}x) | {o:.1f} ({c / o:.2f}x) | {o / n:.3f}x | "
                     f"{nbytes / n / 1e3:.0f} | {flop / n / 1e6:.0f} | {min(ts['new']):.1f} / {min(ts['old']):.1f} | "
                     f"{peaks['eager']:.0f} / {peaks['compile']:.0f} / {peaks['new']:.0f} |")
        print(table[-1], flush=True)
        from torch.profiler import ProfilerActivity, profile
        fn = step_fn("triton", leaves, dout, True)
        fn(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        ev = [(e.self_device_time_total / 20, e.count // 20, e.key) for e in prof.key_averages()
              if e.self_device_time_total > 0]
        print(f"{shape}/{inj} per kernel (us a call, launches): " + "; ".join(
            f"{k[:60]} {t:.1f} x{c}" for t, c, k in sorted(ev, reverse=True)), flush=True)
print("| shape | inj | compile us | new us (x compile) | old us (x compile) | new vs old | GB/s | TFLOP/s "
      "| sums alone new / old us | peak MiB eager / compile / new |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(table))
print("accuracy:", "all ok" if not fails else f"{fails} WORSE")
