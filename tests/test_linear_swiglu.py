"""gate_up matmul + SwiGLU epilogue: outputs and both gradients against float64, odd shapes,
with and without autograd, under torch.compile."""

import importlib

import pytest
import torch

from hrm_kernels import _gluon_gemm, linear_swiglu, linear_swiglu_reference, use_backend
from tests.conftest import CUDA, DEVICE, requires_cuda
from tests.reference64 import assert_float32_math, linear_swiglu64
from tests.tolerance import assert_close_to_reference

# The interpreter's tl.dot works in fp16/fp32 only (GPU.md); bf16 is covered on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (leading dims, K, I): K not a multiple of the K tile, I not a multiple of the N tile, 1 row.
# The TMA kernel needs 16-byte rows (K and I multiples of 8 in half precision, of 4 in fp32): the
# first two shapes run it (37 rows, K=40 < one K tile of 32+, I=24/48 partial N tiles).
SHAPES = [((37,), 40, 24), ((2, 35), 72, 48), ((37,), 40, 37), ((2, 35), 123, 50), ((1,), 64, 16),
          ((3, 1, 4), 16, 3)]


class Kernel:
    """Which Triton kernel a test asks for, and the TMA and Gluon launches it saw."""

    def __init__(self, name: str):
        self.name, self.tma_launches, self.gluon_launches, self.keep_launches = name, 0, 0, 0

    @staticmethod
    def gluon_eligible(backend: str, x: torch.Tensor, inter: int) -> bool:
        """The Gluon GEMM's condition (no-grad launches; with ``gluon_keep`` also those keeping
        gate_up): 2-byte floats, K and I multiples of 8."""
        return (backend == "triton" and x.element_size() == 2 and x.shape[-1] % 8 == 0 and inter % 8 == 0
                and x.numel() > 0 and inter > 0)

    def check_ran(self, backend: str, x: torch.Tensor, inter: int) -> None:
        """With the TMA kernel on and 16-byte rows (its condition), the TMA kernel must have run; with
        the Gluon GEMM on and its condition met, the Gluon GEMM must have (for the no-grad launch)."""
        item = x.element_size()
        aligned = (x.shape[-1] * item) % 16 == 0 and (inter * item) % 16 == 0
        if self.name == "tma" and backend == "triton" and aligned:
            assert self.tma_launches > 0, "the TMA kernel did not run"
        if self.name in ("gluon", "gluon_keep") and self.gluon_eligible(backend, x, inter):
            assert self.gluon_launches > 0, "the Gluon GEMM did not run"


GLUON = CUDA and _gluon_gemm.available(torch.device("cuda"))
requires_gluon = pytest.mark.skipif(not GLUON, reason="the Gluon GEMM runs on a Hopper GPU")


@pytest.fixture(params=["tiles", "tma", pytest.param("gluon", marks=requires_gluon),
                        pytest.param("gluon_keep", marks=requires_gluon)])
def kernel(request, monkeypatch):
    """The Triton kernels: the plain tiled one and the persistent TMA one (where the alignment lets
    it run; otherwise the tiled one, which the shapes below also cover); on a Hopper GPU also the
    Gluon GEMM for the launches without a gradient (TMA and tiles for the others), and for all
    launches ("gluon_keep": ``GLUON_KEEPS_GATE_UP``, its "swiglu_keep" epilogue with a gradient)."""
    module = importlib.import_module("hrm_kernels.linear_swiglu")
    monkeypatch.setattr(module, "USE_TMA", request.param != "tiles")
    monkeypatch.setattr(module, "TMA_STORES_GATE_UP", request.param == "tma")
    monkeypatch.setattr(module, "USE_GLUON", request.param in ("gluon", "gluon_keep"))
    monkeypatch.setattr(module, "GLUON_KEEPS_GATE_UP", request.param == "gluon_keep")
    chosen = Kernel(request.param)
    launch = module._launch_tma

    def counted(*args, **kwargs):
        chosen.tma_launches += 1
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, "_launch_tma", counted)
    gemm = _gluon_gemm.gemm

    def counted_gluon(*args, **kwargs):
        chosen.gluon_launches += 1
        chosen.keep_launches += (args[2] if len(args) > 2 else kwargs.get("epilogue")) == "swiglu_keep"
        return gemm(*args, **kwargs)

    monkeypatch.setattr(_gluon_gemm, "gemm", counted_gluon)
    return chosen


