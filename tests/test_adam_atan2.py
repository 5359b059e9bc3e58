"""AdamATan2: the update against a float64 reference written here, resume through state_dict,
errors, skipped parameters, and the kernel's atan2 on its own.

Backends: ``eager`` (PyTorch ops) on CPU; ``triton`` on CPU through Triton's interpreter (with
small chunks so multi-chunk and tail paths run) and on CUDA when there is one.
"""

import io
import math
import re

import numpy as np
import pytest
import torch

from hrm_kernels import AdamATan2, use_backend
from hrm_kernels import adam_atan2 as mod
from hrm_kernels.backend import triton_interpreting
from tests.conftest import CUDA, DEVICE, requires_cuda

# (backend, device) combinations that can run here.
BACKENDS = [pytest.param(("eager", torch.device("cpu")), id="cpu-eager")]
if triton_interpreting():
    BACKENDS.append(pytest.param(("triton", torch.device("cpu")), id="cpu-interpreter"))
BACKENDS.append(pytest.param(("triton", torch.device("cuda")), id="cuda-triton", marks=requires_cuda))
if CUDA:
    BACKENDS.append(pytest.param(("eager", torch.device("cuda")), id="cuda-eager"))


@pytest.fixture(autouse=True)
def _small_chunks_in_interpreter(monkeypatch):
    """The interpreter costs ~30 ms per block of the kernel whatever its size, so it runs big
    blocks; with chunk = 2 blocks the (2500,) parameter still covers a chunk of two full blocks and
    a chunk holding only a masked tail."""
    if not CUDA:
        monkeypatch.setitem(mod.LAUNCH, "chunk", 2048)
        monkeypatch.setitem(mod.LAUNCH, "block", 1024)


# ------------------------------------------------------------------------ float64 reference


def reference_update(p, g, m, v, *, lr, beta1, beta2, weight_decay, step):
    """The update in float64, in place on float64 tensors (the docs/REFERENCE.md formula)."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    p.mul_(1 - lr * weight_decay)
    m.add_((1 - beta1) * (g - m))
    v.add_((1 - beta2) * (g * g - v))
    p.sub_((lr / bc1) * torch.atan2(m, v.sqrt() / math.sqrt(bc2)))


SHAPES = [(1,), (37,), (123, 7), (760,), (5, 3, 2), (2,), (2500,), (64, 9)]
GROUPS = [  # (lr scale, betas, weight decay, shapes)
    (1.0, (0.9, 0.999), 0.1, SHAPES[:4]),
    (3e-1, (0.8, 0.95), 0.0, SHAPES[4:6]),
    (2.0, (0.9, 0.99), 1.0, SHAPES[6:]),
]
BASE_LR, WARMUP = 1e-3, 10


def lr_at(step: int) -> float:
    """HRM-like schedule: linear warmup from 0, then cosine down to 10%."""
    if step < WARMUP:
        return BASE_LR * step / WARMUP
    return BASE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / 200)))


def make_problem(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, groups = [], []
    for scale, betas, wd, shapes in GROUPS:
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
        params += ps
        groups.append(dict(params=ps, betas=betas, weight_decay=wd, lr_scale=scale))
    # A transposed (non-contiguous) parameter takes the eager path inside the Triton backend.
    odd = torch.nn.Parameter(torch.randn(7, 13, generator=gen).to(device, dtype).t())
    groups[0]["params"].append(odd)
    params.append(odd)
    return params, groups


def grads_for(step: int, params, device):
    """Deterministic per step; parameter 1 only gets a gradient on even steps (its own step
    count falls behind, so one group has two step-count buckets), parameter 5 never."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (10.0 ** (i % 3 - 2))
        if i == 2:
            g[::3] = 0.0  # zero gradients: v stays 0 there at first, atan2(0, 0) = 0
        grads.append(None if i == 5 or (i == 1 and step % 2) else g.to(device, p.dtype))
    return grads


