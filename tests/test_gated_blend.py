"""Gate MLP + sigmoid blend: outputs, all seven gradients and the stats against float64, both
backends, inj=None, mixed weight/activation dtypes, 1-D..4-D and odd shapes, compile, errors."""

import importlib
import math

import pytest
import torch

from hrm_kernels import use_backend
from hrm_kernels.gated_blend import STATS_COLUMNS, gate_logits_reference, gated_blend, gated_blend_reference
from tests.conftest import CUDA, DEVICE, record_calls, requires_cuda
from tests.tolerance import assert_close_to_reference
from tests.reference64 import assert_float32_math

gb = importlib.import_module("hrm_kernels.gated_blend")  # the module (the package exports the function)

NAMES = ("own", "other", "inj", "w1", "b1", "w2", "b2")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: the interpreter multiplies in fp32
# (activation shape [..., D], R): 1-D to 4-D, D=40/R=10 (the odd pair), widths below 16
SHAPES = [((40,), 10), ((5, 40), 10), ((3, 7, 40), 10), ((2, 3, 5, 24), 33), ((37, 5), 3)]


def _make(shape, r, dtype, wdtype=None, device=DEVICE, inj=True):
    """Inputs scaled so that gate logits spread over about +-4: some gates saturate."""
    wdtype = wdtype or dtype
    d = shape[-1]
    src = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3 if inj else 2)]
    w1 = torch.randn(r, 3 * d, device=device) / (3 * d) ** 0.5
    b1 = 0.1 * torch.randn(r, device=device)
    w2 = 2.5 * torch.randn(3 * d, r, device=device) / r ** 0.5
    b2 = torch.randn(3 * d, device=device)
    weights = [t.to(wdtype) for t in (w1, b1, w2, b2)]
    return src + ([] if inj else [None]) + weights