def _make(lead, k, inter, dtype, device=DEVICE):
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    weight = (torch.randn(2 * inter, k, device=device) / k ** 0.5).to(dtype)
    dout = torch.randn(*lead, inter, device=device, dtype=dtype)
    return x, weight, dout


def _run(fn, x, weight, dout):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    out.backward(dout)
    return out.detach(), x.grad, weight.grad


def _check(backend, x, weight, dout, kernel=None):
    with use_backend(backend):
        got = _run(linear_swiglu, x, weight, dout)
        with torch.no_grad():
            no_grad = linear_swiglu(x, weight)
    eager = _run(linear_swiglu_reference, x, weight, dout)
    ref = _run(linear_swiglu64, x.double(), weight.double(), dout.double())
    for name, g, e, r in zip(("out", "dx", "dweight"), got, eager, ref):
        assert g.dtype == x.dtype
        assert_close_to_reference(f"{backend} {x.dtype} {tuple(x.shape)} {name}", g, e, r)
        if x.dtype == torch.float32:
            assert_float32_math(f"{x.dtype} {tuple(x.shape)} {name}", e, r)
    if kernel is not None and kernel.name == "gluon" and kernel.gluon_eligible(backend, x, weight.shape[0] // 2):
        # the Gluon GEMM's sigmoid is exp and a division, the tiled kernel's (with gradients) tanh.approx
        assert_close_to_reference(f"{backend} {x.dtype} {tuple(x.shape)} no-grad out", no_grad, eager[0], ref[0])
    else:  # the no-grad launch skips storing gate_up but computes the same tiles
        torch.testing.assert_close(no_grad, got[0], atol=0, rtol=0)
    if kernel is not None:
        kernel.check_ran(backend, x, weight.shape[0] // 2)
        if kernel.name == "gluon_keep" and kernel.gluon_eligible(backend, x, weight.shape[0] // 2):
            assert kernel.keep_launches > 0, "the with-gradient launch did not run the swiglu_keep epilogue"


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,inter", SHAPES, ids=str)
def test_matches_float64(kernel, backend, dtype, lead, k, inter):
    _check(backend, *_make(lead, k, inter, dtype), kernel=kernel)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_non_contiguous_and_empty(kernel, backend):
    x = torch.randn(40, 9, device=DEVICE).t()  # [9, 40], transposed storage
    weight = torch.randn(2 * 24, 40, device=DEVICE) / 40 ** 0.5
    _check(backend, x, weight, torch.randn(9, 24, device=DEVICE), kernel=kernel)
    with use_backend(backend):
        assert linear_swiglu(torch.randn(0, 3, 40, device=DEVICE), weight).shape == (0, 3, 24)
        empty_k = linear_swiglu(torch.randn(3, 0, device=DEVICE), torch.randn(8, 0, device=DEVICE))
    torch.testing.assert_close(empty_k, torch.zeros(3, 4, device=DEVICE))  # x @ W.T = 0 when K = 0


def test_clear_errors():
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"weight must be \[2I, K\]"):
        linear_swiglu(torch.randn(4, 7), w)
    with pytest.raises(ValueError, match=r"weight must be \[2I, K\]"):
        linear_swiglu(torch.randn(4, 8), torch.randn(9, 8))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        linear_swiglu(torch.randn(4, 8), w.half())
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        linear_swiglu(torch.ones(4, 8, dtype=torch.int64), w)
    keep = importlib.import_module("hrm_kernels.linear_swiglu").linear_swiglu_keep
    with pytest.raises(ValueError, match=r"need x \[M, K\] and weight \[2I, K\]"):
        keep(torch.randn(2, 4, 8), w)  # rows only: the caller flattens
    with pytest.raises(ValueError, match=r"need x \[M, K\] and weight \[2I, K\]"):
        keep(torch.randn(4, 8), torch.randn(9, 8))


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_compile_fullgraph(kernel, backend, grad):
    x = torch.randn(2, 11, 40, device=DEVICE, requires_grad=grad)
    weight = (torch.randn(2 * 24, 40, device=DEVICE) / 40 ** 0.5).requires_grad_(grad)

    def f(t, w):
        return linear_swiglu(t * 1.5, w)

    compile_backend = "inductor" if (backend == "eager" or CUDA) else "aot_eager"
    with use_backend(backend):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=compile_backend)(x, weight)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
    ref = linear_swiglu64(leaves[0] * 1.5, leaves[1])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    kernel.check_ran(backend, x, 24)
    if grad:
        got = torch.autograd.grad(out.square().sum(), (x, weight))
        want = torch.autograd.grad(ref.square().sum(), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 62976), (torch.bfloat16, 96 * 901), (torch.bfloat16, 333),
                                        (torch.float32, 333)], ids=str)
