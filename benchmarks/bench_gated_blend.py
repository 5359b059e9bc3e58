"""Gate MLP + sigmoid blend: fused Triton vs the eager reference vs torch.compile of it.

bf16 activations, D=512, R=128 (hidden*0.25), at the Sudoku shape (M = 768 x 82 = 62976 rows) and
the ARC shape (M = 96 x 901). Forward alone and forward + backward; inj given, inj=None, and
inj = a zeros tensor; peak memory of forward + backward.

What is counted (K = 3 sources, or 2 with inj=None; [M, D] bf16 = one "pass"):
* bytes: forward reads K sources and writes out (K + 1 passes); backward reads dout and the K
  sources and writes K gradients (2K + 1 passes): 11 passes for forward + backward (8 with
  inj=None), 4 for forward alone. The [M, R] hidden tensors (1/4 pass each) are not counted.
* FLOP: one "GEMM" is 2*M*K*D*R (24.8 GFLOP at the Sudoku shape). Forward 2 (W1, W2), backward
  4 (d_hidden, dW2, dW1, d_sources): 6 GEMMs = 149 GFLOP for forward + backward. The fused
  backward recomputes the gate logits twice (8 GEMMs executed); TFLOP/s below use the 6.

Run ``python benchmarks/bench_gated_blend.py`` for the markdown table (``--sweep`` also times
launch configurations of each kernel), or ``pytest benchmarks/bench_gated_blend.py`` for pytest-benchmark.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # as a script: the repository importable

from benchmarks.bench_train_step import switches  # noqa: E402
from benchmarks.common import gpu_us, require_cuda  # noqa: E402
from hrm_kernels import gated_blend, gated_blend_reference, use_backend  # noqa: E402

gb = importlib.import_module("hrm_kernels.gated_blend")  # the module (the package exports the function)

D, R = 512, 128
SHAPES = {"sudoku": 768 * 82, "arc": 96 * 901}


def make_inputs(rows: int, inj: str = "tensor", wdtype=torch.bfloat16, device="cuda"):
    """inj: 'tensor' (random), 'none' or 'zeros'."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s, scale=1.0, dt=torch.bfloat16: (torch.randn(*s, device=device, generator=g) * scale).to(dt)  # noqa: E731
    own, other = mk(rows, D), mk(rows, D)
    inj_t = {"tensor": mk(rows, D), "none": None, "zeros": torch.zeros(rows, D, device=device,
                                                                      dtype=torch.bfloat16)}[inj]
    w1 = mk(R, 3 * D, scale=(3 * D) ** -0.5, dt=wdtype)
    b1 = mk(R, scale=0.1, dt=wdtype)
    w2 = mk(3 * D, R, scale=2.5 * R ** -0.5, dt=wdtype)
    b2 = mk(3 * D, dt=wdtype)
    leaves = [t.requires_grad_() if t is not None else None for t in (own, other, inj_t, w1, b1, w2, b2)]
    return leaves, torch.randn(rows, D, device=device, generator=g).to(torch.bfloat16)


_compiled = {}


def provider_fn(provider: str):
    if provider == "triton":
        def fn(*a, stats=False, saturation=False):
            with use_backend("triton"):
                return gated_blend(*a, stats=stats, saturation=saturation)
        return fn
    if provider == "eager":
        return gated_blend_reference
    if provider == "compile":
        if "c" not in _compiled:
            _compiled["c"] = torch.compile(gated_blend_reference, dynamic=False)
        return _compiled["c"]
    raise ValueError(provider)


def step_fn(provider: str, leaves, dout, backward: bool, stats: bool = False, saturation: bool = False):
    fn = functools.partial(provider_fn(provider), stats=stats, saturation=saturation)
    live = [t for t in leaves if t is not None]

    def step():
        for t in live:
            t.grad = None
        res = fn(*leaves)
        out = res[0] if stats else res
        if backward:
            out.backward(dout)
        return out

    if not backward:
        def fwd():
            with torch.no_grad():
                res = fn(*leaves)
            return res
        return fwd
    return step


def counts(rows: int, inj: str, backward: bool) -> tuple[float, float]:
    """(bytes, FLOP) by the formulas in the module docstring."""
    k = 2 if inj == "none" else 3
    passes = (k + 1) + ((2 * k + 1) if backward else 0)
    gemm = 2.0 * rows * k * D * R
    return passes * rows * D * 2.0, (6 if backward else 2) * gemm