def _run(fn, inputs, dout, sat_weight=None, stats=False):
    """Forward (+ stats with their saturation column when sat_weight is given, + the four monitoring
    columns alone with ``stats``) and backward of <out, dout> (+ <saturation, sat_weight>); returns
    (out, stats or None, [grad of each input or None])."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    if sat_weight is not None:
        out, stats = fn(*leaves, stats=True, saturation=True)
        loss = (out * dout).sum() + (stats[:, 4] * sat_weight).sum()
    elif stats:
        out, stats = fn(*leaves, stats=True)
        assert stats.shape == (3, 4)
        loss = (out * dout).sum()
    else:
        out, stats = fn(*leaves), None
        loss = (out * dout).sum()
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, live))
    return out.detach(), (stats.detach() if stats is not None else None), [
        next(grads) if t is not None else None for t in leaves]


def _to64(inputs):
    return [t.double() if t is not None else None for t in inputs]


def _logits64(own, other, inj, w1, b1, w2, b2):
    """The gate logits written out here from the op's math, not by the module's reference:
    z = W2 silu(W1 [own|other|inj] + b1) + b2 in float64, [..., 3D] (inj None: zeros)."""
    own, other, inj, w1, b1, w2, b2 = [t.double() if t is not None else None for t in (own, other, inj, w1, b1, w2, b2)]
    x = torch.cat((own, other, inj if inj is not None else torch.zeros_like(own)), dim=-1)
    pre = x @ w1.T + b1
    return (pre * torch.sigmoid(pre)) @ w2.T + b2


def _gated_blend64(own, other, inj, w1, b1, w2, b2, stats=False, saturation=False):
    """``gated_blend`` in float64 from its definition: g = sigmoid(z), out = sum_k g_k * src_k;
    stats per kind k (row 2 zeros without inj): mean g_k, fraction of g_k below 0.1 and above
    0.9, mean |g_k src_k|, mean relu(|z_k| - ln 9)^2."""
    z = _logits64(own, other, inj, w1, b1, w2, b2)
    g = torch.sigmoid(z)
    d = own.shape[-1]
    sources = [t.double() if t is not None else None for t in (own, other, inj)]
    out = sum(g[..., k * d:(k + 1) * d] * src for k, src in enumerate(sources) if src is not None)
    if not stats:
        return out
    rows = []
    for k, src in enumerate(sources):
        if src is None:
            rows.append(torch.zeros(5, dtype=torch.float64, device=own.device))
            continue
        gk, zk = g[..., k * d:(k + 1) * d], z[..., k * d:(k + 1) * d]
        rows.append(torch.stack((gk.mean(), (gk < 0.1).double().mean(), (gk > 0.9).double().mean(),
                                 (gk * src).abs().mean(), torch.relu(zk.abs() - math.log(9.0)).square().mean())))
    return out, torch.stack(rows)[:, :5 if saturation else 4]


def _check(backend, inputs, with_stats=False, saturation=True):
    """The kernel (backend) vs eager at the same precision vs float64, on outputs, every gradient
    (in its input's dtype) and the stats (with the saturation column and a gradient through it,
    unless ``saturation=False``)."""
    own = inputs[0]
    dout = torch.randn_like(own)
    sat_w = torch.randn(3, device=own.device) if with_stats and saturation else None
    monitor = with_stats and not saturation
    with use_backend(backend):
        got = _run(gated_blend, inputs, dout, sat_w, monitor)
    eager = _run(gated_blend_reference, inputs, dout, sat_w, monitor)
    ref = _run(_gated_blend64, _to64(inputs), dout.double(), sat_w.double() if sat_w is not None else None,
               monitor)
    tag = f"{backend} {own.dtype} {tuple(own.shape)}"
    assert got[0].dtype == own.dtype
    assert_close_to_reference(f"{tag} out", got[0], eager[0], ref[0])
    if all(t is None or t.dtype == torch.float32 for t in inputs):  # the reference's own math, tightly
        assert_float32_math(f"{tag} eager out", eager[0], ref[0])
        for name, e, r in zip(NAMES, eager[2], ref[2]):
            if e is not None:
                assert_float32_math(f"{tag} eager d{name}", e, r)
    for name, inp, g, e, r in zip(NAMES, inputs, got[2], eager[2], ref[2]):
        if inp is None:
            assert g is None
            continue
        assert g.dtype == inp.dtype, f"{tag} d{name}: dtype {g.dtype} != {inp.dtype}"
        # (weight gradients too: eager's error already holds its sum over the same rows; the
        # kernels' stayed within 1.7x of it from 64 to 4096 rows, both backward paths, interpreter)
        assert_close_to_reference(f"{tag} d{name}", g, e, r)
    if with_stats:
        _check_stats(tag, got[1], eager[1], ref[1], inputs)
    return got


def _stat_terms(logits, src):
    """Per-element terms whose means are the stats columns mean, contribution, saturation."""
    g = torch.sigmoid(logits)
    return g, (g * src).abs(), torch.relu(logits.abs() - math.log(9.0)).square()


def _check_stats(tag, got, eager, ref64, inputs):
    """``got`` [3, 5] or [3, 4] against ``ref64`` (``_gated_blend64``'s stats), each column within
    what the same-precision eager logits' elementwise error allows."""
    assert got.shape == ref64.shape == eager.shape and got.shape[1] in (4, 5) and got.dtype == torch.float32
    has_inj = inputs[2] is not None
    d = inputs[0].shape[-1]
    x64 = _to64(inputs)
    logits = _logits64(*inputs).reshape(-1, 3, d).transpose(0, 1)  # [3, M, D]
    eager_logits = gate_logits_reference(*inputs).double().reshape(-1, 3, d).transpose(0, 1)
    gates = torch.sigmoid(logits)
    gate_err = (torch.sigmoid(eager_logits) - gates).abs().max().item()
    for k in range(3):
        if k == 2 and not has_inj:
            assert torch.equal(got[k], torch.zeros_like(got[k])), f"{tag}: inj stats must be zero"
            continue
        g, srcf, want = gates[k], x64[k].reshape(gates[k].shape), ref64[k]
        terms = _stat_terms(logits[k], srcf)
        eager_terms = _stat_terms(eager_logits[k], srcf)
        # A mean's error is at most the mean elementwise error; eager's own can cancel by luck,
        # so the bound uses the mean of eager's elementwise errors.
        for c, t, te in zip((0, 3, 4)[:got.shape[1] - 2], terms, eager_terms):
            err = abs(got[k, c].item() - want[c].item())
            bound = 3.0 * (te - t).abs().mean().item() + 1e-6 * max(1.0, abs(want[c].item()))
            assert err <= bound, f"{tag} stats[{k}, {STATS_COLUMNS[c]}]: error {err:.3e} > {bound:.3e}"
        # a fraction may differ by the gates that lie within rounding distance of the threshold
        near = 4 * gate_err + 1e-6
        for c, t in ((1, 0.1), (2, 0.9)):
            allowed = ((g - t).abs() <= near).double().mean().item() + 1e-7
            err = abs(got[k, c].item() - want[c].item())
            assert err <= allowed, f"{tag} stats[{k}, {STATS_COLUMNS[c]}]: {err} > {allowed}"


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", SHAPES, ids=str)
def test_matches_float64(backend, dtype, shape, r):
    _check(backend, _make(shape, r, dtype))


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
def test_stats_and_saturation_gradient(backend, dtype, inj):
    """stats=True: the stats vs gates materialised in float64, and a gradient given to the
    saturation column flows into every input, as eager autograd says."""
    _check(backend, _make((3, 11, 40), 10, dtype, inj=inj), with_stats=True)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
def test_stats_without_saturation(monkeypatch, backend, dtype, inj):
    """stats=True alone: the four monitoring columns against float64, not differentiable, the
    kernel built without the saturation term (WITH_SAT off), and bit for bit the first four columns
    of a saturation=True call (the same sums in the same order)."""
    inputs = _make((3, 11, 123), 10, dtype, inj=inj)
    calls = _spy_launches(monkeypatch)
    _check(backend, inputs, with_stats=True, saturation=False)
    if backend == "triton":
        assert [kw["WITH_SAT"] for _, kw in calls if "WITH_SAT" in kw] == [False]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with use_backend(backend):
        out, four = gated_blend(*leaves, stats=True)
        _, five = gated_blend(*leaves, stats=True, saturation=True)
    assert out.requires_grad and not four.requires_grad and five.requires_grad  # monitoring values only
    assert four.shape == (3, 4) and five.shape == (3, 5)
    assert torch.equal(four, five[:, :4])
    with pytest.raises(ValueError, match="saturation=True .* pass stats=True"):
        gated_blend(*inputs, saturation=True)


def _spy_launches(monkeypatch) -> list:
    """(kernel, launch keyword arguments) of each kernel launch of the module, recorded."""
    return record_calls(monkeypatch, gb, "launch", with_kwargs=True)


def _forward_launches(calls) -> dict:
    named = ((kernel.fn.__name__, kw) for kernel, kw in calls)
    return {name: kw for name, kw in named if name.startswith("_gated_blend_") and "backward" not in name}


@pytest.mark.parametrize("fuse", [True, False], ids=["one_kernel", "hidden_kernel_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("d", [123, 128])
def test_forward_paths(monkeypatch, fuse, dtype, inj, d):
    """Both forwards (the hidden GEMM inside the blend kernel, or a kernel of its own first), stats
    included, at a width of several D-chunks: 123 leaves a ragged last chunk (stats mask its
    columns), 128 does not (EVEN_D: no column masks)."""
    monkeypatch.setattr(gb, "_config_override", {"fwd": {"FUSE_HIDDEN": fuse}, "fwd_stats": {"FUSE_HIDDEN": fuse}})
    calls = _spy_launches(monkeypatch)
    _check("triton", _make((37, d), 10, dtype, inj=inj), with_stats=True)
    launched = _forward_launches(calls)
    assert launched["_gated_blend_forward_kernel"]["WITH_SAT"]
    assert ("_gated_blend_hidden_kernel" in launched) == (not fuse)
    blend = launched["_gated_blend_forward_kernel"]
    assert blend["FUSE_HIDDEN"] == fuse and blend["WITH_STATS"]
    assert blend["EVEN_D"] == (d % blend["BLOCK_D"] == 0) and blend["BLOCK_D"] < d


@pytest.mark.parametrize("fuse", [True, False], ids=["one_kernel", "hidden_kernel_first"])
def test_no_grad_forward_skips_hidden_store(monkeypatch, fuse):
    """Calls no backward follows (no_grad, inference_mode, inputs that need no gradient) skip
    autograd and ask the launcher not to store the gate MLP's hidden activations (the one-kernel
    forward then never writes them); the output and stats are the with-gradient call's, bit for
    bit. A gradient wanted by one weight only, or forward-mode AD, takes the autograd path."""
    monkeypatch.setattr(gb, "_config_override", {"fwd": {"FUSE_HIDDEN": fuse}, "fwd_stats": {"FUSE_HIDDEN": fuse}})
    stores = []
    forward = gb.gated_blend_forward

    def spy(*args, store_hidden=True, **kw):
        stores.append(store_hidden)
        res = forward(*args, store_hidden=store_hidden, **kw)
        assert res[2].shape == res[3].shape == ((35, 10) if store_hidden else (0, 10))
        return res

    monkeypatch.setattr(gb, "gated_blend_forward", spy)
    calls = _spy_launches(monkeypatch)
    inputs = _make((5, 7, 123), 10, torch.float16)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with use_backend("triton"):
        out, stats = gated_blend(*leaves, stats=True)
        out_grad = gated_blend(*leaves)  # without stats: the launch configuration may differ
        assert out.requires_grad and stores == [True, True]
        with torch.no_grad():
            out_ng, stats_ng = gated_blend(*inputs, stats=True)
        with torch.inference_mode():
            out_inf = gated_blend(*inputs)
        out_plain = gated_blend(*inputs)  # nothing requires grad
        assert stores == [True, True, False, False, False] and not out_ng.requires_grad
        assert [kw["STORE_HIDDEN"] for _, kw in calls if "STORE_HIDDEN" in kw] == [True, True] + [not fuse] * 3
        w2_only = [t.detach().requires_grad_(i == 5) if t is not None else None for i, t in enumerate(inputs)]
        (gated_blend(*w2_only) * torch.randn_like(inputs[0])).sum().backward()
        assert stores[-1] and w2_only[5].grad is not None and w2_only[0].grad is None
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(inputs[0], torch.randn_like(inputs[0]))
            with pytest.raises(NotImplementedError):  # a tangent is never dropped silently
                gated_blend(dual, *inputs[1:])
    assert torch.equal(out_ng, out.detach()) and torch.equal(stats_ng, stats.detach())
    assert torch.equal(out_inf, out_grad.detach()) and torch.equal(out_plain, out_grad.detach())


def test_stats_gradient_only_where_it_flows(monkeypatch):
    """Stats that are only logged, saturation column included, leave the backward without its
    saturation term (autograd hands the op None for them, not zeros); a gradient reaching the
    stats alone (none through the output) gives the reference's gradients."""
    calls = _spy_launches(monkeypatch)
    inputs = _make((4, 9, 40), 10, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with use_backend("triton"):
        out, stats = gated_blend(*leaves, stats=True, saturation=True)
        out.sum().backward()
        assert [kw["HAS_SAT"] for _, kw in calls if "HAS_SAT" in kw] == [False, False]
        calls.clear()
        got = torch.autograd.grad(gated_blend(*leaves, stats=True, saturation=True)[1][:, 4].sum(), leaves)
        assert [kw["HAS_SAT"] for _, kw in calls if "HAS_SAT" in kw] == [True, True]
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(_gated_blend64(*ref64, stats=True, saturation=True)[1][:, 4].sum(), ref64)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weights_low_precision_activations(backend, act):
    got = _check(backend, _make((6, 40), 10, act, wdtype=torch.float32), with_stats=True)
    assert [g.dtype for g in got[2][3:]] == [torch.float32] * 4


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inj_none_equals_zeros(backend, dtype):
    inputs = _make((4, 9, 40), 10, dtype)
    inputs[2] = torch.zeros_like(inputs[0])
    dout = torch.randn_like(inputs[0])
    with use_backend(backend):
        zeros = _run(gated_blend, inputs, dout)
        none = _run(gated_blend, inputs[:2] + [None] + inputs[3:], dout)
    torch.testing.assert_close(none[0], zeros[0], rtol=0, atol=0)
    d = inputs[0].shape[-1]
    assert none[2][2] is None
    for name, a, b in zip(NAMES, none[2], zeros[2]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"d{name}")
    # the injection's slices of the gate weights get exactly zero gradient
    assert torch.equal(none[2][3][:, 2 * d:], torch.zeros_like(none[2][3][:, 2 * d:]))
    assert torch.equal(none[2][5][2 * d:], torch.zeros_like(none[2][5][2 * d:]))
    assert torch.equal(none[2][6][2 * d:], torch.zeros_like(none[2][6][2 * d:]))


@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits, parts", [(1, 1), (3, 37), (16, 16), (19, 5), (2, 600)])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_weight_grads_sum_the_partials(monkeypatch, fused, inj, wdtype, splits, parts):
    """``_weight_grads`` (its one kernel, and its torch form): each weight gradient the sum of its
    partials over the leading axis (against float64, within the rounding of one fp32 sum and the
    weights' dtype), the injection's slices exact zeros without inj; split and part counts below,
    at and above one load's chunk (16 in the interpreter; db1's 512 on CUDA)."""
    d, r = 37, 10
    width = (3 if inj else 2) * d
    w1, b1, w2, b2 = (torch.empty(shape, dtype=wdtype, device=DEVICE) for shape in ((r, 3 * d), r, (3 * d, r), 3 * d))
    dw1_p, dw2_p = torch.randn(splits, r, width), torch.randn(splits, width, r)
    db2_p, db1_p = torch.randn(splits, width), torch.randn(parts, r)
    monkeypatch.setattr(gb, "FUSED_WEIGHT_SUMS", fused)
    got = gb._weight_grads(w1, b1, w2, b2, *[t.to(DEVICE) for t in (db1_p, dw1_p, dw2_p, db2_p)])
    pad = 3 * d - width
    want = [torch.cat((dw1_p.double().sum(0), torch.zeros(r, pad, dtype=torch.float64)), 1),
            db1_p.double().sum(0),
            torch.cat((dw2_p.double().sum(0), torch.zeros(pad, r, dtype=torch.float64))),
            torch.cat((db2_p.double().sum(0), torch.zeros(pad, dtype=torch.float64)))]
    for name, g, w, count in zip(("dw1", "db1", "dw2", "db2"), got, want, (splits, parts, splits, splits)):
        assert g.dtype == wdtype and g.shape == w.shape, name
        # fp32 sums of `count` standard normals: error ~ count * 2^-24 * |partial| (bounded by 8);
        # then the cast to bf16: half an ulp (2^-8 relative) on the GPU, a whole one in the
        # interpreter (its cast truncates)
        tol = count * 8 * 2.0 ** -24 + (0 if wdtype == torch.float32 else 2.0 ** -7) * w.abs()
        assert ((g.cpu().double() - w).abs() <= tol).all(), name
    if not inj:
        assert not got[0][:, 2 * d:].any() and not got[2][2 * d:].any() and not got[3][2 * d:].any()


@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32], ids=str)
def test_fused_weight_sums_in_the_op(monkeypatch, inj, wdtype):
    """The op with ``FUSED_WEIGHT_SUMS`` on (off by default until its first GPU run): outputs and
    every gradient as ``_check`` bounds them, the weights' through the kernel, not the torch form."""
    monkeypatch.setattr(gb, "FUSED_WEIGHT_SUMS", True)
    sums = record_calls(monkeypatch, gb, "_weight_grads")
    torch_form = record_calls(monkeypatch, gb, "_weight_grads_torch")
    _check("triton", _make((3, 7, 40), 10, torch.float16, wdtype, inj=inj))
    assert len(sums) == 1 and not torch_form


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_non_contiguous_inputs(backend):
    d, r = 37, 10
    own = torch.randn(9, 2 * d, device=DEVICE)[:, ::2]  # strided last dimension
    other = torch.randn(d, 9, device=DEVICE).t()  # transposed
    inj = torch.randn(9, d + 5, device=DEVICE)[:, 5:]  # row stride wider than D
    w1 = torch.randn(3 * d, r, device=DEVICE).t() / 6  # transposed weight
    inputs = [own, other, inj, w1, torch.randn(r, device=DEVICE), torch.randn(3 * d, r, device=DEVICE),
              torch.randn(3 * d, device=DEVICE)]
    _check(backend, inputs)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_empty_rows(backend):
    inputs = [t.requires_grad_() for t in _make((0, 3, 40), 10, torch.float32)]
    with use_backend(backend):
        out = gated_blend(*inputs)
        out.sum().backward()
    assert out.shape == (0, 3, 40)
    assert inputs[0].grad.shape == inputs[0].shape
    for t in inputs[3:]:
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_returns():
    inputs = _make((2, 40), 10, torch.float32)
    for backend in ("eager", "triton"):
        with use_backend(backend):
            assert isinstance(gated_blend(*inputs), torch.Tensor)
            out, stats = gated_blend(*inputs, stats=True)
            assert out.shape == (2, 40) and stats.shape == (3, 4) and stats.dtype == torch.float32
            _, stats = gated_blend(*inputs, stats=True, saturation=True)
            assert stats.shape == (3, 5) and stats.dtype == torch.float32


def test_double_backward_refused():
    """The fused backward is not itself differentiable: a second derivative raises instead of
    silently coming out without the terms that pass through it."""
    own, other, inj, *weights = [t.requires_grad_() for t in _make((2, 7, 40), 10, torch.float32)]
    with use_backend("triton"):
        out = gated_blend(own, other, inj, *weights)
        (d_own,) = torch.autograd.grad(out.square().sum(), own, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            d_own.square().sum().backward()


def test_clear_errors():
    own = torch.randn(4, 8)
    w = dict(w1=torch.randn(5, 24), b1=torch.randn(5), w2=torch.randn(24, 5), b2=torch.randn(24))

    def call(own=own, other=own, inj=own, **kw):
        return gated_blend(own, other, inj, **{**w, **kw})

    with pytest.raises(ValueError, match=r"other has shape \(4, 9\) but own has shape \(4, 8\)"):
        call(other=torch.randn(4, 9))
    with pytest.raises(TypeError, match="inj has dtype torch.float16 but own has dtype torch.float32"):
        call(inj=own.half())
    with pytest.raises(TypeError, match="own has dtype torch.int64"):
        call(own=torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"w1 has shape \(5, 23\) but must be \[R, 3\*D\] = \[R, 24\]"):
        call(w1=torch.randn(5, 23))
    with pytest.raises(ValueError, match=r"w2 has shape \(24, 6\) but must be \(24, 5\)"):
        call(w2=torch.randn(24, 6))
    with pytest.raises(ValueError, match=r"b2 has shape \(23,\) but must be \(24,\)"):
        call(b2=torch.randn(23))
    with pytest.raises(ValueError, match="scalar"):
        call(own=torch.tensor(1.0), other=torch.tensor(1.0), inj=None)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("saturation", [True, False], ids=["saturation", "monitor"])
def test_torch_compile_fullgraph(backend, inj, saturation):
    """No graph break (fullgraph=True raises on one): the Triton path is one opaque custom op
    forward and one backward (checked with aot_eager on CPU, which traces what inductor would
    get, without C++ codegen); the eager path through inductor."""
    inputs = [t.requires_grad_() if t is not None else None
              for t in _make((6, 40), 10, torch.float32, inj=inj)]
    live = [t for t in inputs if t is not None]

    def f(*args):
        out, stats = gated_blend(*args, stats=True, saturation=saturation)
        return out * 2, stats

    def loss(out, stats):  # without saturation the stats are not differentiable
        return out.sum() + (stats[:, 4].sum() if saturation else 0.0)

    # (inductor's CPU C++ build is slow: once is enough there)
    compile_backend = "inductor" if CUDA or (backend == "eager" and inj and saturation) else "aot_eager"
    with use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
        out, stats = compiled(*inputs)
        assert stats.shape == (3, 5 if saturation else 4) and stats.requires_grad == saturation
        grads = torch.autograd.grad(loss(out, stats), live)
    ref_out, ref_stats = f(*inputs) if backend == "eager" else (
        lambda o_s: (o_s[0] * 2, o_s[1]))(gated_blend_reference(*inputs, stats=True, saturation=saturation))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_stats), live)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4)