def test_cuda_full_size(kernel, dtype, rows):
    """HRM's K=512, I=1536 with the full CUDA tiles (fp32: the tiles' shared memory is twice that of
    bf16, the launcher drops a pipeline stage to fit)."""
    if kernel.name == "tma" and torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("the TMA kernel runs on compute capability 9.x and 10.x")
    _check("triton", *_make((rows,), 512, 1536, dtype, device="cuda"), kernel=kernel)


def test_tma_kernel_runs_where_aligned(monkeypatch):
    module = importlib.import_module("hrm_kernels.linear_swiglu")
    calls = []
    launch = module._launch_tma
    monkeypatch.setattr(module, "USE_TMA", True)
    monkeypatch.setattr(module, "TMA_STORES_GATE_UP", True)
    monkeypatch.setattr(module, "USE_GLUON", False)
    monkeypatch.setattr(module, "_launch_tma", lambda *a, **k: calls.append(a[0].shape) or launch(*a, **k))
    for (lead, k, inter), expect in [(SHAPES[0], True), (SHAPES[2], False), (SHAPES[3], False)]:
        calls.clear()
        x, weight, _ = _make(lead, k, inter, torch.float16)
        with use_backend("triton"):
            out = linear_swiglu(x, weight)
        torch.testing.assert_close(out, linear_swiglu_reference(x, weight), atol=2e-3, rtol=2e-3)
        assert bool(calls) == expect, (lead, k, inter)


def test_default_tma_only_for_launches_without_gate_up(monkeypatch):
    """As shipped: the TMA kernel runs the no-grad launches (measured faster there), the training
    forward that keeps gate_up for the backward stays on the tiled kernel (measured faster there)."""
    if CUDA and torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("the TMA kernel runs on compute capability 9.x and 10.x")
    module = importlib.import_module("hrm_kernels.linear_swiglu")
    assert module.USE_TMA and not module.TMA_STORES_GATE_UP
    monkeypatch.setattr(module, "USE_GLUON", False)  # on a Hopper GPU the Gluon GEMM takes those (below)
    stored = []
    launch = module._launch_tma
    monkeypatch.setattr(module, "_launch_tma", lambda *a, **k: stored.append(a[4]) or launch(*a, **k))
    x, weight, dout = _make(*SHAPES[0], torch.float16)
    with use_backend("triton"):
        with torch.no_grad():
            no_grad = linear_swiglu(x, weight)
        trained = _run(linear_swiglu, x, weight, dout)[0]
    want = linear_swiglu64(x, weight)
    for out in (no_grad, trained):
        torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)
    assert stored == [False]  # one TMA launch, the no-grad one, storing nothing


# The Gluon GEMM (hrm_kernels._gluon_gemm): Hopper only, no interpreter path (its sm_90 compile is
# checked on CPU machines by tests/test_compile_for_gpu.py). Odd row counts (partial row tiles),
# widths that are not multiples of the 64/128-wide tiles, K over several k-steps with a partial
# last one, K of one and of three k-steps (fewer than the ring's stages: a stage holds steps of
# different tiles), and 3 programs (each walks many tiles: the ring of stages wraps and both
# warpgroups alternate) against one program per SM.
GLUON_SHAPES = [(1000, 512, 384), (777, 1544, 200), (1000, 64, 384), (777, 136, 200), (62976, 512, 1536)]