def peak_memory_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------ pytest-benchmark


@pytest.mark.parametrize("provider", ["triton", "eager", "compile"])
@pytest.mark.parametrize("backward", [True, False], ids=["fwd_bwd", "fwd"])
@pytest.mark.parametrize("inj", ["tensor", "none", "zeros"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gated_blend(benchmark, shape, inj, backward, provider):
    rows = SHAPES[shape]
    leaves, dout = make_inputs(rows, inj)
    fn = step_fn(provider, leaves, dout, backward)
    for _ in range(3):
        fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark(timed)
    nbytes, flop = counts(rows, inj, backward)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(GBps=nbytes / median / 1e9, TFLOPs=flop / median / 1e12,
                                peak_MiB=peak_memory_mb(fn) if backward else None)


# ----------------------------------------------------------------------------- script mode


def bench_us(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def table(shapes=("sudoku", "arc"), wdtypes=(torch.bfloat16, torch.float32), passes=(True, False),
          injs=("tensor", "none", "zeros")) -> str:
    import triton

    lines = [f"gated_blend, bf16 activations, D={D}, R={R}; {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, triton {triton.__version__}", "",
             "Wall: CUDA-event median of back-to-back calls (host overhead included). GPU: summed kernel "
             "time per call (profiler); bandwidth and TFLOP/s from GPU time.", "",
             "| shape | M | weights | pass | inj | provider | wall us | GPU us | GB/s (GPU) | TFLOP/s (GPU) "
             "| vs eager wall / GPU | vs compile wall / GPU | peak MiB |", "|" + "---|" * 13]
    for shape, wdtype, backward, inj in itertools.product(shapes, wdtypes, passes, injs):
        if (wdtype != torch.bfloat16 or not backward) and inj == "zeros":
            continue
        if wdtype != torch.bfloat16 and inj != "tensor":
            continue
        rows = SHAPES[shape]
        leaves, dout = make_inputs(rows, inj, wdtype)
        nbytes, flop = counts(rows, inj, backward)
        times, gpu, peaks = {}, {}, {}
        for provider in ("eager", "compile", "triton"):
            fn = step_fn(provider, leaves, dout, backward)
            fn()
            times[provider] = bench_us(fn)
            gpu[provider] = gpu_us(fn)
            peaks[provider] = peak_memory_mb(fn)
        for provider, t in times.items():
            g = gpu[provider]
            lines.append(
                f"| {shape} | {rows} | {str(wdtype)[6:]} | {'fwd+bwd' if backward else 'fwd'} | {inj} | "
                f"{provider} | {t:.0f} | {g:.0f} | {nbytes / g / 1e3:.0f} | {flop / g / 1e6:.0f} | "
                f"{times['eager'] / t:.2f} / {gpu['eager'] / g:.2f} | {times['compile'] / t:.2f} / {gpu['compile'] / g:.2f} "
                f"| {peaks[provider]:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def stats_overhead(rows=SHAPES["sudoku"], repeats: int = 3) -> str:
    """What stats=True adds to the op, and stats=True with saturation=True (no gradient reaching
    the stats, as when they are only logged), wall and GPU time, the forward without gradients and
    fwd+bwd; the three variants timed in turn ``repeats`` times, the fastest of each kept."""
    leaves, dout = make_inputs(rows)
    variants = {"none": {}, "stats": dict(stats=True), "stats+saturation": dict(stats=True, saturation=True)}
    out = []
    for backward in (False, True):
        for clock, timer in (("wall", bench_us), ("GPU", gpu_us)):
            fns = {name: step_fn("triton", leaves, dout, backward, **kw) for name, kw in variants.items()}
            t = {name: min(timer(fn) for _ in range(repeats)) for name, fn in fns.items()}
            for name in ("stats", "stats+saturation"):
                out.append(f"{name} overhead ({'fwd+bwd' if backward else 'fwd'}, {clock}): {t['none']:.0f} -> "
                           f"{t[name]:.0f} us ({100 * (t[name] / t['none'] - 1):+.1f}%)")
    return "\n".join(out)


SWEEP = {
    "hidden": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=st)
               for bm, bk, w, st in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                     (64, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 2), (256, 32, 8, 3)]],
    # the whole forward: the hidden GEMM inside the blend kernel (FUSE_HIDDEN), or the hidden
    # kernel first (its own configuration, ``hidden``) and one blend program per D-chunk
    "fwd": [dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, num_warps=w, num_stages=st, D_STAGES=ds, FUSE_HIDDEN=True)
            for bm, bk, bd, w, st, ds in [(64, 64, 32, 4, 3, 2), (64, 64, 32, 4, 3, 1), (64, 64, 32, 4, 3, 3),
                                          (64, 64, 64, 4, 3, 2), (64, 64, 64, 8, 3, 2), (128, 64, 32, 8, 3, 2),
                                          (128, 64, 32, 4, 3, 2), (64, 32, 32, 4, 4, 2), (32, 64, 32, 4, 3, 2),
                                          (64, 128, 32, 4, 2, 2), (128, 64, 64, 8, 2, 2), (32, 64, 64, 4, 3, 2),
                                          (64, 64, 32, 8, 3, 2), (64, 64, 16, 8, 3, 2), (128, 64, 16, 8, 3, 2),
                                          # each program reads all of W1 and W2 (786 KB bf16) from L2: 256
                                          # rows halve that traffic (387 MB at the Sudoku shape with 128)
                                          (256, 64, 32, 8, 3, 2), (256, 64, 16, 8, 3, 2), (256, 32, 32, 8, 3, 2)]]
           + [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=1, D_STAGES=1, FUSE_HIDDEN=False)
              for bm, bd, w in [(128, 32, 4), (128, 64, 8), (64, 64, 4)]],
    # the forward with stats (the model's with-gradient calls): the per-row sums add registers
    # (`python benchmarks/sass.py`: 128 rows x 4 warps spill 144 bytes a thread; 64 rows x 8 warps
    # and 128 x 8 none)
    "fwd_stats": [dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, num_warps=w, num_stages=st, D_STAGES=ds, FUSE_HIDDEN=True)
                  for bm, bk, bd, w, st, ds in [(128, 64, 32, 4, 3, 2), (128, 64, 32, 8, 3, 2), (64, 64, 32, 4, 3, 2),
                                                (64, 64, 32, 8, 3, 2), (64, 64, 16, 8, 3, 2), (128, 64, 16, 8, 3, 2),
                                                (64, 64, 64, 8, 3, 2), (64, 64, 32, 8, 3, 3), (32, 64, 32, 4, 3, 2),
                                                (256, 64, 32, 8, 3, 2), (256, 64, 16, 8, 3, 2)]]
                 # the hidden kernel first: the blend kernel keeps its registers for the stats
                 + [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=1, D_STAGES=1, FUSE_HIDDEN=False)
                    for bm, bd, w in [(128, 32, 4), (128, 32, 8), (128, 64, 8), (64, 64, 4), (64, 32, 4)]],
    "dpre": [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st)
             for bm, bd, w, st in [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3),
                                   (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 2, 2)]],
    "bwd": [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st, programs_per_sm=p)
            for bm, bd, w, st, p in [(32, 64, 4, 2, 2), (32, 64, 4, 2, 4), (16, 64, 4, 2, 2),
                                     (32, 32, 4, 2, 4), (32, 64, 4, 3, 2), (16, 32, 2, 2, 4),
                                     (32, 64, 8, 2, 2), (64, 32, 4, 2, 4)]],
}