def test_torch_compile_no_grad_skips_hidden_store(monkeypatch):
    """Compiled calls that need no gradient ask the custom op not to store the gate MLP's hidden
    activations (its fake says [0, R] then, as the kernel returns); the output is the eager call's."""
    monkeypatch.setattr(gb, "_config_override", {"fwd": {"FUSE_HIDDEN": True}, "fwd_stats": {"FUSE_HIDDEN": True}})
    calls = _spy_launches(monkeypatch)
    inputs = _make((6, 40), 10, torch.float32)
    with use_backend("triton"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: gated_blend(*a, stats=True), fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            out, stats = compiled(*inputs)
        want_out, want_stats = gated_blend(*inputs, stats=True)
    assert [kw["STORE_HIDDEN"] for _, kw in calls if "STORE_HIDDEN" in kw][0] is False
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(stats, want_stats, atol=0, rtol=0)


@pytest.mark.parametrize("store_hidden", [True, False])
@pytest.mark.parametrize("saturation", [True, False], ids=["saturation", "monitor"])
def test_custom_op_opcheck(store_hidden, saturation):
    """torch.library's checks of the forward op (schema, fake tensor shapes against the real
    kernel's, autograd registration) with and without the hidden store and the saturation column."""
    own, other, inj, w1, b1, w2, b2 = _make((7, 40), 10, torch.float32)
    args = (own, other, inj, w1.requires_grad_(), b1, w2, b2, True, store_hidden, saturation)
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.hrm_kernels.gated_blend_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_stats_wider_than_the_count_field_run_eagerly(monkeypatch):
    """Stats pack each row's two gate counts into 16 bits each: wider gates (here the limit lowered
    to 30, D=40) take the eager math, and the launcher refuses them outright."""
    monkeypatch.setattr(gb, "MAX_STATS_D", 30)
    calls = _spy_launches(monkeypatch)
    inputs = _make((5, 40), 10, torch.float32)
    with use_backend("triton"):
        out, stats = gated_blend(*inputs, stats=True)
        assert calls == []
        gated_blend(*inputs)  # without stats the kernels still run
        assert calls
        with pytest.raises(ValueError, match="D=40 must be at most 30"):
            gb.gated_blend_forward(*inputs, True)
    want_out, want_stats = gated_blend_reference(*inputs, stats=True)
    assert torch.equal(out, want_out) and torch.equal(stats, want_stats)


@requires_cuda
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [62976, 3001])
def test_cuda_full_size_bf16(rows, wdtype, inj):
    _check("triton", _make((rows, 512), 128, torch.bfloat16, wdtype, device="cuda", inj=inj),
           with_stats=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,r", [((1000, 40), 10), ((777, 520), 100), ((300, 1024), 256)], ids=str)
def test_cuda_other_shapes(dtype, shape, r):
    inputs = _make(shape, r, dtype, device="cuda")
    _check("triton", inputs, with_stats=True)
    # the no-gradient forward (no hidden store) compiles and runs at these tiles too, bit for bit
    with torch.no_grad():
        out_ng = gated_blend(*inputs)
    out = gated_blend(*[t.detach().requires_grad_() for t in inputs])
    assert torch.equal(out_ng, out.detach())


# The forward without stats and both backward phases on Hopper: hrm_kernels._gluon_gated_blend (no
# interpreter path: tests/test_compile_for_gpu.py compiles its kernels for sm_90 on CPU).
ggb = importlib.import_module("hrm_kernels._gluon_gated_blend")
requires_gluon = pytest.mark.skipif(not (CUDA and ggb.available(torch.device("cuda"))),
                                    reason="the Gluon gated blend runs on a Hopper GPU")


def _gluon_inputs(rows, d, r, dtype, inj=True):
    """Weights in the activations' dtype and fp32 biases, as the model passes them."""
    own, other, inj_t, w1, b1, w2, b2 = _make((rows, d), r, dtype, device="cuda", inj=inj)
    return [own, other, inj_t, w1, b1.float(), w2, b2.float()]


@requires_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("rows,d,r", [(37, 64, 64), (333, 192, 128), (1000, 512, 128), (130, 128, 64),
                                      (62976, 512, 128)], ids=str)
def test_gluon_forward_matches_float64(monkeypatch, dtype, inj, rows, d, r):
    """Rows that leave a partial last tile, one to eight 64-column chunks, both gate hidden sizes,
    and the model's Sudoku size (many tiles a program: the ring's stages under load): the output
    within the bound eager's same-precision error sets against float64, and the same bits when each
    program takes several tiles (3 programs)."""
    inputs = _gluon_inputs(rows, d, r, dtype, inj)
    calls = record_calls(monkeypatch, ggb, "gated_blend_forward")
    with torch.no_grad(), use_backend("triton"):
        got = gated_blend(*inputs)
    assert len(calls) == 1
    assert_close_to_reference(f"gluon {dtype} {rows}x{d} R={r}", got, gated_blend_reference(*inputs),
                              _gated_blend64(*_to64(inputs)))
    assert torch.equal(ggb.gated_blend_forward(*inputs, programs=3), got)


@requires_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [300, 62976])
def test_gluon_inj_none_equals_zeros(monkeypatch, dtype, rows):
    inputs = _gluon_inputs(rows, 512 if rows > 1000 else 128, 128, dtype)
    calls = record_calls(monkeypatch, ggb, "gated_blend_forward")
    with torch.no_grad():
        zeros = gated_blend(inputs[0], inputs[1], torch.zeros_like(inputs[0]), *inputs[3:])
        none = gated_blend(inputs[0], inputs[1], None, *inputs[3:])
    assert len(calls) == 2  # both through the Gluon kernel (3 and 2 sources)
    assert torch.equal(none, zeros)


