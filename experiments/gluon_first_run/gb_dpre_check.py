"""Session 29's check of the gated blend's Gluon backward (first run in session 30): the Gluon d_pre1 kernel
against the library's Triton d_pre1 kernel and float64, then GPU time against it (medians of 5 alternating
rounds), then the whole backward with Gluon d_pre1 + Triton phase 2 and with both phases Triton (session 30
also timed a Gluon phase 2, removed in session 31 as slower: see hrm_kernels/_gluon_gated_blend.py).
    python3 experiments/gluon_first_run/gb_dpre_check.py      (from the repository root, PYTHONPATH=.)"""
import statistics, sys; sys.path.insert(0, "."); sys.path.insert(0, "experiments/gluon_first_run")
import torch
from benchmarks.common import environment, gpu_us
import hrm_kernels.gated_blend  # noqa: F401
lib = sys.modules["hrm_kernels.gated_blend"]
from hrm_kernels import _gluon_gated_blend as gb_dpre  # (the library copy of gb_dpre.py)

lib.USE_GLUON_DPRE = False  # the module's launchers run the Triton kernels here

print(environment(), flush=True)


def inputs(m, d, r, dt, inj, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s, scale=1.0, t=dt: (torch.randn(*s, device="cuda", generator=g) * scale).to(t)  # noqa: E731
    own, other = mk(m, d), mk(m, d)
    inj_t = mk(m, d) if inj else None
    w1, b1 = mk(r, 3 * d, scale=(3 * d) ** -0.5), mk(r, scale=0.1, t=torch.float32)
    w2, b2 = mk(3 * d, r, scale=2.5 * r ** -0.5), mk(3 * d, t=torch.float32)
    return own, other, inj_t, w1, b1, w2, b2, mk(m, d)


def dpre64(own, other, inj, w1, b1, w2, b2, dout):
    """d(loss)/d(pre1) and db1 in float64 by autograd through the reference's math, loss = <out, dout>."""
    a = [t.double() if t is not None else None for t in (own, other, inj)]
    pre = (torch.cat([t if t is not None else torch.zeros_like(a[0]) for t in a], -1) @ w1.double().t()
           + b1.to(w1.dtype).double()).detach().requires_grad_()
    g = torch.sigmoid(torch.nn.functional.silu(pre) @ w2.double().t() + b2.to(w2.dtype).double())
    d = own.shape[1]
    out = sum(g[:, k * d:(k + 1) * d] * t for k, t in enumerate(a) if t is not None)
    (dpre,) = torch.autograd.grad((out * dout.double()).sum(), pre)
    return dpre, dpre.sum(0)


failures = 0
for (m, d, r) in ((62976, 512, 128), (1000, 512, 128), (37, 64, 64), (333, 192, 128), (130, 128, 64)):
    for inj in (True, False):
        a = inputs(m, d, r, torch.bfloat16, inj)
        own, other, inj_t, w1, b1, w2, b2, dout = a
        _, _, pre1, z = lib.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, with_stats=False, store_hidden=True)
        cfg = lib._launch_configs(m, d, r, own.device, own.dtype, w1.dtype)
        ref, ref_db1 = lib._backward_dpre(cfg["dpre"], lib._gate_flags(own.dtype), dout, None, own, other, inj_t, w2, b2,
                                          pre1, z)
        got, got_db1 = gb_dpre.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z)
        few, few_db1 = gb_dpre.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z, programs=3)
        torch.cuda.synchronize()
        want, want_db1 = dpre64(own, other, inj_t, w1, b1, w2, b2, dout)
        err, err_ref = ((x.double() - want).abs().max().item() for x in (got, ref))
        db1, db1_ref = ((x.double().sum(0) - want_db1).abs().max().item() for x in (got_db1, ref_db1))
        ok = (err <= 2 * err_ref + 1e-6 and db1 <= 2 * db1_ref + 1e-3 and torch.equal(few, got)
              and torch.isfinite(got).all().item())
        failures += not ok
        print(f"{'ok' if ok else 'FAILED'} M={m} D={d} R={r} inj={inj}: dpre max error vs float64 {err:.3g} (Triton "
              f"{err_ref:.3g}), db1 {db1:.3g} (Triton {db1_ref:.3g}), 3 programs bit-equal {torch.equal(few, got)}",
              flush=True)
print(f"correctness: {failures} failures", flush=True)

for name, (m, d, r) in (("sudoku", (768 * 82, 512, 128)), ("arc", (96 * 901, 512, 128))):
    for inj in (True, False):
        own, other, inj_t, w1, b1, w2, b2, dout = inputs(m, d, r, torch.bfloat16, inj)
        _, _, pre1, z = lib.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, with_stats=False, store_hidden=True)
        cfg = lib._launch_configs(m, d, r, own.device, own.dtype, w1.dtype)
        flags = lib._gate_flags(own.dtype)
        tri = lambda: lib._backward_dpre(cfg["dpre"], flags, dout, None, own, other, inj_t, w2, b2, pre1, z)  # noqa: E731
        glu = lambda: gb_dpre.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z)  # noqa: E731
        times = {"triton": [], "gluon": []}
        for _ in range(5):
            times["triton"].append(gpu_us(tri))
            times["gluon"].append(gpu_us(glu))
        t_tri, t_glu = (statistics.median(times[k]) for k in ("triton", "gluon"))
        kinds = 3 if inj else 2
        flops = 2 * 2 * m * kinds * d * r
        print(f"{name} inj={inj}: d_pre1 Triton {t_tri:.1f} us, Gluon {t_glu:.1f} us ({t_tri / t_glu:.2f}x); Gluon "
              f"{flops / t_glu / 1e6:.0f} TFLOP/s", flush=True)

# the whole backward (both kernels and the host sums), Gluon d_pre1 against Triton, and fwd+bwd through autograd
for name, (m, d, r) in (("sudoku", (768 * 82, 512, 128)), ("arc", (96 * 901, 512, 128))):
    for inj in (True, False):
        own, other, inj_t, w1, b1, w2, b2, dout = inputs(m, d, r, torch.bfloat16, inj)
        _, _, pre1, z = lib.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, with_stats=False, store_hidden=True)
        bwd = lambda: lib.gated_blend_backward(dout, None, own, other, inj_t, w1, b1, w2, b2, pre1, z)  # noqa: E731
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (own, other, inj_t, w1, b1, w2, b2)]

        def fwd_bwd():
            out = lib.gated_blend(*leaves)
            torch.autograd.grad(out, [t for t in leaves if t is not None], dout)

        lib.USE_GLUON_DPRE = True
        got = bwd()
        lib.USE_GLUON_DPRE = False
        ref = bwd()
        diffs = " ".join(f"{(a.float() - b.float()).abs().max().item():.3g}" for a, b in zip(got, ref) if a.numel())
        routes = {"triton": False, "dpre": True}
        times = {k: [] for route in routes for k in (route, "fb_" + route)}
        for _ in range(5):
            for key, dpre in routes.items():
                lib.USE_GLUON_DPRE = dpre
                times[key].append(gpu_us(bwd))
                times["fb_" + key].append(gpu_us(fwd_bwd))
        lib.USE_GLUON_DPRE = False  # the Triton kernels again for the next case's d_pre1 check
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} inj={inj}: backward Gluon d_pre1 + Triton phase 2 {t['dpre']:.1f} us, "
              f"Triton {t['triton']:.1f} ({t['triton'] / t['dpre']:.2f}x); fwd+bwd {t['fb_dpre']:.1f} / "
              f"{t['fb_triton']:.1f} us; max diffs Gluon-Triton per gradient: {diffs}", flush=True)