def sweep(rows=SHAPES["sudoku"], wdtype=torch.bfloat16, kernels=tuple(SWEEP)) -> dict:
    """Time each kernel under a few launch configurations (inj given; ``wdtype`` weights, by
    default bf16 as the model passes them); returns the fastest configuration of each (checked
    against the default configuration's results). "hidden" times the whole two-kernel forward
    (its blend kernel's configuration fixed), the others their kernel alone. The Triton kernels'
    (the Gluon ones, which take some of these calls on Hopper by default, are off here)."""
    with switches("gluon_gated_blend=0,gluon_gated_blend_dpre=0,gluon_gated_blend_main=0,gluon_gated_blend_store=0"):
        return _sweep(rows, wdtype, kernels)


def _sweep(rows, wdtype, kernels) -> dict:
    leaves, dout = make_inputs(rows, wdtype=wdtype)
    own, other, inj, w1, b1, w2, b2 = [t.detach() if t is not None else None for t in leaves]
    flags = gb._gate_flags(own.dtype)
    out, _, pre1, z = gb.gated_blend_forward(own, other, inj, w1, b1, w2, b2, False)
    cfgs = gb._launch_configs(rows, D, R, own.device, own.dtype, w1.dtype)
    dpre1, db1p = gb._backward_dpre(cfgs["dpre"], flags, dout, None, own, other, inj, w2, b2, pre1, z)

    def main_bwd(cfg):
        grads = [torch.empty_like(own), torch.empty_like(other), torch.empty_like(inj)]
        return gb._backward_main(cfg, flags, dout, None, own, other, inj, w1, b1, w2, b2, z, dpre1, db1p,
                                 *grads)

    runs = {
        "hidden": lambda cfg: gb.gated_blend_forward(own, other, inj, w1, b1, w2, b2, False)[2:],
        # as the model's no-gradient calls run it (most of its calls)
        "fwd": lambda cfg: gb.gated_blend_forward(own, other, inj, w1, b1, w2, b2, False, store_hidden=False)[:1],
        # as the model's with-gradient calls run it
        "fwd_stats": lambda cfg: gb.gated_blend_forward(own, other, inj, w1, b1, w2, b2, True)[:2],
        "dpre": lambda cfg: gb._backward_dpre(cfg, flags, dout, None, own, other, inj, w2, b2, pre1, z)[:1],
        "bwd": main_bwd,
    }
    best = {}
    for name in kernels:
        options = SWEEP[name]
        ref = runs[name](cfgs[name])
        results = []
        for cfg in options:
            # the hidden kernel runs only in the two-kernel forward
            gb._config_override = {name: cfg, **({"fwd": {"FUSE_HIDDEN": False}} if name == "hidden" else {})}
            full = {**cfgs[name], **cfg}
            try:
                res = runs[name](full)
                diff = max((x.float() - y.float()).abs().max().item() / max(y.float().abs().max().item(), 1e-6)
                           for x, y in zip(res, ref))
                t = bench_us(lambda: runs[name](full))
                print(f"sweep {name} {cfg}: {t:.1f} us (max rel. diff to default {diff:.1e})", flush=True)
                if diff < 5e-2:
                    results.append((t, cfg))
            except Exception as e:  # noqa: BLE001 - a config may not fit (shared memory)
                print(f"sweep {name} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            finally:
                gb._config_override = {}
        if results:
            best[name] = min(results, key=lambda tc: tc[0])[1]
    print(f"best: {best}", flush=True)
    return best


def main() -> str:
    """The run_all section: stats overhead, then fwd+bwd at both shapes (bf16 and fp32 weights)."""
    torch._dynamo.config.cache_size_limit = 64
    text = ("### gated_blend (gate MLP + sigmoid blend), fwd+bwd\n\n"
            "Wall time (CUDA-event median, host overhead included); bytes and FLOPs as counted in "
            "`counts()`.\n\n" + stats_overhead() + "\n\n" + table(passes=(True,)) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    require_cuda(__file__)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--shapes", default="sudoku,arc")
    parser.add_argument("--weights", default="bfloat16,float32", help="weight dtypes (the first: --sweep's)")
    parser.add_argument("--passes", default="fwd_bwd,fwd")
    parser.add_argument("--save", help="with --sweep: write the fastest configurations (JSON) here")
    parser.add_argument("--config", help="launch configuration overrides (JSON, as --save writes)")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--sweep-kernels", default=",".join(SWEEP), help=f"which of {', '.join(SWEEP)} to sweep")
    args = parser.parse_args()
    unknown = set(args.sweep_kernels.split(",")) - set(SWEEP)
    if unknown:
        parser.error(f"--sweep-kernels: {', '.join(sorted(unknown))} not among {', '.join(SWEEP)}")
    torch._dynamo.config.cache_size_limit = 64
    if args.sweep:
        best = sweep(wdtype=getattr(torch, args.weights.split(",")[0]), kernels=tuple(args.sweep_kernels.split(",")))
        if args.save:
            with open(args.save, "w") as f:
                json.dump(best, f)
    if args.config:
        with open(args.config) as f:
            gb._config_override = json.load(f)
        print(f"launch configuration override: {gb._config_override}")
    if args.sweep_only:
        sys.exit(0)
    print(stats_overhead(), flush=True)
    print(table(tuple(args.shapes.split(",")), tuple(getattr(torch, w) for w in args.weights.split(",")),
                tuple(p == "fwd_bwd" for p in args.passes.split(","))))