@requires_gluon
def test_gluon_forward_routing(monkeypatch):
    """Only calls without stats, of shapes and dtypes it takes, with ``USE_GLUON`` and the fast
    sigmoid on (and ``USE_GLUON_STORE`` for a call with a gradient), run the Gluon kernel; the
    others the Triton kernels."""
    calls = record_calls(monkeypatch, ggb, "gated_blend_forward")
    inputs = _gluon_inputs(200, 128, 64, torch.bfloat16)
    with torch.no_grad():
        gated_blend(*inputs)
        assert len(calls) == 1
        gated_blend(*inputs, stats=True)
        gated_blend(*_gluon_inputs(200, 120, 64, torch.bfloat16))  # D not a multiple of 64
        gated_blend(*_gluon_inputs(200, 128, 32, torch.bfloat16))  # R not 64 or 128
        gated_blend(*_gluon_inputs(200, 128, 64, torch.float32))
        gated_blend(inputs[0], inputs[1], inputs[2], inputs[3].float(), *inputs[4:])  # fp32 W1
        monkeypatch.setattr(gb, "USE_GLUON", False)
        gated_blend(*inputs)
        monkeypatch.setattr(gb, "USE_GLUON", True)
        monkeypatch.setattr(importlib.import_module("hrm_kernels._math"), "FAST_SIGMOID", False)
        gated_blend(*inputs)
    monkeypatch.setattr(importlib.import_module("hrm_kernels._math"), "FAST_SIGMOID", True)
    with_grad = [t.detach().requires_grad_() for t in inputs]
    monkeypatch.setattr(gb, "USE_GLUON_STORE", False)
    gated_blend(*with_grad)
    assert len(calls) == 1
    monkeypatch.setattr(gb, "USE_GLUON_STORE", True)  # the default: a forward with a backward to come too
    gated_blend(*with_grad)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="programs must be at least 1"):
        ggb.gated_blend_forward(*inputs, programs=0)


