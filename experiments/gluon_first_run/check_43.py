"""First GPU run of session 43's software-pipelined consumers in the Gluon gated blend kernels
(``gated_blend.PIPELINE_GLUON_FORWARD`` / ``_DPRE`` / ``_MAIN``, off until this passes; written and
compiled for sm_90 without a GPU at hand):

1. bits: each kernel's pipelined form against its default form (``pipelined=`` on the launchers),
   at odd row counts and both gate hidden sizes, with and without inj, and at Sudoku's rows with 3
   programs and one row split (many tiles a work item): the same bits expected (the same sums in
   the same order; only when wgmmas are issued and waited for moves);
2. GPU time (profiler, alternating in one process, fastest of 3 rounds): forward with and without
   pre1/z, d_pre1, second phase, each default against pipelined, at Sudoku's and ARC's calls;
3. the op fwd+bwd (bf16, ``benchmarks.bench_gated_blend``'s inputs) with torch.compile, the defaults
   and all three pipelined forms on, and its ratios to torch.compile.

    python experiments/gluon_first_run/check_43.py
"""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.bench_gated_blend import SHAPES, make_inputs, step_fn  # noqa: E402
from benchmarks.common import environment, gpu_us  # noqa: E402

gb = importlib.import_module("hrm_kernels.gated_blend")
ggb = importlib.import_module("hrm_kernels._gluon_gated_blend")
SWITCHES = ("PIPELINE_GLUON_FORWARD", "PIPELINE_GLUON_DPRE", "PIPELINE_GLUON_MAIN")


def kernels(inputs, dout, pre1, z, dpre, **launch):
    """name -> (pipelined -> a call of that kernel's launcher returning its outputs); ``launch``:
    ``programs`` (all three) and ``splits`` (the second phase)."""
    own, other, inj, w1, b1, w2, b2 = inputs
    grads = [torch.empty_like(own) for _ in range(2)] + [torch.empty_like(own) if inj is not None else None]
    grid = {k: v for k, v in launch.items() if k == "programs"}

    def main(p):
        return [*ggb.backward_main(dout, own, other, inj, w1, w2, b2, z, dpre, *grads, pipelined=p, **launch),
                *[g for g in grads if g is not None]]

    return {"forward+store": lambda p: ggb.gated_blend_forward(*inputs, store_hidden=True, pipelined=p, **grid),
            "forward": lambda p: [ggb.gated_blend_forward(*inputs, pipelined=p, **grid)],
            "d_pre1": lambda p: ggb.backward_dpre(dout, own, other, inj, w2, b2, pre1, z, pipelined=p, **grid),
            "phase 2": main}


def setup(rows, inj_kind, r=128):
    leaves, dout = make_inputs(rows, inj_kind)
    inputs = [t.detach() if t is not None else None for t in leaves]
    if r != 128:  # the other gate hidden size
        g = torch.Generator(device="cuda").manual_seed(1)
        inputs[3] = (torch.randn(r, inputs[3].shape[1], device="cuda", generator=g) * 0.05).to(inputs[3].dtype)
        inputs[4] = torch.randn(r, device="cuda", generator=g) * 0.1
        inputs[5] = (torch.randn(inputs[5].shape[0], r, device="cuda", generator=g) * 0.1).to(inputs[5].dtype)
    _, _, pre1, z = gb.gated_blend_forward(*inputs, with_stats=False, store_hidden=True)
    dpre, _ = ggb.backward_dpre(dout, *inputs[:3], inputs[5], inputs[6], pre1, z)
    return leaves, inputs, dout, pre1, z, dpre


def main():
    print(environment(), flush=True)
    failures = 0
    cases = [(rows, inj_kind, r, {}) for rows in (37, 1000, 4097, SHAPES["sudoku"], SHAPES["arc"])
             for inj_kind in ("tensor", "none") for r in (128, 64)]
    cases += [(SHAPES["sudoku"], inj_kind, 128, dict(programs=3, splits=1)) for inj_kind in ("tensor", "none")]
    for rows, inj_kind, r, launch in cases:
        _, inputs, dout, pre1, z, dpre = setup(rows, inj_kind, r)
        for name, run in kernels(inputs, dout, pre1, z, dpre, **launch).items():
            # named before it runs (a hang shows where), compactly: kernel/rows/inj/R[/3 programs]
            print(f"{name}/{rows}/{inj_kind}/R{r}{'/p3' if launch else ''}", end=" ", flush=True)
            want, got = [t.clone() for t in run(False)], list(run(True))
            same = all(torch.equal(a, b) for a, b in zip(want, got))
            failures += not same
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got))
            print("same," if same else f"DIFFER (max |diff| {worst:.3g}),", flush=True)
    print(f"bits: {'all the same' if not failures else f'{failures} kernels DIFFER'}", flush=True)
    table = []
    for shape in ("sudoku", "arc"):
        for inj_kind in ("tensor", "none"):
            leaves, inputs, dout, pre1, z, dpre = setup(SHAPES[shape], inj_kind)
            for name, run in kernels(inputs, dout, pre1, z, dpre).items():
                times = {False: [], True: []}
                for _ in range(3):
                    for p in (False, True):
                        run(p)
                        torch.cuda.synchronize()
                        times[p].append(gpu_us(lambda: run(p)))
                d, p = min(times[False]), min(times[True])
                table.append(f"| {shape} | {inj_kind} | {name} | {d:.1f} | {p:.1f} | {d / p:.3f}x |")
                print(table[-1], flush=True)
            op = {}
            for _ in range(2):
                for name in ("compile", "default", "pipelined"):
                    for switch in SWITCHES:
                        setattr(gb, switch, name == "pipelined")
                    fn = step_fn("compile" if name == "compile" else "triton", leaves, dout, True)
                    fn()
                    fn()
                    torch.cuda.synchronize()
                    op.setdefault(name, []).append(gpu_us(fn))
            for switch in SWITCHES:
                setattr(gb, switch, False)
            c = min(op["compile"])
            table.append(f"| {shape} | {inj_kind} | op fwd+bwd (torch.compile {c:.1f}) | {min(op['default']):.1f} "
                         f"({c / min(op['default']):.2f}x) | {min(op['pipelined']):.1f} "
                         f"({c / min(op['pipelined']):.2f}x) | {min(op['default']) / min(op['pipelined']):.3f}x |")
            print(table[-1], flush=True)
    print("| shape | inj | kernel | default us | pipelined us | speed-up |\n|---|---|---|---:|---:|---:|")
    print("\n".join(table))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