def test_gluon_swiglu_weight_order():
    """The SwiGLU kernels read the weight as groups of 8 gate rows, each followed by the same 8 up
    rows (one wgmma tile holds both halves); I = 24 (3 groups), rows tagged by their index."""
    inter, k = 24, 3
    weight = torch.arange(2 * inter, dtype=torch.float32)[:, None].expand(2 * inter, k).contiguous()
    order = [row for g in range(inter // 8) for row in (*range(8 * g, 8 * g + 8), *range(inter + 8 * g, inter + 8 * g + 8))]
    assert _gluon_gemm.interleave_gate_up(weight)[:, 0].tolist() == order


def test_shared_weight_layouts_reorder_each_weight_once():
    """Inside ``shared_weight_layouts`` a weight's reordered copy is made once and handed out again
    while the weight is the same tensor at the same version; an in-place change, another tensor
    with the same values, the block's end, and nesting (the outer block's memo) each behave as
    documented; the values are always those of a fresh reorder."""
    weight = torch.randn(48, 37, device=DEVICE)
    fresh = _gluon_gemm.interleave_gate_up
    outside = fresh(weight)
    assert fresh(weight) is not outside  # no block: a copy at every call
    with _gluon_gemm.shared_weight_layouts():
        first = fresh(weight)
        assert torch.equal(first, outside)
        with _gluon_gemm.shared_weight_layouts():  # nested: the outer memo
            assert fresh(weight) is first
        assert fresh(weight) is first  # the inner block's end keeps the outer memo
        same_values = weight.clone()
        assert fresh(same_values) is not first and torch.equal(fresh(same_values), first)
        weight.mul_(-2.0)  # a new version: a new copy, of the new values
        changed = fresh(weight)
        assert changed is not first and torch.equal(changed, -2.0 * first)
        assert fresh(weight) is changed
        held = len(_gluon_gemm._LAYOUTS.memo)
        for _ in range(3):  # a weight made afresh at each call: its copy dies with it
            fresh(weight.clone())
        assert len(_gluon_gemm._LAYOUTS.memo) == held
        with torch.inference_mode():  # no version counter: memoized by identity
            frozen = weight.clone()
            assert fresh(frozen) is fresh(frozen) and torch.equal(fresh(frozen), changed)
    assert fresh(weight) is not changed  # the block's end drops the memo
    assert _gluon_gemm._LAYOUTS.memo is None


@requires_cuda
def test_shared_weight_layouts_do_not_reach_into_a_capture():
    """A block entered outside a CUDA graph capture memoizes nothing while a capture runs inside it
    (the graph must make its own copy: a replay after the weight changes reads the new values),
    and a block entered inside a capture memoizes the graph's copies."""
    weight = torch.randn(32, 16, device="cuda")
    out = torch.empty_like(weight)
    graph = torch.cuda.CUDAGraph()
    with _gluon_gemm.shared_weight_layouts():
        eager = _gluon_gemm.interleave_gate_up(weight)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                inside = _gluon_gemm.interleave_gate_up(weight)
                assert inside is not eager
                with _gluon_gemm.shared_weight_layouts():  # nested: the outer block began outside
                    assert _gluon_gemm.interleave_gate_up(weight) is not inside
                out.copy_(inside)
        torch.cuda.current_stream().wait_stream(stream)
    weight.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _gluon_gemm.interleave_gate_up(weight))
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        with _gluon_gemm.shared_weight_layouts():  # entered inside the capture: memoizes
            inside = _gluon_gemm.interleave_gate_up(weight)
            assert _gluon_gemm.interleave_gate_up(weight) is inside
    torch.cuda.synchronize()


@requires_gluon
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager_calls", "graphs"])
def test_training_step_reorders_each_gate_up_weight_once(monkeypatch, cuda_graphs):
    """``HRMInner.SHARE_WEIGHT_LAYOUTS``: a bf16 training step (segment and continue target) makes
    one reordered copy per gate_up weight instead of one per SwiGLU matmul, and its loss, logits and
    every gradient are bit-identical with it off. With graphs, the copies are counted in the captures
    (each capture runs its function more than once: distinct copies per weight, not calls)."""
    from hrm import ACTLossHead, HRM
    from hrm.model import HRMInner
    from tests.test_model_spec import make_batch, randomize_, tiny_config

    torch.manual_seed(3)
    model = HRM(tiny_config(use_gating=False, puzzle_emb_ndim=32, hidden_size=64, num_heads=4, L_layers=2,
                            H_layers=2, forward_dtype="bfloat16", kernels="triton", cuda_graphs=cuda_graphs)).cuda()
    randomize_(model)
    batch = {k: v.cuda() for k, v in make_batch(None).items()}
    copies = []
    reorder = _gluon_gemm.interleave_gate_up
    monkeypatch.setattr(_gluon_gemm, "interleave_gate_up", lambda w: copies.append(reorder(w)) or copies[-1])

    def step(shared):
        monkeypatch.setattr(HRMInner, "SHARE_WEIGHT_LAYOUTS", shared)
        model.zero_grad(set_to_none=True)
        copies.clear()
        head = ACTLossHead(model)
        head.train()
        _, loss, _, outputs, _ = head(return_keys=("logits",), carry=head.initial_carry(batch), batch=batch)
        loss.backward()
        torch.cuda.synchronize()
        made = len({id(c) for c in copies})
        return made, len(copies), [loss, outputs["logits"]] + [p.grad for p in model.parameters() if p.grad is not None]

    made_off, calls_off, unshared = step(False)
    made_on, calls_on, shared = step(True)
    weights = 4  # L_layers + H_layers gate_up weights
    assert calls_on == calls_off and made_off == calls_off  # off: a copy at every SwiGLU matmul
    if cuda_graphs:  # captures run the function several times, each with its own copies
        assert made_on < made_off
    else:  # the segment's no-grad calls, its with-grad calls and the continue target's calls
        assert calls_off >= 3 * weights and made_on == weights
    assert len(shared) == len(unshared) > 3
    for a, b in zip(shared, unshared):
        assert torch.equal(a, b)


@requires_gluon
@pytest.mark.parametrize("epilogue", ["swiglu", "none"])
@pytest.mark.parametrize("programs", [None, 3], ids=["per_sm", "3_programs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,k,width", GLUON_SHAPES, ids=str)
def test_gluon_gemm_matches_float64(rows, k, width, dtype, programs, epilogue):
    """SwiGLU: weight [2 * width, k] -> [rows, width]; plain: weight [width, k] -> [rows, width]."""
    x, weight, _ = _make((rows,), k, width, dtype, device="cuda")
    if epilogue == "none":
        weight = weight[:width].contiguous()
    got = _gluon_gemm.gemm(x, weight, epilogue, programs=programs)
    assert got.dtype == dtype and got.shape == (rows, width)
    if epilogue == "swiglu":
        eager, ref = linear_swiglu_reference(x, weight), linear_swiglu64(x.double(), weight.double())
    else:
        eager, ref = x @ weight.t(), x.double() @ weight.double().t()
    assert_close_to_reference(f"gluon {epilogue} {dtype} {rows}x{k}x{width}", got, eager, ref)


@requires_gluon
@pytest.mark.parametrize("programs", [None, 3], ids=["per_sm", "3_programs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,k,width", GLUON_SHAPES, ids=str)
def test_gluon_gemm_keeps_gate_up(rows, k, width, dtype, programs):
    """The "swiglu_keep" epilogue: its activation is the "swiglu" epilogue's bit for bit, and the
    gate_up it writes is x @ weight.T rounded to the dtype (against float64, within a multiple of
    the eager matmul's error), every column of both halves written (I not a multiple of the tile)."""
    x, weight, _ = _make((rows,), k, width, dtype, device="cuda")
    gate_up = torch.full((rows, 2 * width), float("nan"), dtype=dtype, device="cuda")
    got = _gluon_gemm.gemm(x, weight, "swiglu_keep", programs=programs, gate_up=gate_up)
    torch.testing.assert_close(got, _gluon_gemm.gemm(x, weight, "swiglu", programs=programs), atol=0, rtol=0)
    assert_close_to_reference(f"gluon swiglu_keep gate_up {dtype} {rows}x{k}x{width}", gate_up, x @ weight.t(),
                              x.double() @ weight.double().t())


@requires_gluon
def test_linear_swiglu_runs_the_gluon_gemm_where_it_can(monkeypatch):
    """With ``USE_GLUON`` on a Hopper GPU: no-gradient launches of 2-byte operands with K and I
    multiples of 8 go to the Gluon GEMM; fp32 and ragged widths do not; launches that keep gate_up
    for the backward do when ``GLUON_KEEPS_GATE_UP`` is on, and only then."""
    module = importlib.import_module("hrm_kernels.linear_swiglu")
    monkeypatch.setattr(module, "USE_GLUON", True)
    calls = []
    gemm = _gluon_gemm.gemm
    monkeypatch.setattr(_gluon_gemm, "gemm", lambda *a, **k: calls.append(a[0].shape) or gemm(*a, **k))
    for keeps, dtype, k, inter, grad, expect in [
            (True, torch.bfloat16, 64, 48, False, True), (True, torch.float16, 64, 48, False, True),
            (True, torch.float32, 64, 48, False, False), (True, torch.bfloat16, 60, 48, False, False),
            (True, torch.bfloat16, 64, 44, False, False), (True, torch.bfloat16, 64, 48, True, True),
            (False, torch.bfloat16, 64, 48, True, False), (True, torch.float32, 64, 48, True, False)]:
        monkeypatch.setattr(module, "GLUON_KEEPS_GATE_UP", keeps)
        calls.clear()
        x, weight, _ = _make((2, 35), k, inter, dtype, device="cuda")
        with use_backend("triton"), torch.set_grad_enabled(grad):
            out = linear_swiglu(x.requires_grad_(grad), weight)
        assert_close_to_reference(f"linear_swiglu {dtype} K={k} I={inter} grad={grad}", out.detach(),
                                  linear_swiglu_reference(x.detach(), weight),
                                  linear_swiglu64(x.detach().double(), weight.double()))
        assert bool(calls) == expect, (keeps, dtype, k, inter, grad)


def test_gluon_gemm_rejects_bad_arguments():
    """Checked before anything launches (so on any machine): the grid and the output buffer."""
    x, weight = torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(32, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="programs must be at least 1"):
        _gluon_gemm.gemm(x, weight, "swiglu", programs=0)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.bfloat16 tensor of shape \(4, 16\)"):
        _gluon_gemm.gemm(x, weight, "swiglu", out=torch.empty(4, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="the swiglu_keep epilogue, and it alone, writes gate_up"):
        _gluon_gemm.gemm(x, weight, "swiglu_keep")
    with pytest.raises(ValueError, match="the swiglu_keep epilogue, and it alone, writes gate_up"):
        _gluon_gemm.gemm(x, weight, "swiglu", gate_up=torch.empty(4, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"gate_up must be a contiguous torch.bfloat16 tensor of shape \(4, 32\)"):
        _gluon_gemm.gemm(x, weight, "swiglu_keep", gate_up=torch.empty(4, 16, dtype=torch.bfloat16))
    assert not _gluon_gemm.supported(x, weight, "swiglu")  # CPU tensors never take the Gluon path


@requires_gluon
def test_gluon_gemm_under_torch_compile(monkeypatch):
    """The custom op torch.compile calls (no gradient, bf16) reaches the Gluon GEMM too."""
    module = importlib.import_module("hrm_kernels.linear_swiglu")
    monkeypatch.setattr(module, "USE_GLUON", True)
    calls = []
    gemm = _gluon_gemm.gemm
    monkeypatch.setattr(_gluon_gemm, "gemm", lambda *a, **k: calls.append(a[0].shape) or gemm(*a, **k))
    x, weight, _ = _make((2, 11), 40, 24, torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    with use_backend("triton"), torch.no_grad():
        out = torch.compile(lambda t, w: linear_swiglu(t * 1.5, w), fullgraph=True)(x, weight)
    assert calls, "the Gluon GEMM did not run under torch.compile"
    assert_close_to_reference("compiled gluon swiglu", out, linear_swiglu_reference(x * 1.5, weight),
                              linear_swiglu64((x * 1.5).double(), weight.double()))
