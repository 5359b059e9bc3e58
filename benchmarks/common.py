"""Shared benchmark machinery: timing with CUDA events, byte/FLOP accounting, tables.

Every op's benchmark module defines ``cases()``: a list of ``Case``s, each with one callable per
provider (``triton``: our kernels; ``eager``: the PyTorch reference; ``compile``:
``torch.compile`` of that same reference). The pytest-benchmark tests and the script mode
(``python benchmarks/bench_<op>.py``, which prints a markdown table) time the same callables.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
from typing import Callable

import torch

PROVIDERS = ("triton", "eager", "compile")


@dataclasses.dataclass
class Case:
    op: str
    shape: str  # label, e.g. "62976x512"
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    bytes: int  # minimum traffic we count for this mode (same for every provider)
    fns: dict[str, Callable[[], object]]
    flops: int = 0

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.mode}"


def median_us(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 300) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def gpu_profile(fn: Callable[[], object], iters: int = 20) -> tuple[float, float]:
    """(GPU us per call, kernel launches per call). GPU time is the summed duration of every
    kernel (and memset/copy) the call launches, from the profiler (annotation ranges left out): unlike ``median_us`` it
    excludes host overhead and launch gaps, i.e. what the call costs inside a CUDA graph or a
    host-ahead pipeline."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total, launches = 0.0, 0
    for e in prof.key_averages():
        if (getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type)
                or getattr(e, "is_user_annotation", False)):  # a label's span over kernels, not work
            continue
        t = getattr(e, "self_device_time_total", None)
        t = t if t is not None else e.self_cuda_time_total
        if t > 0:
            total += t
            launches += e.count
    return total / iters, launches / iters


def gpu_us(fn: Callable[[], object], iters: int = 20) -> float:
    """GPU time per call (see ``gpu_profile``)."""
    return gpu_profile(fn, iters)[0]