def make_optimizer(groups):
    opt = AdamATan2([dict(params=g["params"], betas=g["betas"], weight_decay=g["weight_decay"])
                     for g in groups], lr=0.0)
    for group, spec in zip(opt.param_groups, groups):
        group["lr_scale"] = spec["lr_scale"]
    return opt


def train(opt, params, steps, device, first=1):
    for step in range(first, first + steps):
        for group in opt.param_groups:  # HRM sets every group's lr before each step
            group["lr"] = lr_at(step - 1) * group["lr_scale"]
        for p, g in zip(params, grads_for(step, params, device)):
            p.grad = g
        opt.step()


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", BACKENDS)
def test_100_steps_match_float64_reference(case):
    backend, device = case
    params, groups = make_problem(device)
    ref = [dict(p=p.detach().double().cpu().clone(), m=torch.zeros(p.shape, dtype=torch.float64),
                v=torch.zeros(p.shape, dtype=torch.float64), step=0) for p in params]
    opt = make_optimizer(groups)
    group_of = {id(p): spec for spec in groups for p in spec["params"]}
    with use_backend(backend):
        for step in range(1, 101):
            grads = grads_for(step, params, device)
            for p, g, r in zip(params, grads, ref):
                p.grad = g
                if g is None:
                    continue
                spec = group_of[id(p)]
                r["step"] += 1
                reference_update(r["p"], g.double().cpu(), r["m"], r["v"],
                                 lr=lr_at(step - 1) * spec["lr_scale"], beta1=spec["betas"][0],
                                 beta2=spec["betas"][1], weight_decay=spec["weight_decay"],
                                 step=r["step"])
            for group in opt.param_groups:
                group["lr"] = lr_at(step - 1) * group["lr_scale"]
            opt.step()
    worst = 0.0
    for i, (p, r) in enumerate(zip(params, ref)):
        err = (p.detach().double().cpu() - r["p"]).abs().max().item()
        worst = max(worst, err)
        assert err <= 1e-5, f"param {i} {tuple(p.shape)}: max error {err:.2e} vs float64 > 1e-5"
        if r["step"]:
            state = opt.state[p]
            assert state["step"] == r["step"]
            assert (state["exp_avg"].double().cpu() - r["m"]).abs().max().item() <= 1e-6
            assert (state["exp_avg_sq"].double().cpu() - r["v"]).abs().max().item() <= 1e-6
    assert len(opt.state[params[5]]) == 0  # never had a gradient
    print(f"{backend}/{device.type}: max |p - p_float64| after 100 steps = {worst:.2e}")


@pytest.mark.parametrize("case", BACKENDS)
def test_resume_from_state_dict_is_bit_identical(case):
    backend, device = case
    half = 6 if (backend, device.type) == ("triton", "cpu") else 20  # the interpreter is slow
    with use_backend(backend):
        params, groups = make_problem(device)
        opt = make_optimizer(groups)
        train(opt, params, 2 * half, device)

        resumed_params, resumed_groups = make_problem(device)
        first = make_optimizer(resumed_groups)
        train(first, resumed_params, half, device)
        buf = io.BytesIO()
        torch.save({"model": [p.detach() for p in resumed_params], "optim": first.state_dict()}, buf)
        del first
        buf.seek(0)
        saved = torch.load(buf, map_location=device)

        fresh_params, fresh_groups = make_problem(device, seed=123)  # different values, overwritten
        for p, s in zip(fresh_params, saved["model"]):
            with torch.no_grad():
                p.copy_(s)
        second = make_optimizer(fresh_groups)
        second.load_state_dict(saved["optim"])
        train(second, fresh_params, half, device, first=half + 1)

    for i, (a, b) in enumerate(zip(params, fresh_params)):
        assert torch.equal(a, b), f"param {i}: resumed run differs from the uninterrupted one"
        sa, sb = opt.state[a], second.state[b]
        assert sa.keys() == sb.keys()
        if sa:
            assert sa["step"] == sb["step"]
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in second.param_groups]