def _check_through(monkeypatch, launcher, inputs, **switches):
    """``_check`` (triton backend) of ``inputs`` with ``gated_blend``'s ``switches`` set, asserting
    that the Gluon ``launcher`` ran exactly once in it."""
    for name, on in switches.items():
        monkeypatch.setattr(gb, name, on)
    calls = record_calls(monkeypatch, ggb, launcher)
    _check("triton", inputs)
    assert len(calls) == 1


def _hidden_and_dout(inputs):
    """(pre1, z) of the forward (the launcher's defaults) and a random output gradient."""
    _, _, pre1, z = gb.gated_blend_forward(*inputs, with_stats=False, store_hidden=True)
    return pre1, z, torch.randn_like(inputs[0])


@requires_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("rows,d,r", [(37, 64, 64), (333, 192, 128), (1000, 512, 128), (62976, 512, 128)], ids=str)
def test_gluon_dpre_with_triton_main_matches_float64(monkeypatch, dtype, inj, rows, d, r):
    """The Gluon d_pre1 kernel feeding the Triton second phase (after the Triton forward); every
    gradient within the bound eager's same-precision error sets against float64, and the d_pre1
    kernel's output the same bits when each program takes several tiles (3 programs)."""
    inputs = _gluon_inputs(rows, d, r, dtype, inj)
    _check_through(monkeypatch, "backward_dpre", inputs, USE_GLUON_DPRE=True, USE_GLUON_MAIN=False,
                   USE_GLUON_STORE=False)
    own, other, inj_t, w1, b1, w2, b2 = inputs
    pre1, z, dout = _hidden_and_dout(inputs)
    dpre, db1 = ggb.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z)
    dpre3, db1_3 = ggb.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z, programs=3)
    assert torch.equal(dpre3, dpre) and torch.equal(db1_3, db1)


