"""Session 30 check for the next GPU session: the Gluon attention of pre-rotated q, k past 128
positions (``hrm_kernels._gluon_attention``, ``rope_attention.USE_GLUON_LONG``) against SDPA as the
model calls it at ARC's length (96 x 901 x 8 heads x 64, bf16, q, k, v views of the packed qkv):
the largest error against float64 on a few items next to SDPA's, then GPU us (medians of 5
alternating rounds) and TFLOP/s (4 * batch * heads * seq^2 * 64 FLOP), per kernel form and for key-block
stage counts 2-4; last, at Sudoku's call without rotation (768 x 82 x 8), each form against the short-sequence
Gluon kernel (hrm_kernels._gluon_rope_attention without tables) and SDPA.
    PYTHONPATH=. python3 experiments/gluon_first_run/long_attention_check.py"""
import statistics, sys; sys.path.insert(0, ".")
import torch
from benchmarks.common import environment, gpu_us
from hrm_kernels import _gluon_attention as ga
import hrm_kernels.rope_attention  # noqa: F401
from tests.reference64 import rope_attention64
lib = sys.modules["hrm_kernels.rope_attention"]

print(environment(), flush=True)
for b, s, h in ((96, 901, 8), (2, 300, 3), (4, 129, 8)):
    qkv = torch.randn(b, s, 3 * h, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lib.USE_GLUON_LONG = False
        sdpa = lambda: lib._composed(qkv, None, None)  # noqa: E731
        glu = lambda: ga.attention_forward(qkv)  # noqa: E731
        ref, got = sdpa(), glu()
        ref64 = rope_attention64(qkv[:2])
        err = (got[:2].double() - ref64).abs().max().item()
        err_sdpa = (ref[:2].double() - ref64).abs().max().item()
        print(f"{(b, s, h)}: max error vs float64 Gluon {err:.3g}, SDPA {err_sdpa:.3g}; max |Gluon - SDPA| "
              f"{(got.float() - ref.float()).abs().max().item():.3g}; finite {torch.isfinite(got).all().item()}; "
              f"3 programs bit-equal {torch.equal(ga.attention_forward(qkv, programs=3), got)}", flush=True)
        if b != 96:
            continue
        flop = 4 * b * h * s * s * 64
        for form in ga.FORMS:
            for stages in (4, 3, 2):
                ga.DEFAULT_FORM, ga.STAGES = form, stages
                times = {"sdpa": [], "gluon": []}
                for _ in range(5):
                    times["sdpa"].append(gpu_us(sdpa))
                    times["gluon"].append(gpu_us(glu))
                t = {k: statistics.median(v) for k, v in times.items()}
                print(f"{form}, stages {stages}: Gluon {t['gluon']:.1f} us ({flop / t['gluon'] / 1e6:.0f} TFLOP/s), "
                      f"SDPA {t['sdpa']:.1f} ({flop / t['sdpa'] / 1e6:.0f}); {t['sdpa'] / t['gluon']:.2f}x", flush=True)
        ga.DEFAULT_FORM, ga.STAGES = "stream", 4

# Sudoku's no-gradient call if q, k were rotated by the qkv matmul (Attention.ROPE_IN_QKV_SHORT)
from hrm_kernels import _gluon_rope_attention as gra  # noqa: E402
qkv = torch.randn(768, 82, 24, 64, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    ref = gra.rope_attention_forward(qkv, None, None)
    runs = {"short kernel": lambda: gra.rope_attention_forward(qkv, None, None), "sdpa": lambda: lib._composed(qkv, None, None)}
    for form in ga.FORMS:
        ga.DEFAULT_FORM = form
        got = ga.attention_forward(qkv)
        print(f"sudoku {form}: max |long - short kernel| {(got.float() - ref.float()).abs().max().item():.3g}", flush=True)
        runs[form] = (lambda f: lambda: (setattr(ga, "DEFAULT_FORM", f), ga.attention_forward(qkv))[1])(form)
    times = {k: [] for k in runs}
    for _ in range(5):
        for k, fn in runs.items():
            times[k].append(gpu_us(fn))
    print("sudoku 768 x 82 x 8 x 64, no rotation, GPU us: " + ", ".join(
        f"{k} {statistics.median(v):.1f}" for k, v in times.items()), flush=True)
    ga.DEFAULT_FORM = "stream"
    for q_slots in (2, 3):  # one key block an item: q loads have one iteration to land with 2 slots (197 KiB with 3)
        ga.Q_SLOTS = q_slots
        print(f"sudoku stream, {q_slots} q slots: {statistics.median([gpu_us(runs['stream']) for _ in range(5)]):.1f} us",
              flush=True)
    ga.Q_SLOTS = 2
