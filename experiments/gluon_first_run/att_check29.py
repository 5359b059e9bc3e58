"""Session 29 check for the next GPU session (branch gluon-rope-attention): the Gluon no-gradient
rope_attention forward against the Triton kernel and cuDNN (SDPA on pre-rotated q, k), GPU us, medians
of 5 alternating rounds, at HRM's Sudoku call (768 x 82 x 8 heads x 64, bf16, half tables).
    PYTHONPATH=. python3 experiments/gluon_first_run/att_check29.py"""
import statistics, sys; sys.path.insert(0, ".")
import torch
import torch.nn.functional as F
from benchmarks.common import environment, gpu_us
from hrm_kernels import first_halves, rope_qkv
import hrm_kernels.rope_attention  # noqa: F401
lib = sys.modules["hrm_kernels.rope_attention"]
from hrm_kernels import _gluon_rope_attention as gra

lib.USE_GLUON = lib.USE_GLUON_BACKWARD = False  # the module's launchers run the Triton kernels here

print(environment(), flush=True)
b, s, h, d = 768, 82, 8, 64
inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
ang = torch.outer(torch.arange(s + 1, dtype=torch.float32), inv)
ang = torch.cat((ang, ang), -1).cuda()
cos, sin = first_halves(ang.cos(), ang.sin())
for dtype in (torch.bfloat16, torch.float16):
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    with torch.no_grad():
        tri = lambda: lib._launch(qkv, cos, sin)  # noqa: E731
        glu = lambda: gra.rope_attention_forward(qkv, cos, sin)  # noqa: E731
        q, k, v = rope_qkv(qkv, cos, sin)

        def cudnn():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        ref, got = tri(), glu()
        torch.cuda.synchronize()
        print(f"{dtype}: max |Gluon - Triton| {(got.float() - ref.float()).abs().max().item():.3g}, "
              f"finite {torch.isfinite(got).all().item()}", flush=True)
        times = {"triton": [], "gluon": [], "cudnn": []}
        for _ in range(5):
            times["triton"].append(gpu_us(tri))
            times["gluon"].append(gpu_us(glu))
            times["cudnn"].append(gpu_us(cudnn))
        t = {k: statistics.median(v) for k, v in times.items()}
        traffic = (3 + 1) * b * s * h * d * 2
        print(f"{dtype}: Gluon {t['gluon']:.1f} us ({traffic / t['gluon'] / 1e6:.2f} TB/s), Triton {t['triton']:.1f}, "
              f"cuDNN on pre-rotated q, k {t['cudnn']:.1f} (Gluon vs Triton {t['triton'] / t['gluon']:.2f}x)", flush=True)

# the backward: Gluon against Triton, from the same saved tensors (the Gluon forward's out and lse)
for dtype in (torch.bfloat16,):
    qkv = torch.randn(b, s, 3 * h, d, device="cuda", dtype=dtype)
    out, lse = gra.rope_attention_forward(qkv, cos, sin, with_lse=True)
    dout = torch.randn_like(out)
    tri = lambda: lib._backward_launch(qkv, cos, sin, out, lse, dout)  # noqa: E731
    glu = lambda: gra.rope_attention_backward(qkv, cos, sin, out, lse, dout)  # noqa: E731
    ref, got = tri(), glu()
    torch.cuda.synchronize()
    print(f"backward {dtype}: max |Gluon - Triton| {(got.float() - ref.float()).abs().max().item():.3g} "
          f"(max |Triton| {ref.float().abs().max().item():.3g}), finite {torch.isfinite(got).all().item()}", flush=True)
    times = {"triton": [], "gluon": []}
    for _ in range(5):
        times["triton"].append(gpu_us(tri))
        times["gluon"].append(gpu_us(glu))
    t = {k: statistics.median(v) for k, v in times.items()}
    traffic = (3 + 1 + 1 + 3) * b * s * h * d * 2  # qkv, out, dout read; dqkv written
    print(f"backward {dtype}: Gluon {t['gluon']:.1f} us ({traffic / t['gluon'] / 1e6:.2f} TB/s), Triton "
          f"{t['triton']:.1f} ({t['triton'] / t['gluon']:.2f}x)", flush=True)