@requires_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("rows,d,r", [(37, 64, 64), (333, 192, 128), (1000, 512, 128), (130, 128, 64),
                                      (62976, 512, 128)], ids=str)
def test_gluon_main_matches_float64(monkeypatch, dtype, inj, rows, d, r):
    """Both backward phases in Gluon (``USE_GLUON_MAIN``): every gradient within the bound eager's
    same-precision error sets against float64. Then the second kernel alone against the Triton one
    on the same d_pre1: the source gradients the same up to one rounding, the same bits whatever the
    grid and the row split (3 programs, 1 and 7 splits), and the weight gradients' partial sums,
    summed, close."""
    inputs = _gluon_inputs(rows, d, r, dtype, inj)
    _check_through(monkeypatch, "backward_main", inputs, USE_GLUON_MAIN=True)
    own, other, inj_t, w1, b1, w2, b2 = inputs
    pre1, z, dout = _hidden_and_dout(inputs)
    dpre, _ = ggb.backward_dpre(dout, own, other, inj_t, w2, b2, pre1, z)
    sources = [own, other] + ([inj_t] if inj else [])

    def run(**launch):
        grads = [torch.full_like(t, float("nan")) for t in sources]
        partials = ggb.backward_main(dout, own, other, inj_t, w1, w2, b2, z, dpre, *grads[:2],
                                     grads[2] if inj else None, **launch)
        return grads, [p.sum(0) for p in partials]

    grads, sums = run()
    monkeypatch.setattr(gb, "USE_GLUON_MAIN", False)  # the Triton kernel, for comparison
    cfg = gb._launch_configs(rows, d, r, own.device, dtype, w1.dtype)["bwd"]
    ref_grads = [torch.empty_like(t) for t in sources]
    ref = gb._backward_main(cfg, gb._gate_flags(dtype), dout, None, own, other, inj_t, w1, b1, w2, b2, z, dpre,
                            torch.zeros(1, r, device="cuda"), *ref_grads[:2],
                            ref_grads[2] if inj else own.new_empty(0))
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # (relative spacing of the dtype's values, at most)
    for g, e in zip(grads, ref_grads):  # one rounding of the same fp32 sum, accumulated in another order
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=ulp, atol=ulp * e.abs().max().item())
    width = len(sources) * d
    for got, want in zip(sums, (ref[3][:, :width], ref[5][:width], ref[6][:width])):
        # (want: the Triton kernel's sums rounded to the weights' dtype)
        torch.testing.assert_close(got, want.float(), rtol=ulp, atol=ulp * want.abs().max().item())
    for launch in (dict(programs=3), dict(splits=1), dict(splits=7)):
        other_grads, other_sums = run(**launch)
        assert all(torch.equal(a, b) for a, b in zip(other_grads, grads)), launch
        for a, b in zip(other_sums, sums):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@requires_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("rows,d,r", [(37, 64, 64), (333, 192, 128), (1000, 512, 128), (62976, 512, 128)], ids=str)
