"""AdamATan2.step() on HRM's parameter list: the fused Triton kernel vs torch.optim.AdamW(fused=True)
(the same bytes, a different formula: the speed bar) vs the same math in PyTorch, per tensor and
with torch._foreach ops.

Parameters (float32, 27.3M): hidden 512, 4 H + 4 L layers, each with qkv [1536, 512], o [512, 512],
gate_up [3072, 512], down [512, 1536]; embed_tokens and lm_head [vocab, 512] (vocab 12 for ARC);
q_head [2, 512] + [2]. H_init / L_init are buffers and the puzzle embedding has its own sparse
optimizer, so neither is here. 36 tensors.

Bytes counted per step: read p, g, m, v and write p, m, v: 7 * 4 bytes per parameter (764 MB).

Run ``python benchmarks/bench_adam_atan2.py`` for the markdown table (``--sweep`` also times
launch configurations of the kernel first), or ``pytest benchmarks/bench_adam_atan2.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Case, bench_case, environment, gpu_profile, median_us, require_cuda  # noqa: E402
from hrm_kernels import AdamATan2, use_backend  # noqa: E402
from hrm_kernels import adam_atan2 as mod  # noqa: E402

HIDDEN, LAYERS, VOCAB = 512, 4 + 4, 12
BYTES_PER_PARAM = 7 * 4
PROVIDERS = ("triton", "adamw_fused", "foreach", "per_tensor", "adam_atan2_pkg")


def hrm_param_shapes(vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    inter = 1536  # SwiGLU width: 4 * 512 * 2/3 rounded up to a multiple of 256
    shapes = [("embed_tokens", (vocab, HIDDEN))]
    for level, n in (("H", LAYERS // 2), ("L", LAYERS // 2)):
        for i in range(n):
            shapes += [(f"{level}.{i}.qkv", (3 * HIDDEN, HIDDEN)), (f"{level}.{i}.o", (HIDDEN, HIDDEN)),
                       (f"{level}.{i}.gate_up", (2 * inter, HIDDEN)), (f"{level}.{i}.down", (HIDDEN, inter))]
    return shapes + [("lm_head", (vocab, HIDDEN)), ("q_head.weight", (2, HIDDEN)), ("q_head.bias", (2,))]


def make_params(vocab: int = VOCAB, device="cuda", seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in hrm_param_shapes(vocab):
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=g) * 0.02)
        p.grad = torch.randn(shape, device=device, generator=g) * 1e-3
        params.append(p)
    return params


LR, BETAS, WD = 1e-4, (0.9, 0.95), 0.1


class _EagerStep:
    """The same update with PyTorch ops (hrm_kernels.adam_atan2.adam_atan2_eager), with its own
    state and step count, like an optimizer would keep them."""

    def __init__(self, params, foreach: bool):
        self.params, self.foreach, self.step_count = params, foreach, 0
        self.grads = [p.grad for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def __call__(self):
        self.step_count += 1
        t = self.step_count
        mod.adam_atan2_eager(self.params, self.grads, self.m, self.v, step_size=LR / (1 - BETAS[0] ** t),
                             wd_alpha=1 - LR * WD, beta1=BETAS[0], beta2=BETAS[1],
                             bc2_sqrt=(1 - BETAS[1] ** t) ** 0.5, foreach=self.foreach)


def step_fn(provider: str, params):
    if provider == "triton":
        opt = AdamATan2(params, lr=LR, betas=BETAS, weight_decay=WD)

        def step():
            with use_backend("triton"):
                opt.step()
        return step
    if provider == "adamw_fused":
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD, fused=True).step
    if provider in ("foreach", "per_tensor"):
        return _EagerStep(params, foreach=provider == "foreach")
    if provider == "adam_atan2_pkg":
        import adam_atan2  # the original CUDA extension, where it could be built
        return adam_atan2.AdamATan2(params, lr=LR, betas=BETAS, weight_decay=WD).step
    raise ValueError(provider)


def available(provider: str) -> bool:
    if provider != "adam_atan2_pkg":
        return True
    try:
        import adam_atan2  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or its extension failed to build/load
        return False
    return True


def cases(vocab: int = VOCAB, providers=PROVIDERS) -> list[Case]:
    n = sum(p.numel() for p in make_params(vocab))
    fns = {p: step_fn(p, make_params(vocab)) for p in providers if available(p)}
    return [Case(op="adam_atan2", shape=f"hrm-{n / 1e6:.1f}M", mode="step", bytes=BYTES_PER_PARAM * n, fns=fns)]


# ------------------------------------------------------------------------ pytest-benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
def test_adam_atan2_step(benchmark, provider):
    if not available(provider):
        pytest.skip(f"{provider} is not installed")
    case = cases(providers=(provider,))[0]
    bench_case(benchmark, case, provider)


# ----------------------------------------------------------------------------- script mode


def check_numerics(vocab: int) -> str:
    """One step of the kernel vs the float32 foreach implementation, same inputs."""
    a, b = make_params(vocab, seed=1), make_params(vocab, seed=1)
    step_fn("triton", a)()
    step_fn("foreach", b)()
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    moved = max((x - y).abs().max().item() for x, y in zip(a, make_params(vocab, seed=1)))
    return f"one step, kernel vs foreach float32: max |dp| = {diff:.2e} (update size up to {moved:.2e})"


def sweep(vocab: int) -> dict:
    """Time the kernel alone under launch configurations; returns the fastest (all must give
    bit-identical results: the math is elementwise)."""
    params = make_params(vocab, seed=2)
    grads = [p.grad for p in params]
    ms = [torch.randn_like(p) * 1e-3 for p in params]
    vs = [torch.rand_like(p) * 1e-6 for p in params]
    kw = dict(step_size=1e-4, wd_alpha=1 - 1e-5, beta1=0.9, beta2=0.95, bc2_sqrt=0.5)
    n = sum(p.numel() for p in params)
    configs = [(1024, 1024, 4), (2048, 1024, 4), (4096, 1024, 4), (8192, 1024, 4), (16384, 1024, 4),
               (2048, 2048, 8), (8192, 2048, 8), (16384, 2048, 8), (4096, 4096, 16), (16384, 4096, 8),
               (8192, 512, 4), (65536, 2048, 8)]
    reference, best = None, None
    saved = dict(mod.LAUNCH)
    start = [[t.detach().clone() for t in ts] for ts in (params, ms, vs)]
    for chunk, block, warps in configs:
        mod.LAUNCH.update(chunk=chunk, block=block, num_warps=warps)
        out = [[t.clone() for t in ts] for ts in start]
        mod.adam_atan2_fused(out[0], grads, out[1], out[2], **kw)
        if reference is None:
            reference = out
        same = all(torch.equal(x, y) for xs, ys in zip(out, reference) for x, y in zip(xs, ys))
        tables = mod._LaunchTables()
        fn = lambda: mod.adam_atan2_fused(params, grads, ms, vs, tables=tables, **kw)  # noqa: E731
        us = median_us(fn)
        print(f"sweep chunk={chunk} block={block} warps={warps}: {us:.1f} us, "
              f"{BYTES_PER_PARAM * n / us / 1e3:.0f} GB/s, bit-identical to first: {same}", flush=True)
        if best is None or us < best[0]:
            best = (us, chunk, block, warps)
    mod.LAUNCH.update(saved)
    return dict(chunk=best[1], block=best[2], num_warps=best[3])


def host_overhead(vocab: int, steps: int = 50) -> str:
    """Host time per step() (nothing inside waits for the GPU): 50 steps back to back, timed on
    the host only; with the cached tables, and with the pointer table rebuilt every step (as when
    gradients come back at new addresses)."""
    params = make_params(vocab)
    opt = AdamATan2(params, lr=LR, betas=BETAS, weight_decay=WD)
    out = []
    with use_backend("triton"):
        opt.step()
        for label, clear in (("tables cached", False), ("pointer table rebuilt each step", True)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                if clear:
                    opt._tables.pointers.clear()
                opt.step()
            host = (time.perf_counter() - t0) / steps
            torch.cuda.synchronize()
            out.append(f"{label}: {host * 1e6:.0f} us")
    return "host time per step() (back to back, no sync): " + ", ".join(out)


def main(vocab: int = VOCAB, do_sweep: bool = False) -> str:
    if do_sweep:
        best = sweep(vocab)
        print(f"fastest launch config: {best} (default {mod.LAUNCH})", flush=True)
        mod.LAUNCH.update(best)
    n = sum(p.numel() for p in make_params(vocab))
    nbytes = BYTES_PER_PARAM * n
    rows = {}
    for provider in PROVIDERS:
        if not available(provider):
            print(f"{provider}: not available (the adam-atan2 package is not installed here)", flush=True)
            continue
        fn = step_fn(provider, make_params(vocab))
        fn()
        wall = median_us(fn)
        gpu, launches = gpu_profile(fn, iters=10)
        rows[provider] = (wall, gpu, launches)
        print(f"{provider}: wall {wall:.1f} us, GPU {gpu:.1f} us, {launches:.0f} launches/step", flush=True)
    shapes = hrm_param_shapes(vocab)
    lines = [f"### AdamATan2.step(), HRM parameter list ({len(shapes)} float32 tensors, {n:,} parameters, "
             f"vocab {vocab})", "", environment(), "",
             f"Bytes per step: 7 x 4 x {n:,} = {nbytes / 1e6:.0f} MB. Wall: CUDA-event median of "
             "back-to-back step() calls (host overhead included); GPU: summed kernel time per step.",
             f"Kernel launch config: {mod.LAUNCH}.", "",
             "| provider | wall us | GPU us | GB/s (wall) | GB/s (GPU) | launches/step "
             "| speed vs AdamW fused (wall / GPU) | speed vs per-tensor (wall / GPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref_a, ref_p = rows["adamw_fused"], rows["per_tensor"]
    for provider, (wall, gpu, launches) in rows.items():
        lines.append(f"| {provider} | {wall:.1f} | {gpu:.1f} | {nbytes / wall / 1e3:.0f} | {nbytes / gpu / 1e3:.0f} "
                     f"| {launches:.0f} | {ref_a[0] / wall:.2f}x / {ref_a[1] / gpu:.2f}x "
                     f"| {ref_p[0] / wall:.2f}x / {ref_p[1] / gpu:.2f}x |")
    lines += ["", check_numerics(vocab), "", host_overhead(vocab)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    require_cuda(__file__)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time launch configurations first")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    text = main(args.vocab, args.sweep)
    print(text)
    if args.out:
        args.out.write_text(text)
