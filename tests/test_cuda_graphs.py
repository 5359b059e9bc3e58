"""CUDA graphs of the no-gradient recurrence and of the with-gradient L and H calls
(``HRMConfig.cuda_graphs``, ``HRMInner.GRAPH_GRAD_CALLS``): the same kernels replayed, so the same
numbers as launching them one by one, through training steps with optimizer updates, gradient
accumulation, evaluation under inference_mode, a new batch shape and moved parameters."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hrm import ACTLossHead, HRM
from hrm.cuda_graphs import GradGraphCache, GraphCache, module_tensors, storage_key
from hrm.layers import CastedLinear, hoisted_weight_casts
from hrm.model import HRMInner
from hrm_kernels import AdamATan2, use_backend
from tests.conftest import requires_cuda
from tests.test_model_spec import BATCH, make_batch, randomize_, tiny_config


def _record_calls(inner):
    """Replace the modules' forward with a recorder that returns ``2 own + 3 other + 5 inj``
    (scalars), so that both the order of the calls and their arguments show in the result."""
    calls = []

    def recorder(name):
        def forward(own, other, inj, cos_sin, stats=False, first_position=False, pending=False):
            calls.append(name + ("0" if first_position else ""))
            return 2 * own + 3 * other + (0.0 if inj is None else 5 * inj), None
        return forward

    inner.L_level.forward = recorder("L")
    inner.H_level.forward = recorder("H")
    return calls


def _reference_order(H_cycles, L_cycles, z_H, z_L, x, steps):
    """docs/REFERENCE.md's segment with the recorder's arithmetic: L(z_L, z_H, x) L_cycles times, then
    H(z_H, z_L), H_cycles times over; stopped after ``steps`` calls."""
    order, calls = [], 0
    for _ in range(H_cycles):
        for _ in range(L_cycles):
            if calls < steps:
                z_L, calls = 2 * z_L + 3 * z_H + 5 * x, calls + 1
                order.append("L")
        if calls < steps:
            z_H, calls = 2 * z_H + 3 * z_L, calls + 1
            order.append("H")
    return order, z_H, z_L


@pytest.mark.parametrize("H_cycles, L_cycles", [(2, 2), (3, 1), (1, 3)])
def test_recurrence_runs_the_first_steps_in_the_reference_order(H_cycles, L_cycles):
    inner = HRM(tiny_config(H_cycles=H_cycles, L_cycles=L_cycles)).inner
    calls = _record_calls(inner)
    z_H, z_L, x = (torch.tensor(v, dtype=torch.float64) for v in (100.0, 1.0, 0.25))
    for steps in range(H_cycles * (L_cycles + 1) + 1):
        calls.clear()
        got_H, got_L = inner.recurrence(z_H, z_L, x, steps)
        order, want_H, want_L = _reference_order(H_cycles, L_cycles, z_H, z_L, x, steps)
        assert calls == order, steps
        assert (got_H.item(), got_L.item()) == (want_H.item(), want_L.item()), steps
    calls.clear()  # the continue target's recurrence: the last H-call at position 0 alone
    inner.recurrence(z_H, z_L, x, H_cycles * (L_cycles + 1), first_position=True)
    assert calls == order[:-1] + ["H0"]
    with pytest.raises(ValueError, match="first_position needs all"):
        inner.recurrence(z_H, z_L, x, H_cycles * (L_cycles + 1) - 1, first_position=True)


@pytest.mark.parametrize("cache_type", [GraphCache, GradGraphCache])
def test_graph_cache_is_not_copied_or_pickled(cache_type):
    cache = cache_type(max_graphs=5)
    cache._graphs["key"] = "a graph"
    assert len(copy.deepcopy(cache)) == 0 and copy.deepcopy(cache).max_graphs == 5
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        restored = pickle.loads(pickle.dumps(cache, protocol=protocol))
        assert type(restored) is cache_type and len(restored) == 0
    model = HRM(tiny_config())
    model.inner.graphs._graphs["key"] = "a graph"
    model.inner.grad_graphs._graphs["key"] = "a graph"
    assert len(copy.deepcopy(model).inner.graphs) == len(copy.deepcopy(model).inner.grad_graphs) == 0
    model.float()  # moved or converted: the graphs would read the old storage
    assert len(model.inner.graphs) == len(model.inner.grad_graphs) == 0


def test_module_tensors_follow_registrations():
    """The cached parameter/buffer list (the graphs' storage key) is listed again after a
    parameter, buffer or submodule is assigned, and the key follows storage changes."""
    model = HRM(tiny_config())
    inner = model.inner

    def listed():
        return list(inner.parameters()) + list(inner.buffers())

    first = module_tensors(inner)
    assert [id(t) for t in first] == [id(t) for t in listed()]
    key = storage_key(first)
    layer = inner.L_level.layers[0].self_attn.o_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())  # a new parameter object
    assert [id(t) for t in module_tensors(inner)] == [id(t) for t in listed()]
    assert storage_key(module_tensors(inner)) != key
    inner.H_level.layers[0].mlp = copy.deepcopy(inner.H_level.layers[0].mlp)  # a new submodule
    assert [id(t) for t in module_tensors(inner)] == [id(t) for t in listed()]
    inner.register_buffer("extra", torch.ones(3))
    assert any(t is inner.extra for t in module_tensors(inner))
    assert [id(t) for t in module_tensors(inner)] == [id(t) for t in listed()]
    key = storage_key(module_tensors(inner))
    inner.q_head.bias.data = inner.q_head.bias.data.clone()  # same object, new storage
    assert storage_key(module_tensors(inner)) != key


GRAPH_CFG = dict(use_gating=True, puzzle_emb_ndim=32, forward_dtype="bfloat16", kernels="triton",
                 halt_exploration_prob=0.0)


def _train(cuda_graphs: bool, state: dict, batches: list[dict], gated: bool):
    """Two optimizer steps (both optimizers' updates land in the parameters the graph reads), then
    three evaluation segments under inference_mode at two batch sizes. Returns every number that
    came out, on the CPU."""
    model = HRM(tiny_config(**{**GRAPH_CFG, "use_gating": gated}, cuda_graphs=cuda_graphs)).cuda()
    model.load_state_dict(state)
    head = ACTLossHead(model)
    opt = AdamATan2(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    record = []
    carry = head.initial_carry(batches[0])
    torch.manual_seed(0)
    for batch in batches:
        head.train()
        carry, loss, metrics, outputs, _ = head(return_keys=("logits", "target_q_continue"), carry=carry,
                                                batch=batch)
        loss.backward()
        record += [loss, outputs["logits"], outputs["target_q_continue"], carry.inner_carry.z_H, carry.inner_carry.z_L]
        record += [p.grad for p in model.parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad(set_to_none=True)
    head.eval()
    with torch.inference_mode():
        for rows in (BATCH, BATCH - 1):  # the last evaluation batch is often smaller: a new graph
            small = {k: v[:rows] for k, v in batches[0].items()}
            c = head.initial_carry(small)
            for segment in range(3):  # the later segments reset into the graph's static inputs
                if segment == 1:
                    c.halted[1] = True  # one row reset mid-batch
                c, _, _, out, _ = head(return_keys=("logits",), carry=c, batch=small)
                record += [out["logits"], c.inner_carry.z_H, c.inner_carry.z_L]
    return [t.detach().float().cpu() for t in record], model


@requires_cuda
@pytest.mark.parametrize("gated, embeddings_in_graph", [(True, False), (False, False), (False, True)])
def test_graphs_give_the_launched_kernels_results(gated, embeddings_in_graph, monkeypatch):
    monkeypatch.setattr(HRMInner, "EMBEDDINGS_IN_GRAPH", embeddings_in_graph)
    torch.manual_seed(7)
    model = HRM(tiny_config(**{**GRAPH_CFG, "use_gating": gated}))
    randomize_(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{k: v.cuda() for k, v in make_batch(None).items()} for _ in range(2)]
    launched, plain = _train(False, state, batches, gated)
    replayed, graphed = _train(True, state, batches, gated)
    assert len(plain.inner.graphs) == len(plain.inner.grad_graphs) == 0
    # training: none (the recurrence before the with-grad calls and the continue-target pass replay
    # inside their graph); evaluation at two batch sizes: gated (with gate stats) the recurrence
    # minus its last two calls, ungated the whole recurrence. The with-grad segment: one pair.
    assert len(graphed.inner.graphs) == 2
    assert len(graphed.inner.grad_graphs) == 1
    if embeddings_in_graph and not gated:  # the evaluation graphs embed the ids themselves: no x copy held
        for _, static_inputs, _ in graphed.inner.graphs._graphs.values():
            assert [t.dtype.is_floating_point for t in static_inputs] == [True, True, False, False]
    assert len(launched) == len(replayed)
    for i, (a, b) in enumerate(zip(launched, replayed)):
        # Same kernels, same inputs, same order: the same bits.
        assert torch.equal(a, b), f"value {i} differs: max |diff| {(a - b).abs().max().item()}"


@requires_cuda
def test_moved_parameters_are_captured_again():
    torch.manual_seed(3)
    model = HRM(tiny_config(**GRAPH_CFG)).cuda()
    randomize_(model)
    batch = {k: v.cuda() for k, v in make_batch(None).items()}
    z = model.inner.empty_carry(BATCH, "cuda")
    x = model.inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    steps = 4  # of tiny_config's 2 * (2 + 1) calls
    model.inner._no_grad_recurrence(z.z_H, z.z_L, x, steps)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone() * 1.5  # new storage, new values
        got = model.inner._no_grad_recurrence(z.z_H, z.z_L, x, steps)
        want = model.inner.recurrence(z.z_H, z.z_L, x, steps)
    assert len(model.inner.graphs) == 2
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _grad_call_setup(seed: int = 5):
    torch.manual_seed(seed)
    model = HRM(tiny_config(**GRAPH_CFG)).cuda()
    randomize_(model)
    inner = model.inner
    batch = {k: v.cuda() for k, v in make_batch(None).items()}
    z = inner.empty_carry(BATCH, "cuda")
    z_H, z_L = torch.randn_like(z.z_H), torch.randn_like(z.z_L)
    return inner, batch, z_H, z_L


def _grad_call_loss(inner, batch, z_H, z_L, scale: float):
    """The with-grad L and H calls on ``scale * z``, a loss of both outputs and the gate stats."""
    x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    h, l, l_stats, h_stats = inner._grad_calls(scale * z_H, scale * z_L, x, stats=True)
    return (h.float().square().mean() + (l.float() * h.float()).mean() + l_stats[:, -1].sum()
            + h_stats[:, -1].sum() + h_stats[:, 0].sum())


@requires_cuda
def test_grad_graphs_accumulate_like_launched_kernels(monkeypatch):
    """Gradient accumulation through the with-grad graphs: forward/backward twice (replays), then
    two forwards before two backwards (the second runs eagerly: the first's activations are still
    needed), gradients summed in .grad as launching the kernels sums them. The parameters' gradient
    accumulators are held from the default stream, as DDP holds them (a capture that synchronised
    with their stream failed under DDP)."""
    inner, batch, z_H, z_L = _grad_call_setup()
    named = [(n, p) for n, p in inner.named_parameters() if n.startswith(("L_level.", "H_level.", "embed_tokens."))]
    params = [p for _, p in named]
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in inner.parameters()]  # noqa: F841

    def run():
        for p in params:
            p.grad = None
        for scale in (1.0, 0.5):
            _grad_call_loss(inner, batch, z_H, z_L, scale).backward()
        first = _grad_call_loss(inner, batch, z_H, z_L, 2.0)
        second = _grad_call_loss(inner, batch, z_H, z_L, -1.0)
        second.backward()
        first.backward()
        return [p.grad.clone() for p in params]

    monkeypatch.setattr(HRMInner, "GRAPH_GRAD_CALLS", False)
    launched = run()
    assert len(inner.grad_graphs) == 0
    monkeypatch.setattr(HRMInner, "GRAPH_GRAD_CALLS", True)
    graphed = run()
    assert len(inner.grad_graphs) == 1
    entry = next(iter(inner.grad_graphs._graphs.values()))
    assert entry.replays == 3 and entry.awaiting is None  # the eager call left no replay behind
    for (name, _), a, b in zip(named, launched, graphed):
        assert a.abs().sum() > 0, name
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item()}"


@requires_cuda
def test_grad_graph_refuses_a_second_backward():
    """Each replay keeps its activations for one backward (the backward graph reuses them): a
    second backward of the same call (retain_graph=True) must fail, before and after another
    call has replayed the graph, not return wrong gradients."""
    inner, batch, z_H, z_L = _grad_call_setup()
    loss = _grad_call_loss(inner, batch, z_H, z_L, 1.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward(retain_graph=True)
    _grad_call_loss(inner, batch, z_H, z_L, 0.5).backward()  # the graph replays again afterwards
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


@requires_cuda
def test_grad_graphs_skip_what_needs_no_gradient(monkeypatch):
    """Frozen L/H modules and embeddings under grad mode: nothing to differentiate, so no capture
    (autograd.grad of nothing fails); anomaly mode (host checks inside the backward): no capture."""
    inner, batch, z_H, z_L = _grad_call_setup()
    inner.requires_grad_(False)
    # detached: the puzzle embedding's training buffer requires grad even with frozen parameters
    x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"]).detach()
    h, l = inner._grad_calls(z_H, z_L, x, stats=False)
    assert not h.requires_grad and len(inner.grad_graphs) == 0
    inner.requires_grad_(True)
    with torch.autograd.detect_anomaly():
        _grad_call_loss(inner, batch, z_H, z_L, 1.0).backward()
    assert len(inner.grad_graphs) == 0
    _grad_call_loss(inner, batch, z_H, z_L, 1.0).backward()
    assert len(inner.grad_graphs) == 1


def test_module_tensors_see_values_replaced_by_apply():
    """``_apply`` (``.double()``) swaps tensors into the modules' tables without a registration:
    the listed tensors are the new ones, and the cache holds no module alive."""
    import gc
    import weakref

    model = HRM(tiny_config())
    module_tensors(model.inner)
    model.double()
    assert [id(t) for t in module_tensors(model.inner)] == [id(t) for t in (*model.inner.parameters(), *model.inner.buffers())]
    assert all(t.dtype == torch.float64 for t in module_tensors(model.inner) if t.is_floating_point())
    linear = torch.nn.Linear(3, 4)
    module_tensors(linear)
    ref = weakref.ref(linear)
    del linear
    gc.collect()
    assert ref() is None


@requires_cuda
def test_grad_graph_cache_on_a_toy_module():
    """GradGraphCache on its own: gradients of inputs and parameters as eagerly, an input that needs
    no gradient gets none, a parameter the function does not use gets no gradient (as eagerly),
    an output that needs none is returned non-differentiable, and new input values are read."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).cuda()
    spare = torch.nn.Linear(2, 2).cuda()  # registered beside, never used
    holder = torch.nn.ModuleList([net, spare])

    def fn(a, b):
        h = net(a) * b[:, :1]
        return h, h.sum(1).detach()

    cache = GradGraphCache()
    for step in range(3):
        a = torch.randn(4, 7, device="cuda", requires_grad=True)
        b = torch.randn(4, 2, device="cuda")
        holder.zero_grad(set_to_none=True)
        out, aux = cache.run("k", fn, (a, b), (holder,))
        assert not aux.requires_grad
        (out.square().sum() + aux.sum()).backward()
        got = [a.grad] + [p.grad for p in net.parameters()]
        assert all(p.grad is None for p in spare.parameters())
        a2 = a.detach().clone().requires_grad_()
        holder.zero_grad(set_to_none=True)
        out2, _ = fn(a2, b)
        out2.square().sum().backward()
        want = [a2.grad] + [p.grad for p in net.parameters()]
        assert torch.allclose(out, out2, rtol=1e-5, atol=1e-6)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), (step, (g - w).abs().max().item())
    assert len(cache) == 1


@requires_cuda
def test_grad_graph_hands_input_grads_uncopied_on_request():
    """``copy_input_grads=False``: an intermediate input's gradient reaches its producer's backward
    as the graph's own buffer (the same storage every step) and the gradients are the eager
    ones; a leaf input's ``.grad`` is still a tensor of its own (autograd copies it); the default
    hands out copies."""
    torch.manual_seed(1)
    net = torch.nn.Linear(6, 4).cuda()
    scale = torch.nn.Parameter(torch.randn(6, device="cuda"))

    def fn(a):
        return (net(a).tanh(),)

    seen = []
    for copies in (True, False):
        cache = GradGraphCache()
        seen.clear()
        for step in range(3):
            base = torch.randn(5, 6, device="cuda")
            a = base * scale  # an intermediate: its gradient flows on to scale
            a.register_hook(seen.append)  # (held: a copy's memory is not reused)
            scale.grad = None
            (out,) = cache.run("k", fn, (a,), (net,), copy_input_grads=copies)
            out.square().sum().backward()
            got = scale.grad.clone()
            scale.grad = None
            (want,) = fn(base * scale)
            want.square().sum().backward()
            assert torch.allclose(got, scale.grad, rtol=1e-5, atol=1e-6), (copies, step)
        assert len({g.data_ptr() for g in seen}) == (3 if copies else 1), copies
        leaf = torch.randn(5, 6, device="cuda", requires_grad=True)
        (out,) = cache.run("k", fn, (leaf,), (net,), copy_input_grads=copies)
        out.sum().backward()
        assert leaf.grad is not None and leaf.grad.data_ptr() not in {g.data_ptr() for g in seen}


class _CountWeightCasts(TorchDispatchMode):
    """Counts casts of the given weights (by storage) to bfloat16."""

    def __init__(self, weights):
        super().__init__()
        self.pointers = {w.data_ptr() for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers
                and kwargs.get("dtype") == torch.bfloat16):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("gated", [True, False])
def test_hoisted_weight_casts_give_the_same_bits_with_one_cast_per_weight(gated, monkeypatch):
    """HOIST_WEIGHT_CASTS: a bf16 recurrence without gradients casts each block (and gate MLP) weight
    once instead of once per module call, and gives the same bits; a recurrence with gradients
    hoists nothing itself (``_grad_calls`` does: test below)."""
    torch.manual_seed(3)
    cfg = tiny_config(use_gating=gated, forward_dtype="bfloat16")
    inner = HRM(cfg).inner
    randomize_(inner)
    batch = make_batch(None)
    x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"]).detach()
    z_H, z_L = (torch.randn_like(x) for _ in range(2))
    steps = cfg["H_cycles"] * (cfg["L_cycles"] + 1)
    gate = 2 if gated else 0  # the gate MLP's two linears
    # qkv, o, gate_up, down per block
    per_call = {"L": 4 * cfg["L_layers"] + gate, "H": 4 * cfg["H_layers"] + gate}
    block_weights = [m.weight for level in (inner.L_level, inner.H_level) for m in level.modules()
                     if isinstance(m, CastedLinear)]
    assert len(block_weights) == per_call["L"] + per_call["H"]
    results, casts = {}, {}
    for hoist in (False, True):
        monkeypatch.setattr(HRMInner, "HOIST_WEIGHT_CASTS", hoist)
        with use_backend("eager"), torch.no_grad(), _CountWeightCasts(block_weights) as counter:  # (bf16 dots: not the interpreter)
            results[hoist] = inner.recurrence(z_H, z_L, x, steps)
        casts[hoist] = counter.count
    assert casts[False] == cfg["H_cycles"] * (cfg["L_cycles"] * per_call["L"] + per_call["H"])
    assert casts[True] == per_call["L"] + per_call["H"]
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    with use_backend("eager"), torch.enable_grad(), _CountWeightCasts(block_weights) as counter:  # autograd: each use its cast
        inner.recurrence(z_H, z_L, x, steps)
    assert counter.count == casts[False]
    linear = inner.L_level.layers[0].self_attn.qkv_proj
    with torch.no_grad(), hoisted_weight_casts([inner.L_level.layers], torch.bfloat16):
        assert linear.weight_as(torch.bfloat16) is linear._weight_cast
        with torch.enable_grad():  # entered without gradients: a use with them casts afresh, tracked by autograd
            fresh = linear.weight_as(torch.bfloat16)
            assert fresh is not linear._weight_cast and fresh.grad_fn is not None
        assert linear.weight_as(torch.float16) is not linear._weight_cast  # another dtype: its own cast
    with hoisted_weight_casts([inner.L_level.layers], torch.bfloat16):  # entered with gradients: autograd's cast
        assert linear.weight_as(torch.bfloat16) is linear._weight_cast and linear._weight_cast.grad_fn is not None
        with torch.no_grad():
            assert linear.weight_as(torch.bfloat16) is linear._weight_cast
    assert all(m._weight_cast is None for m in inner.modules() if hasattr(m, "_weight_cast"))


@pytest.mark.parametrize("gated", [True, False])
def test_a_training_segment_casts_each_weight_once(gated, monkeypatch):
    """With gradients (no CUDA graphs here: the same function the graph captures), the segment's
    calls without gradients, its last L and H calls and the continue target's pass share one
    autograd cast per block (and gate MLP) weight: the same outputs and the same weight gradients,
    bit for bit, as a cast at every use."""
    torch.manual_seed(4)
    cfg = tiny_config(use_gating=gated, forward_dtype="bfloat16", puzzle_emb_ndim=32)
    inner = HRM(cfg).inner
    randomize_(inner)
    batch = make_batch(None)
    carry = inner.empty_carry(3)
    carry.z_H.copy_(torch.randn_like(carry.z_H))
    carry.z_L.copy_(torch.randn_like(carry.z_L))
    block_weights = [m.weight for level in (inner.L_level, inner.H_level) for m in level.modules()
                     if isinstance(m, CastedLinear)]
    results, casts = {}, {}
    for hoist in (False, True):
        monkeypatch.setattr(HRMInner, "HOIST_WEIGHT_CASTS", hoist)
        inner.zero_grad(set_to_none=True)
        with use_backend("eager"), _CountWeightCasts(block_weights) as counter:
            _, logits, (q_halt, _), stats, (next_halt, _) = inner(carry, batch, next_q=True)
            loss = logits.float().square().mean() + q_halt.sum() + (stats.sum() if gated else 0)
        loss.backward()
        casts[hoist] = counter.count
        results[hoist] = [logits, q_halt, next_halt] + [w.grad.clone() for w in block_weights]
    assert casts[True] == len(block_weights)
    assert casts[False] > 2 * len(block_weights)
    for i, (a, b) in enumerate(zip(results[False], results[True])):
        assert torch.equal(a, b), f"value {i}: max |diff| {(a.float() - b.float()).abs().max().item()}"
    assert all(w.grad.abs().sum() > 0 for w in block_weights)


class _CallingGraphs:
    """A stand-in for ``GraphCache`` on the CPU: calls ``fn`` directly and records each call's key and inputs."""

    def __init__(self):
        self.calls = []

    def run(self, key, fn, inputs, donated=0):
        self.calls.append((key, inputs))
        return tuple(fn(*inputs))

    def static_inputs(self, key):
        return None

    def clear(self):
        pass


@pytest.mark.parametrize("pos_encodings", ["rope", "learned"])
def test_evaluation_graph_embeds_the_ids_itself(pos_encodings, monkeypatch):
    """``EMBEDDINGS_IN_GRAPH``: in evaluation mode the whole-recurrence graph is handed the token and
    puzzle ids, not x, and gives the same bits as embedding outside it; in training mode (the puzzle
    embedding stages rows) and with ids on another device it is not taken."""
    torch.manual_seed(3)
    model = HRM(tiny_config(use_gating=False, puzzle_emb_ndim=16, pos_encodings=pos_encodings))
    randomize_(model)
    inner = model.inner
    batch = make_batch(None)
    carry = inner.empty_carry(BATCH)
    monkeypatch.setattr(HRMInner, "_use_graphs", lambda self, x: True)
    results = {}
    for on in (False, True):
        monkeypatch.setattr(HRMInner, "EMBEDDINGS_IN_GRAPH", on)
        inner.graphs = _CallingGraphs()
        model.eval()
        with torch.no_grad():
            new_carry, logits, _, _ = inner(carry, batch, gate_stats=False)
        (key, inputs), = inner.graphs.calls
        assert ("embedded" in key) == on
        assert [t.dtype.is_floating_point for t in inputs] == ([True, True, False, False] if on else [True] * 3)
        results[on] = (new_carry.z_H, new_carry.z_L, logits)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    inner.graphs = _CallingGraphs()
    model.eval()
    inner.puzzle_emb.train()  # a submodule in training mode: embedded outside, as before
    with torch.no_grad():
        inner(carry, {**batch, "puzzle_identifiers": batch["puzzle_identifiers"][:BATCH]}, gate_stats=False)
    assert "embedded" not in inner.graphs.calls[0][0]


class _DonatingGraphs(_CallingGraphs):
    """``GraphCache``'s input handling on the CPU: the first call per key keeps the donated inputs
    themselves and copies of the others as its static buffers; later calls copy in only the inputs
    that are not those buffers (counted), then call ``fn`` on the buffers."""

    def __init__(self):
        super().__init__()
        self.static, self.copies = {}, 0

    def run(self, key, fn, inputs, donated=0):
        self.calls.append((key, inputs))
        if key not in self.static:
            assert not any(t.is_inference() for t in inputs[:donated])
            self.static[key] = tuple(inputs[:donated]) + tuple(t.clone() for t in inputs[donated:])
        for static, value in zip(self.static[key], inputs):
            if value is not static:
                static.copy_(value)
                self.copies += value.dtype.is_floating_point
        return tuple(fn(*self.static[key]))

    def static_inputs(self, key):
        return self.static.get(key)


def _evaluation_segments(model, batch, grad_mode, carry=None):
    """Three evaluation segments through the ACT wrapper, row 1 halted after the first; the outputs
    and carries, each input carry checked unchanged by the call that read it."""
    record = []
    with getattr(torch, grad_mode)():
        if carry is None:
            carry = model.initial_carry(batch)
            carry.inner_carry.z_H.normal_()  # what a reset must replace, not zeros
        for segment in range(3):
            if segment == 1:  # a row halted mid-batch: its states go back to the initial ones
                carry.halted[1] = True
            states = (carry.inner_carry.z_H, carry.inner_carry.z_L)
            before = [t.clone() for t in states]
            new, out = model(carry, batch)
            assert all(torch.equal(a, b) for a, b in zip(before, states))
            carry = new
            record += [out["logits"], out["q_halt_logits"], carry.inner_carry.z_H, carry.inner_carry.z_L]
    return record


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_evaluation_resets_the_carry_into_the_graphs_inputs(grad_mode, monkeypatch):
    """The ACT wrapper's evaluation segments: the halted rows' reset writes the states into the
    graph's static inputs (at the capture into new tensors donated to it, writable outside inference
    mode), so no state is copied in; every segment's outputs equal those without graphs, and the
    caller's carry is left alone."""
    torch.manual_seed(5)
    model = HRM(tiny_config(use_gating=False, puzzle_emb_ndim=16, halt_max_steps=3))
    randomize_(model)
    model.eval()
    batch = make_batch(None)
    torch.manual_seed(0)
    want = _evaluation_segments(model, batch, grad_mode)  # no graphs (on the CPU): the eager reset
    monkeypatch.setattr(HRMInner, "_use_graphs", lambda self, x: True)
    model.inner.graphs = cache = _DonatingGraphs()
    torch.manual_seed(0)
    got = _evaluation_segments(model, batch, grad_mode)
    (key, static), = cache.static.items()
    assert cache.copies == 0 and len(cache.calls) == 3
    assert all(inputs[0] is static[0] and inputs[1] is static[1] for _, inputs in cache.calls)
    assert not static[0].is_inference()
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_evaluation_reset_copies_in_what_it_cannot_write_in_place(monkeypatch):
    """A carry of another dtype than the model's is promoted by the reset (the graph keyed by the
    promoted dtype), and static buffers an earlier capture cloned from a strided carry are not
    written in place: both copied in, with the outputs of the path without graphs."""
    torch.manual_seed(5)
    model = HRM(tiny_config(use_gating=False, puzzle_emb_ndim=16, halt_max_steps=3))
    randomize_(model)
    model.eval()
    batch = make_batch(None)
    strided = model.initial_carry(batch)
    z = strided.inner_carry
    strided.inner_carry = type(z)(*(torch.randn(t.shape[::-1]).transpose(0, 2) for t in (z.z_H, z.z_L)))
    halves = model.initial_carry(batch)
    halves.inner_carry = type(z)(*(torch.randn_like(t).half() for t in (z.z_H, z.z_L)))
    for carry in (strided, halves):
        want = _evaluation_segments(model, batch, "no_grad", copy.deepcopy(carry))
        with monkeypatch.context() as m:
            m.setattr(HRMInner, "_use_graphs", lambda self, x: True)
            model.inner.graphs = cache = _DonatingGraphs()
            if carry is strided:  # a capture without a reset first: its buffers keep the strides
                with torch.no_grad(), use_backend(model.config.kernels):  # (as HRM.forward: one key)
                    model.inner(carry.inner_carry, batch, gate_stats=False)
                assert not next(iter(cache.static.values()))[0].is_contiguous()
            got = _evaluation_segments(model, batch, "no_grad", copy.deepcopy(carry))
        assert cache.copies == (8 if carry is strided else 2)  # every state copied in / the promoted first
        for static in cache.static.values():  # the model's dtype, the half carry's promoted one
            assert static[0].dtype == static[1].dtype == model.inner.H_init.dtype
        for a, b in zip(want, got):
            if carry is strided:  # the same fp32 math on differently strided states: CPU matmuls may
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # sum in another order (~1e-5 seen)
            else:
                assert torch.equal(a, b)
        model.inner.graphs = GraphCache()


@requires_cuda
def test_graph_cache_takes_donated_inputs_and_skips_their_copy():
    """``GraphCache.run(..., donated=1)``: the donated tensor is the static buffer; a later input
    written into ``static_inputs`` is read in place, another tensor is copied in; an inference
    tensor cannot be donated (later calls outside inference mode could not write it)."""
    cache = GraphCache()
    fn = lambda a, b: (a * 2 + b,)  # noqa: E731
    a, b = torch.randn(37, 5, device="cuda"), torch.randn(37, 5, device="cuda")
    (out,) = cache.run("k", fn, (a, b), donated=1)
    static = cache.static_inputs("k")
    assert static[0] is a and static[1] is not b and cache.static_inputs("other") is None
    assert torch.equal(out, a * 2 + b)
    static[0].copy_(torch.randn_like(a))
    new_b = torch.randn_like(b)
    versions = static[0]._version, static[1]._version  # (an in-place copy would count one up)
    (out,) = cache.run("k", fn, (static[0], new_b))
    assert torch.equal(out, static[0] * 2 + new_b)
    assert static[0]._version == versions[0] and static[1]._version > versions[1]
    with torch.inference_mode():
        frozen = torch.randn(3, device="cuda")
    with pytest.raises(ValueError, match="donated input is an inference tensor"):
        cache.run("k2", lambda x: (x + 1,), (frozen,), donated=1)