def test_gluon_forward_store_matches_float64(monkeypatch, dtype, inj, rows, d, r):
    """The forward with a backward to come through the Gluon kernel (``USE_GLUON_STORE``): outputs
    and every gradient within the bound eager's same-precision error sets against float64; its out
    the same bits as the no-gradient call's, and pre1 and z within one rounding of the Triton
    kernel's (the same fp32 sums in another order; z's silu in another form)."""
    inputs = _gluon_inputs(rows, d, r, dtype, inj)
    _check_through(monkeypatch, "gated_blend_forward", inputs, USE_GLUON_STORE=True)
    own, other, inj_t, w1, b1, w2, b2 = inputs
    out, pre1, z = ggb.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, store_hidden=True)
    assert torch.equal(out, ggb.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2))
    out3, pre3, z3 = ggb.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, programs=3, store_hidden=True)
    assert torch.equal(out3, out) and torch.equal(pre3, pre1) and torch.equal(z3, z)
    monkeypatch.setattr(gb, "USE_GLUON_STORE", False)
    _, _, pre_t, z_t = gb.gated_blend_forward(own, other, inj_t, w1, b1, w2, b2, with_stats=False, store_hidden=True)
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, want in ((pre1, pre_t), (z, z_t)):
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * want.abs().max().item())