@requires_cuda
def test_step_does_not_synchronize():
    """No host-device sync inside step(): not on the first step (state and tables built), not
    when gradients come back at new addresses (tables rebuilt), not on a cached step."""
    shapes = [(1,), (37,), (123, 7), (760,), (3000, 17)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    with use_backend("triton"):
        warm = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p in warm:
            p.grad = torch.randn_like(p)
        AdamATan2(warm).step()  # compiles the kernel (which may synchronise) before the check
        torch.cuda.synchronize()
        opt = AdamATan2(params, lr=0.0)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(4):
                opt.param_groups[0]["lr"] = 1e-3 * step
                if step < 3:
                    for p in params:
                        p.grad = torch.randn_like(p)
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.state[params[0]]["step"] == 4


@pytest.mark.parametrize("case", BACKENDS)
def test_found_inf_skips_the_update(case):
    """A nonzero ``found_inf`` leaves parameters and moments as they are (the trainer passes
    ``~isfinite(loss)`` so that a bad step needs no host check before the update); zero updates."""
    backend, device = case
    a = torch.nn.Parameter(torch.randn(37, device=device))
    b = torch.nn.Parameter(torch.randn(20, 6, device=device).t())  # non-contiguous: eager path
    opt = AdamATan2([a, b], lr=1e-2, weight_decay=0.5)
    with use_backend(backend):
        for p in (a, b):
            p.grad = torch.randn_like(p)
        opt.step()
        before = [t.detach().clone() for p in (a, b) for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
        for p in (a, b):
            p.grad = torch.full_like(p, float("nan"))
        opt.step(found_inf=torch.tensor(True, device=device))
        after = [t for p in (a, b) for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
        assert all(torch.equal(x, y) for x, y in zip(before, after))
        for p in (a, b):
            p.grad = torch.randn_like(p)
        opt.step(found_inf=torch.tensor(0.0, device=device))
    assert not torch.equal(a, before[0]) and not torch.equal(b, before[3])
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_bad_found_inf_is_refused_before_any_state_changes():
    """found_inf takes a one-element tensor: a bool or a longer tensor is refused with the fix, before
    a step count or moment exists (it used to fail inside the update, leaving the step counted)."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = AdamATan2([p], lr=1e-3)
    p.grad = torch.randn(10)
    for bad, shown in ((True, "got bool"), (torch.tensor([0.0, 1.0]), "got Tensor of shape (2,)")):
        with pytest.raises(TypeError, match=rf"found_inf must be a one-element tensor .*{re.escape(shown)}"):
            opt.step(found_inf=bad)
        assert not opt.state[p]
    opt.step(found_inf=torch.tensor([[0.0]]))
    assert opt.state[p]["step"] == 1


def test_loads_original_package_state_with_tensor_steps():
    """adam_atan2.AdamATan2 keeps ``step`` as a float32 tensor: accepted, converted at load."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = AdamATan2([p], lr=1e-3)
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(1.0)
    other = AdamATan2([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    other.load_state_dict(sd)
    assert next(iter(other.state.values()))["step"] == 1


@pytest.mark.parametrize("case", BACKENDS)
def test_params_without_grad_are_skipped(case):
    backend, device = case
    a = torch.nn.Parameter(torch.randn(33, device=device))
    b = torch.nn.Parameter(torch.randn(5, 4, device=device))
    opt = AdamATan2([a, b], lr=1e-2, weight_decay=0.5)
    with use_backend(backend):
        a.grad = torch.randn_like(a)
        b.grad = torch.randn_like(b)
        opt.step()
        m, v, b_before = opt.state[b]["exp_avg"].clone(), opt.state[b]["exp_avg_sq"].clone(), b.detach().clone()
        b.grad = None
        a.grad = torch.randn_like(a)
        opt.step()
    assert torch.equal(b, b_before), "a parameter without gradient changed (weight decay applied?)"
    assert opt.state[b]["step"] == 1 and opt.state[a]["step"] == 2
    assert torch.equal(opt.state[b]["exp_avg"], m) and torch.equal(opt.state[b]["exp_avg_sq"], v)


def test_one_launch_per_group(monkeypatch):
    """All parameters of a group (same dtype and step count) go through a single fused launch."""
    if not (CUDA or triton_interpreting()):
        pytest.skip("needs CUDA or the Triton interpreter")
    calls = []
    real = mod._launch_fused

    def counting(tables, device, dtype, ptrs, numels, *args, **kwargs):
        calls.append(len(numels))
        return real(tables, device, dtype, ptrs, numels, *args, **kwargs)

    monkeypatch.setattr(mod, "_launch_fused", counting)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(3,), (40, 5), (17,), (1,)]]
    opt = AdamATan2([dict(params=params[:3]), dict(params=params[3:], lr=0.0)], lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    with use_backend("triton"):
        opt.step()
    assert calls == [3, 1]


@pytest.mark.parametrize("dtype", [
    # The interpreter casts float32 -> bfloat16 by truncation (the GPU rounds to nearest even).
    pytest.param(torch.bfloat16, marks=requires_cuda), torch.float16])
def test_half_params_fp32_math(dtype):
    """bf16/fp16 parameters (and states): fp32 math in the kernel, stored back; compared with the
    eager path, which upcasts the same way."""
    if not (CUDA or triton_interpreting()):
        pytest.skip("needs CUDA or the Triton interpreter")
    shapes = [(37,), (123, 7), (1,)]
    fused = [torch.nn.Parameter(torch.randn(s, device=DEVICE).to(dtype)) for s in shapes]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt_f, opt_e = AdamATan2(fused, lr=1e-2), AdamATan2(eager, lr=1e-2)
    for _ in range(5):
        for pf, pe in zip(fused, eager):
            pf.grad = torch.randn_like(pf)
            pe.grad = pf.grad.clone()
        with use_backend("triton"):
            opt_f.step()
        with use_backend("eager"):
            opt_e.step()
    for pf, pe in zip(fused, eager):
        assert pf.dtype == dtype and opt_f.state[pf]["exp_avg"].dtype == dtype
        # Same fp32 math up to a few fp32 ulps (atan2), so at most one half-precision rounding step.
        ulp = torch.finfo(dtype).eps * pe.detach().float().abs().clamp_min(1e-3)
        assert ((pf.float() - pe.float()).abs() <= ulp).all()


def test_float64_params_on_cpu():
    p = torch.nn.Parameter(torch.randn(50, 3, dtype=torch.float64))
    ref = dict(p=p.detach().clone(), m=torch.zeros_like(p.detach()), v=torch.zeros_like(p.detach()))
    opt = AdamATan2([p], lr=3e-3, betas=(0.85, 0.98), weight_decay=0.2)
    for step in range(1, 21):
        p.grad = torch.randn_like(p)
        reference_update(ref["p"], p.grad, ref["m"], ref["v"], lr=3e-3, beta1=0.85, beta2=0.98,
                         weight_decay=0.2, step=step)
        opt.step()
    assert p.dtype == torch.float64
    assert (p.detach() - ref["p"]).abs().max().item() <= 1e-13


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.randn(4))
    opt = AdamATan2([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.state[p]["step"] == 1


# ----------------------------------------------------------------------------------- errors


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamATan2(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1e-3), ValueError, "learning rate"),
    (dict(lr=float("nan")), ValueError, "learning rate"),
    (dict(lr=torch.tensor(1e-3)), TypeError, "Python float"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta1"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta2"),
    (dict(betas=(0.9, 1.5)), ValueError, "beta2"),
    (dict(betas=0.9), ValueError, "pair"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_bad_hyperparameters_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamATan2([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_group_hyperparameters_are_refused():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = AdamATan2([p], lr=0.0)  # lr=0 is fine (HRM)
    with pytest.raises(ValueError, match="param group 1.*beta1"):
        opt.add_param_group(dict(params=[q], betas=(-0.5, 0.9)))
    opt.param_groups[0]["lr"] = -1.0  # set later, as a schedule would
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="param group 0.*learning rate"):
        opt.step()


# ------------------------------------------------------------------------------------ atan2


def _ulp_error(got: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ref = torch.atan2(y.double(), x.double())
    ulp = torch.from_numpy(np.spacing(np.abs(ref.float().numpy()))).double()
    return (got.double().cpu() - ref).abs() / ulp


def test_atan2_over_signs_and_magnitudes():
    if not (CUDA or triton_interpreting()):
        pytest.skip("needs CUDA or the Triton interpreter")
    mags = torch.tensor([0.0, 1e-45, 1e-40, 1.17e-38, 1e-30, 1e-10, 1e-3, 0.3, 0.41421356, 0.5,
                         0.999, 1.0, 1.001, 2.0, 2.4142136, 7.5, 1e3, 1e10, 1e30, 3.4e38])
    rand = torch.rand(150) * 10.0 ** torch.randint(-38, 38, (150,)).float()
    vals = torch.cat([mags, -mags, rand, -rand[:75]])
    y, x = (t.flatten() for t in torch.meshgrid(vals, vals, indexing="ij"))
    got = mod.atan2(y.to(DEVICE), x.to(DEVICE)).cpu()
    err = _ulp_error(got, y, x)
    assert err.max().item() <= 2.0, f"max error {err.max().item():.2f} ulp at y={y[err.argmax()]}, x={x[err.argmax()]}"
    want = torch.atan2(y, x)
    ulp = torch.from_numpy(np.spacing(np.abs(want.numpy()))).double()
    vs_torch = ((got.double() - want.double()).abs() / ulp).max().item()
    assert vs_torch <= 3.0, f"{vs_torch:.2f} float32 ulps from torch.atan2"
    assert torch.equal(torch.signbit(got), torch.signbit(want)), "sign (incl. -0) differs"


def test_atan2_dense_ratios_and_specials():
    if not (CUDA or triton_interpreting()):
        pytest.skip("needs CUDA or the Triton interpreter")
    # Dense in the ratio |y|/|x| over [0, inf) at several scales, every quadrant.
    r = torch.cat([torch.linspace(0, 1, 4001), 1 / torch.linspace(1e-4, 1, 4001)])
    scale = 10.0 ** torch.randint(-30, 30, r.shape).float()
    signs = torch.randint(0, 2, (2,) + r.shape).float() * 2 - 1
    y, x = signs[0] * r * scale, signs[1] * scale
    err = _ulp_error(mod.atan2(y.to(DEVICE), x.to(DEVICE)).cpu(), y, x)
    assert err.max().item() <= 2.0, f"max error {err.max().item():.2f} ulp"

    inf, nan = float("inf"), float("nan")
    ys = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 3e-39, inf, -inf, inf, 1.0, nan, 0.0])
    xs = torch.tensor([0.0, 0.0, -0.0, -0.0, 0.0, 0.0, 0.0, inf, -inf, 1.0, -inf, 1.0, nan])
    got, want = mod.atan2(ys.to(DEVICE), xs.to(DEVICE)).cpu(), torch.atan2(ys, xs)
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))
    exact = ok & ~(ys.isinf() & xs.isinf())  # 0, +-pi/2, +-pi come from constants: exact
    assert torch.equal(got[exact], want[exact]), f"{got} vs {want}"
    assert _ulp_error(got[~exact & ok], ys[~exact & ok], xs[~exact & ok]).max() <= 1.0  # +-pi/4, +-3pi/4