def grad_fn(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], mode: str,
            dout: torch.Tensor | None = None) -> Callable[[], object]:
    """The callable to time for ``mode``: the forward alone, the backward alone (of one forward
    kept alive with ``retain_graph``), or both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "fwd+bwd":
        def run():
            out = forward()
            return torch.autograd.grad(out, inputs, dout if dout is not None else torch.ones_like(out))
        return run
    out = forward()
    g = dout if dout is not None else torch.ones_like(out)
    return lambda: torch.autograd.grad(out, inputs, g, retain_graph=True)


def environment() -> str:
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{card}, torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}, {datetime.date.today().isoformat()}")


def run_cases(cases: list[Case], title: str) -> list[dict]:
    """Time every provider of every case; return rows with times, bandwidth and ratios."""
    rows = []
    for case in cases:
        times = {p: median_us(fn) for p, fn in case.fns.items()}
        gpu = {p: gpu_us(fn) for p, fn in case.fns.items()}
        row = {"op": case.op, "shape": case.shape, "mode": case.mode, "bytes": case.bytes,
               "flops": case.flops, **{f"{p}_us": t for p, t in times.items()},
               **{f"{p}_gpu_us": t for p, t in gpu.items()}}
        rows.append(row)
        print(f"[{title}] {case.id}: " + ", ".join(f"{p} {times[p]:.1f} us (GPU {gpu[p]:.1f})" for p in times),
              flush=True)
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    """Two views per provider: wall time (CUDA-event median of back-to-back calls, host overhead
    included) and GPU time (kernel durations only). Bandwidth and ratios are given for both."""
    lines = [f"### {title}", "", f"{environment()}", "",
             "Wall: CUDA-event median of back-to-back calls (host overhead included). "
             "GPU: summed kernel time per call (profiler).", "",
             "| shape | mode | triton wall us | GPU us | GB/s (GPU) | TFLOP/s (GPU) | eager wall / GPU us "
             "| compile wall / GPU us | vs eager wall / GPU | vs compile wall / GPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, tg = r["triton_us"], r["triton_gpu_us"]
        gbs = r["bytes"] / tg / 1e3
        tflops = f"{r['flops'] / tg / 1e6:.0f}" if r["flops"] else "-"
        lines.append(
            f"| {r['shape']} | {r['mode']} | {t:.1f} | {tg:.1f} | {gbs:.0f} | {tflops} "
            f"| {r['eager_us']:.1f} / {r['eager_gpu_us']:.1f} | {r['compile_us']:.1f} / {r['compile_gpu_us']:.1f} "
            f"| {r['eager_us'] / t:.2f}x / {r['eager_gpu_us'] / tg:.2f}x "
            f"| {r['compile_us'] / t:.2f}x / {r['compile_gpu_us'] / tg:.2f}x |")
    return "\n".join(lines) + "\n"


def tile_sweep(module, attr: str, configs: list, shapes: list, make_call: Callable[[tuple], Callable[[], object]],
               keep: int | None = None) -> str:
    """Markdown rows of GPU time per tile configuration: ``module.<attr>`` set to each config in
    turn (restored afterwards), ``make_call(shape)`` the callable timed; fastest first, ``keep`` per shape."""
    lines = ["| shape | config | GPU us |", "|---|---|---:|"]
    saved = getattr(module, attr)
    try:
        for shape in shapes:
            call = make_call(shape)
            results = []
            for cfg in configs:
                setattr(module, attr, cfg)
                try:
                    results.append((gpu_us(call), cfg))
                except Exception as e:  # out of shared memory or registers for this tile
                    print(f"{shape} {cfg}: {type(e).__name__}", flush=True)
            for us, cfg in sorted(results)[:keep]:
                lines.append(f"| {'x'.join(map(str, shape))} | {cfg} | {us:.1f} |")
    finally:
        setattr(module, attr, saved)
    return "\n".join(lines) + "\n"


def against_unfused(cases: list[tuple[str, Callable[[], object], Callable[[], object], int]], unfused_name: str) -> str:
    """A fused kernel against the path the model takes without it, same process: ``cases`` holds
    (shape label, fused call, unfused call, FLOPs of the call) tuples."""
    lines = [f"| shape | fused wall / GPU us | TFLOP/s (GPU) | {unfused_name} wall / GPU us | speed-up wall / GPU |",
             "|---|---:|---:|---:|---:|"]
    for label, fused, unfused, flops in cases:
        fw, fg, bw, bg = median_us(fused), gpu_us(fused), median_us(unfused), gpu_us(unfused)
        lines.append(f"| {label} | {fw:.1f} / {fg:.1f} | {flops / fg / 1e6:.0f} | {bw:.1f} / {bg:.1f} "
                     f"| {bw / fw:.2f}x / {bg / fg:.2f}x |")
    return "\n".join(lines) + "\n"


def fused_op_report(title: str, op: str, cases: list[Case], against: Callable[[], str], against_what: str,
                    sweep: Callable[[], str] | None = None) -> str:
    """The markdown for a fused op's benchmark script: an optional tile sweep, the standard table,
    then the op against the model's unfused path (``against()``); printed and returned."""
    parts = ["#### Tile sweep\n\n" + sweep()] if sweep is not None else []
    parts.append(markdown_table(run_cases(cases, op), title))
    parts.append(f"Against {against_what} ({environment()}):\n\n" + against())
    text = "\n".join(parts)
    print(text)
    return text


def require_cuda(script: str, parses_args: bool = True) -> None:
    """Stop a CUDA-only benchmark script with a message, not a traceback, where there is no CUDA GPU
    (``--help`` still works in a script that ``parses_args``)."""
    if not torch.cuda.is_available() and not (parses_args and {"-h", "--help"} & set(sys.argv[1:])):
        sys.exit(f"{os.path.basename(script)} needs a CUDA GPU and torch sees none here. Without one, "
                 "`python -m pytest benchmarks` skips its cases and `python benchmarks/sass.py` compiles "
                 "the kernels for sm_90 (static costs only).")


def sweep_flag_main(main: Callable[[bool], object], doc: str | None) -> None:
    """``python bench_<op>.py [--sweep]``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--sweep", action="store_true", help="also time the tile configurations")
    main(parser.parse_args().sweep)


def bench_case(benchmark, case: Case, provider: str) -> None:
    """pytest-benchmark body: time ``provider`` (10 calls per round, synchronised) and attach the
    CUDA-event median and effective bandwidth as extra info."""
    fn = case.fns[provider]
    us = median_us(fn)
    benchmark.extra_info.update({"median_us_cuda_events": us, "GB/s": case.bytes / us / 1e3,
                                 "TFLOP/s": case.flops / us / 1e6 if case.flops else None})

    def ten_calls():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(ten_calls, rounds=10, warmup_rounds=2)