@requires_gluon
def test_gluon_main_routing(monkeypatch):
    """The Gluon second phase only with its switch, without the saturation term, for inputs it
    takes; bad launch arguments get a clear error."""
    calls = record_calls(monkeypatch, ggb, "backward_main")
    inputs = [t.detach().requires_grad_() if t is not None else None
              for t in _gluon_inputs(200, 128, 64, torch.bfloat16)]
    monkeypatch.setattr(gb, "USE_GLUON_MAIN", False)
    gated_blend(*inputs).sum().backward()
    assert not calls
    monkeypatch.setattr(gb, "USE_GLUON_MAIN", True)
    gated_blend(*inputs).sum().backward()
    assert len(calls) == 1
    out, stats = gated_blend(*inputs, stats=True, saturation=True)
    (out.sum() + stats[:, 4].sum()).backward()  # the saturation term: the Triton kernel
    narrow = [t.detach().requires_grad_() if t is not None else None
              for t in _gluon_inputs(200, 120, 64, torch.bfloat16)]  # D not a multiple of 64
    gated_blend(*narrow).sum().backward()
    assert len(calls) == 1
    own, other, inj, w1, _, w2, b2 = [t.detach() for t in inputs]
    z = torch.zeros(200, 64, device="cuda", dtype=torch.bfloat16)
    grads = [torch.empty_like(own) for _ in range(3)]
    for bad in (dict(programs=0), dict(splits=0)):
        with pytest.raises(ValueError, match="must be at least 1"):
            ggb.backward_main(own, own, other, inj, w1, w2, b2, z, z, *grads, **bad)


@requires_gluon
@pytest.mark.parametrize("inj", [True, False], ids=["inj", "no_inj"])
@pytest.mark.parametrize("rows,d,r", [(37, 64, 64), (1000, 512, 128)], ids=str)
def test_triton_backward_at_gluon_shapes_matches_float64(monkeypatch, inj, rows, d, r):
    """The Triton backward (both phases), which other GPUs run, at shapes the Gluon phases take on
    Hopper by default (there it would otherwise go untested without the saturation term), after
    the Triton forward."""
    monkeypatch.setattr(gb, "USE_GLUON_DPRE", False)
    monkeypatch.setattr(gb, "USE_GLUON_MAIN", False)
    monkeypatch.setattr(gb, "USE_GLUON_STORE", False)
    dpre_calls = record_calls(monkeypatch, ggb, "backward_dpre")
    _check("triton", _gluon_inputs(rows, d, r, torch.bfloat16, inj))
    assert not dpre_calls


@requires_gluon
def test_gluon_backward_routing(monkeypatch):
    """The d_pre1 phase only with its switch (on by default), without the saturation term, for
    inputs it takes."""
    calls = record_calls(monkeypatch, ggb, "backward_dpre")
    inputs = [t.detach().requires_grad_() if t is not None else None
              for t in _gluon_inputs(200, 128, 64, torch.bfloat16)]
    gated_blend(*inputs).sum().backward()
    assert len(calls) == 1  # the default
    monkeypatch.setattr(gb, "USE_GLUON_DPRE", False)
    gated_blend(*inputs).sum().backward()
    assert len(calls) == 1
    monkeypatch.setattr(gb, "USE_GLUON_DPRE", True)
    calls.clear()
    out, stats = gated_blend(*inputs, stats=True, saturation=True)
    (out.sum() + stats[:, 4].sum()).backward()  # the saturation term: the Triton kernel
    narrow = [t.detach().requires_grad_() if t is not None else None
              for t in _gluon_inputs(200, 120, 64, torch.bfloat16)]  # D not a multiple of 64
    gated_blend(*narrow).sum().backward()
    assert not calls
    with pytest.raises(ValueError, match="programs must be at least 1"):
        z = torch.zeros(200, 64, device="cuda", dtype=torch.bfloat16)
        ggb.backward_dpre(inputs[0].detach(), *[t.detach() for t in inputs[:3]], inputs[5].detach(),
                          inputs[6].detach(), z, z, programs=0)
