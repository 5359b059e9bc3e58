"""Parity of ``hrm`` with an independent implementation of docs/REFERENCE.md.

``spec_*`` below is written from the specification alone (plain tensor math on a state dict with
the reference's key names, explicit softmax attention (in bf16: SDPA, standing for the reference's
FlashAttention), explicit gates), never from the model's modules. Both sides get the same random
weights (all of them perturbed, so that Q heads, init states, puzzle embeddings and gate biases
matter) and the same batches; the model runs with ``kernels=eager``, ``attn_backend=sdpa``,
``forward_dtype=float32`` (and, in ``test_bf16_cast_points_match_spec``, ``bfloat16``: the spec
follows the reference's cast points, listed above ``spec_linear``, and the model's forward must
match it bit for bit).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrm import ACTLossHead, HRM, HRMConfig

VOCAB, SEQ, BATCH, N_PUZZLES = 12, 10, 3, 7
IGNORE = -100


# ---------------------------------------------------------------------------- the specification
#
# Cast points (docs/REFERENCE.md), with ``dt`` = ``cfg["dtype"]``, the forward dtype: parameters
# are fp32 and cast to the activations' dtype where a linear layer or an embedding uses them
# (CastedLinear / CastedEmbedding, biases included); every activation is in ``dt`` and every op
# on it rounds to ``dt`` (residual and injection adds, SwiGLU, gate MLP, sigmoid and blend,
# embedding scales), except: RMSNorm computes in fp32 and casts back, RoPE rotates in its fp32
# tables' dtype and casts back, attention is FlashAttention's (fp32 softmax inside, output in
# ``dt``), the Q head's output is cast to fp32, the losses run in fp32 / float64. ``H_init`` /
# ``L_init`` and the carry are in ``dt``. With ``dt = float32`` every cast is a no-op.


def spec_linear(x, w, b=None):
    """CastedLinear: fp32 weight (and bias) cast to the input's dtype at use."""
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def spec_rmsnorm(x, eps):
    xf = x.to(torch.float32)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def spec_rope_tables(head_dim, positions, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def spec_rotate(x, cos, sin):  # x [B, S, H, d]; rotated in the tables' fp32, cast back
    xf = x.to(cos.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


def spec_attention(P, pre, h, heads, rope):
    B, S, D = h.shape
    d = D // heads
    qkv = spec_linear(h, P[pre + "qkv_proj.weight"]).view(B, S, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
        q, k = spec_rotate(q, *rope), spec_rotate(k, *rope)
    if h.dtype == torch.float32:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    else:
        # Stands for the reference's FlashAttention call: one fused kernel, scores and softmax
        # statistics in fp32, the unnormalised probabilities rounded to the activations' dtype for
        # the product with v (fp32 accumulation), the output in that dtype. SDPA's CPU kernel is
        # such a kernel (for these short sequences it equals that recipe written out bit for
        # bit); the explicit fp32 softmax above, cast back, is the same math but differs from it
        # in the last bits of a third of the outputs, which the recurrence then spreads.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return spec_linear(out.reshape(B, S, D), P[pre + "o_proj.weight"])


def spec_mlp(P, pre, h):
    gate_up = spec_linear(h, P[pre + "gate_up_proj.weight"])
    inter = gate_up.shape[-1] // 2
    return spec_linear(F.silu(gate_up[..., :inter]) * gate_up[..., inter:], P[pre + "down_proj.weight"])


def spec_gates(P, pre, own, other, inj):
    """Materialised gate logits z [B, S, 3D] of a gated module (in the activations' dtype)."""
    cat = torch.cat([own, other, inj if inj is not None else torch.zeros_like(own)], dim=-1)
    g = pre + "gating_network.gate_proj."
    hidden = F.silu(spec_linear(cat, P[g + "0.weight"], P[g + "0.bias"]))
    return spec_linear(hidden, P[g + "2.weight"], P[g + "2.bias"])


def spec_module(P, cfg, pre, n_layers, own, other, inj, rope, record=None):
    if cfg["use_gating"]:
        z = spec_gates(P, pre, own, other, inj)
        D = own.shape[-1]
        g = torch.sigmoid(z)
        h = g[..., :D] * own + g[..., D:2 * D] * other
        if inj is not None:
            h = h + g[..., 2 * D:] * inj
        if record is not None:
            record.append((z, own, other, inj))
    else:  # h + injection, the injection being z_H + x for L (REFERENCE.md's order of the adds)
        h = own + (other + inj if inj is not None else other)
    for i in range(n_layers):
        b = f"{pre}layers.{i}."
        h = spec_rmsnorm(h + spec_attention(P, b + "self_attn.", h, cfg["num_heads"], rope), cfg["eps"])
        h = spec_rmsnorm(h + spec_mlp(P, b + "mlp.", h), cfg["eps"])
    return h


def spec_embed(P, cfg, inputs, puzzle_ids):
    D, dt = cfg["hidden_size"], cfg["dtype"]
    x = P["inner.embed_tokens.embedding_weight"].to(dt)[inputs.long()]
    if cfg["puzzle_emb_ndim"] > 0:
        n_pos = -(-cfg["puzzle_emb_ndim"] // D)
        rows = P["inner.puzzle_emb.weights"][puzzle_ids.long()].to(dt)
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], n_pos * D - rows.shape[1])], dim=-1)
        x = torch.cat([rows.view(-1, n_pos, D), x], dim=1)
    if cfg["pos_encodings"] == "learned":
        x = 0.707106781 * (x + P["inner.embed_pos.embedding_weight"].to(dt))
    return math.sqrt(D) * x


def spec_segment(P, cfg, z_H, z_L, data, record=None):
    """One ACT segment of the core: new (z_H, z_L), logits, q_halt, q_continue."""
    D = cfg["hidden_size"]
    n_pos = -(-cfg["puzzle_emb_ndim"] // D)
    rope = (spec_rope_tables(D // cfg["num_heads"], SEQ + n_pos, 10000.0)
            if cfg["pos_encodings"] == "rope" else None)
    x = spec_embed(P, cfg, data["inputs"], data["puzzle_identifiers"])
    L = lambda zl, zh, rec=None: spec_module(P, cfg, "inner.L_level.", cfg["L_layers"], zl, zh, x, rope, rec)  # noqa: E731
    H = lambda zh, zl, rec=None: spec_module(P, cfg, "inner.H_level.", cfg["H_layers"], zh, zl, None, rope, rec)  # noqa: E731
    with torch.no_grad():
        for i in range(cfg["H_cycles"]):
            for j in range(cfg["L_cycles"]):
                if (i, j) != (cfg["H_cycles"] - 1, cfg["L_cycles"] - 1):
                    z_L = L(z_L, z_H)
            if i != cfg["H_cycles"] - 1:
                z_H = H(z_H, z_L)
    z_L = L(z_L, z_H, record)
    z_H = H(z_H, z_L, record)
    logits = spec_linear(z_H, P["inner.lm_head.weight"])[:, n_pos:]
    q = spec_linear(z_H[:, 0], P["inner.q_head.weight"], P["inner.q_head.bias"]).to(torch.float32)
    return z_H.detach(), z_L.detach(), logits, q[:, 0], q[:, 1]


def spec_act(P, cfg, state, batch, training, record=None):
    """The ACT wrapper; ``state`` = dict(z_H, z_L, steps, halted, data) or None (initial carry)."""
    B = batch["inputs"].shape[0]
    T = SEQ + -(-cfg["puzzle_emb_ndim"] // cfg["hidden_size"])
    dt = cfg["dtype"]
    if state is None:
        zeros = torch.zeros(B, T, cfg["hidden_size"], dtype=dt)
        state = dict(z_H=zeros, z_L=zeros, steps=torch.zeros(B, dtype=torch.int32),
                     halted=torch.ones(B, dtype=torch.bool), data={k: torch.zeros_like(v) for k, v in batch.items()})
    halted = state["halted"]
    z_H = torch.where(halted[:, None, None], P["inner.H_init"].to(dt), state["z_H"])  # init buffers in dt
    z_L = torch.where(halted[:, None, None], P["inner.L_init"].to(dt), state["z_L"])
    steps = torch.where(halted, torch.zeros_like(state["steps"]), state["steps"])
    data = {k: torch.where(halted.view(-1, *[1] * (v.ndim - 1)), batch[k], v) for k, v in state["data"].items()}
    z_H, z_L, logits, q_halt, q_cont = spec_segment(P, cfg, z_H, z_L, data, record)
    out = dict(logits=logits, q_halt_logits=q_halt, q_continue_logits=q_cont)
    steps = steps + 1
    last = steps >= cfg["halt_max_steps"]
    halted = last.clone()
    if training and cfg["halt_max_steps"] > 1:
        halted |= q_halt > q_cont
        explore = torch.rand_like(q_halt) < cfg["halt_exploration_prob"]
        minimum = explore * torch.randint_like(steps, low=2, high=cfg["halt_max_steps"] + 1)
        halted &= steps >= minimum
        with torch.no_grad():
            _, _, _, nh, nc = spec_segment(P, cfg, z_H, z_L, data)
        out["target_q_continue"] = torch.sigmoid(torch.where(last, nh, torch.maximum(nh, nc)))
    return dict(z_H=z_H, z_L=z_L, steps=steps, halted=halted, data=data), out


def spec_loss(cfg, out, labels, loss_type):
    """Total loss of docs/REFERENCE.md's loss head (summed over sequences)."""
    logits = out["logits"]
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    if loss_type == "stablemax_cross_entropy":
        x = logits.double()
        # (the unselected branch clamped: at a logit of exactly 1, which bf16 logits can be, 1 / (1 - x)
        # would be infinite and its zero gradient NaN; the values are REFERENCE.md's s(x))
        s = torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))
        logp = torch.log(s / s.sum(-1, keepdim=True))
    else:
        logp = torch.log_softmax(logits.float(), -1)
    tok = -logp.gather(-1, safe[..., None]).squeeze(-1) * valid
    n_valid = valid.sum(-1)
    lm = (tok.sum(-1) / n_valid.clamp_min(1)).sum()
    exact = ((logits.argmax(-1) == labels) | ~valid).all(-1)
    q_halt = F.binary_cross_entropy_with_logits(out["q_halt_logits"], exact.float(), reduction="sum")
    total = lm + 0.5 * q_halt
    if "target_q_continue" in out:
        total = total + 0.5 * F.binary_cross_entropy_with_logits(out["q_continue_logits"], out["target_q_continue"],
                                                                  reduction="sum")
    return total


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tiny ops run far faster on one thread (and do not stall when the CPU is shared)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides):
    cfg = dict(batch_size=BATCH, seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=N_PUZZLES, hidden_size=32,
               num_heads=2, H_layers=1, L_layers=2, H_cycles=2, L_cycles=2, expansion=2.0, halt_max_steps=3,
               halt_exploration_prob=0.5, forward_dtype="float32", kernels="eager", attn_backend="sdpa")
    cfg.update(overrides)
    return cfg


def spec_cfg(config: HRMConfig) -> dict:
    return dict(hidden_size=config.hidden_size, num_heads=config.num_heads, H_layers=config.H_layers,
                L_layers=config.L_layers, H_cycles=config.H_cycles, L_cycles=config.L_cycles,
                puzzle_emb_ndim=config.puzzle_emb_ndim, pos_encodings=config.pos_encodings,
                halt_max_steps=config.halt_max_steps, halt_exploration_prob=config.halt_exploration_prob,
                use_gating=config.use_gating, eps=config.rms_norm_eps, dtype=getattr(torch, config.forward_dtype))


def randomize_(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Perturb every weight and buffer in the state dict so that none of them is trivial."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.add_(scale * torch.randn_like(t) * (1.0 if t.dim() < 2 else t.shape[-1] ** -0.5 / scale * 0.5 + 1e-3))


def make_batch(cfg, *, ignore_some=True):
    inputs = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    if ignore_some:
        labels[0, :3] = IGNORE
        labels[1] = IGNORE  # a sequence with no labels at all
    return dict(inputs=inputs, labels=labels, puzzle_identifiers=torch.randint(0, N_PUZZLES, (BATCH,)))


def spec_params(module: torch.nn.Module) -> dict:
    """The model's state dict under the bare model's names (``inner.*``), as independent leaves."""
    return {k.removeprefix("model."): v.detach().clone().float().requires_grad_(v.is_floating_point())
            for k, v in module.state_dict().items()}


def assert_close(name, got, want, rtol=2e-5):
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().clamp_min(1.0)
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} > {rtol:.0e} x {scale:.3e}"


def assert_equal(name, got, want):
    """Same dtype, shape and bits (``torch.equal``)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        differ = got != want
        err = (got.detach().double() - want.detach().double()).abs().max()
        raise AssertionError(f"{name}: {int(differ.sum())} of {got.numel()} elements differ, max abs error {err:.3e}")


# ---------------------------------------------------------------------------- tests


CASES = [
    pytest.param(dict(use_gating=False, pos_encodings="rope", puzzle_emb_ndim=32), id="ungated-rope-puzzle"),
    pytest.param(dict(use_gating=False, pos_encodings="learned", puzzle_emb_ndim=0), id="ungated-learned-nopuzzle"),
    pytest.param(dict(use_gating=True, pos_encodings="rope", puzzle_emb_ndim=0), id="gated-rope-nopuzzle"),
    pytest.param(dict(use_gating=True, pos_encodings="learned", puzzle_emb_ndim=48), id="gated-learned-puzzle2"),
    # learned positions allow an odd head_dim (15 / 5 = 3), which the RoPE kernels cannot take
    pytest.param(dict(use_gating=True, pos_encodings="learned", puzzle_emb_ndim=0, hidden_size=15, num_heads=5),
                 id="gated-learned-oddhead"),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("overrides", CASES)
def test_parity_with_spec(overrides, training):
    config = HRMConfig(**tiny_config(**overrides))
    model = HRM(config)
    randomize_(model)
    head = ACTLossHead(model)
    head.train(training)
    P = spec_params(model)
    cfg = spec_cfg(config)

    carry, state = None, None
    for segment in range(4):  # past halt_max_steps: halted rows reload data and restart
        batch = make_batch(config)
        if carry is None:
            carry = head.initial_carry(batch)
        seed = 1000 + segment
        torch.manual_seed(seed)
        carry, loss, metrics, outputs, all_halted = head(
            return_keys=("logits", "q_halt_logits", "q_continue_logits", "target_q_continue"), carry=carry, batch=batch)
        torch.manual_seed(seed)
        state, ref = spec_act(P, cfg, state, batch, training)

        for key in ("logits", "q_halt_logits", "q_continue_logits") + (("target_q_continue",) if training else ()):
            assert key in outputs, key
            assert_close(f"segment {segment} {key}", outputs[key], ref[key])
        assert torch.equal(carry.halted, state["halted"]), (segment, carry.halted, state["halted"])
        assert torch.equal(carry.steps, state["steps"])
        assert_close("z_H", carry.inner_carry.z_H, state["z_H"])
        assert_close("z_L", carry.inner_carry.z_L, state["z_L"])
        assert_close("loss", loss, spec_loss(cfg, ref, state["data"]["labels"], config.loss.loss_type))
        assert bool(all_halted) == bool(state["halted"].all())
        # Continue from the model's states: float32 rounding differences (sdpa vs explicit
        # softmax) otherwise compound over the recurrence; each segment is checked on its own.
        state["z_H"], state["z_L"] = carry.inner_carry.z_H.clone(), carry.inner_carry.z_L.clone()
    if not training:  # evaluation: every row runs exactly halt_max_steps segments
        assert int(carry.steps.max()) <= config.halt_max_steps


@pytest.mark.parametrize("overrides", [CASES[0], CASES[3]])
def test_one_step_gradient_matches_spec(overrides):
    """Gradients of the total loss (one-step gradient through the last L and H calls only) w.r.t.
    every parameter, and w.r.t. the batch's puzzle-embedding rows."""
    config = HRMConfig(**tiny_config(**overrides, halt_exploration_prob=0.0))
    model = HRM(config)
    randomize_(model)
    head = ACTLossHead(model, loss_type="softmax_cross_entropy")
    head.train()
    P = spec_params(model)
    cfg = spec_cfg(config)
    batch = make_batch(config)
    batch["puzzle_identifiers"] = torch.randperm(N_PUZZLES)[:BATCH]  # distinct rows: one leaf each below
    torch.manual_seed(0)
    _, loss, _, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    loss.backward()

    if config.puzzle_emb_ndim > 0:  # the table is a buffer: the rows of the batch get the gradient
        table = P["inner.puzzle_emb.weights"]
        rows = table.detach()[batch["puzzle_identifiers"]].clone().requires_grad_(True)
        P["inner.puzzle_emb.weights"] = table.detach().index_put((batch["puzzle_identifiers"],), rows)
    torch.manual_seed(0)
    state, ref = spec_act(P, cfg, None, batch, training=True)
    spec_loss(cfg, ref, state["data"]["labels"], "softmax_cross_entropy").backward()

    named = dict(head.named_parameters())
    assert named, "no parameters"
    for name, param in named.items():
        ref_grad = P[name.removeprefix("model.")].grad
        assert param.grad is not None and ref_grad is not None, name
        assert_close(f"grad {name}", param.grad, ref_grad, rtol=5e-5)
    if config.puzzle_emb_ndim > 0:
        assert_close("puzzle rows grad", model.inner.puzzle_emb.local_weights.grad, rows.grad, rtol=5e-5)


BF16_CASES = [
    pytest.param(dict(use_gating=False, pos_encodings="rope"), id="ungated-rope"),
    pytest.param(dict(use_gating=False, pos_encodings="learned"), id="ungated-learned"),
    pytest.param(dict(use_gating=True, pos_encodings="rope"), id="gated-rope"),
    pytest.param(dict(use_gating=True, pos_encodings="learned"), id="gated-learned"),
]


@pytest.mark.parametrize("overrides", BF16_CASES)
def test_bf16_cast_points_match_spec(overrides):
    """``forward_dtype=bfloat16``: three training-mode ACT segments (rows halting at different
    segments, so that some continue on their carry while others restart from H_init / L_init),
    puzzle embedding over 2 positions. Every segment's logits, Q logits, Q target and new carry
    equal the bf16 spec's bit for bit, which pins each cast point of REFERENCE.md (a residual add,
    RMSNorm, RoPE, positions or gates computed in another dtype, a weight cast elsewhere, init
    states or Q head in fp32: each of these changes bits). The total loss (fp32 / float64 math on
    those outputs) agrees to float64 rounding only: the spec sums a sequence's token losses, then
    divides (REFERENCE.md's wording), the model divides each token's loss, then sums.

    Parameter gradients of each segment's step (and those of the puzzle-embedding table, summed per
    puzzle id from the per-batch rows as the sign-SGD optimizer does) are not compared bit for
    bit: the model's backward adds the residual branch's gradient inside the input-gradient matmul
    (``Block.FUSED_GRAD_RESIDUAL``), one bf16 rounding fewer than autograd's separate add, and
    that difference propagates. Bounds, with bf16's eps = 2^-7, set from 40 seeds x these 4
    models x 3 segments (480 steps): over all parameters together, the model is at most half as
    far from the bf16 spec as the fp32 spec is, ``|g - g_spec| <= 0.5 |g_spec_fp32 - g_spec|``
    (measured: median 0.14, max 0.34), i.e. its gradients follow bf16 arithmetic with the
    reference's cast points, not another precision; per parameter, ``|g - g_spec| <= 16 eps
    |g_spec|`` (measured: 99th percentile 1.6 eps, max 6.1 eps, on the L gate's first bias, whose
    gradient sums terms that mostly cancel: there the fp32 spec is 20 eps away), a check against
    a gradient path that is missing or scaled, which is off by O(1)."""
    torch.manual_seed(0)
    config = HRMConfig(**tiny_config(**overrides, puzzle_emb_ndim=48, forward_dtype="bfloat16"))
    model = HRM(config)
    randomize_(model)
    with torch.no_grad():  # q_halt > q_continue everywhere: rows halt as soon as exploration allows
        model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    head = ACTLossHead(model)
    head.train()
    P, P32 = spec_params(model), spec_params(model)  # leaves of the bf16 spec and of the fp32 spec
    cfg = spec_cfg(config)
    cfg32 = dict(cfg, dtype=torch.float32)
    assert cfg["dtype"] == torch.bfloat16 and config.puzzle_emb_len == 2
    eps = torch.finfo(torch.bfloat16).eps
    keys = ("logits", "q_halt_logits", "q_continue_logits", "target_q_continue")
    names = [name.removeprefix("model.") for name, _ in head.named_parameters()] + ["inner.puzzle_emb.weights"]

    carry, state, mixed = None, None, False
    for segment in range(3):
        batch = make_batch(config)
        if carry is None:
            carry = head.initial_carry(batch)
        else:  # some rows continue on their carry while others restart from the init states
            mixed |= bool(carry.halted.any() and not carry.halted.all())
        seed = 2000 + segment
        torch.manual_seed(seed)
        carry, loss, _, outputs, _ = head(return_keys=keys, carry=carry, batch=batch)
        loss.backward()
        before = state
        torch.manual_seed(seed)
        state, ref = spec_act(P, cfg, before, batch, training=True)
        ref_loss = spec_loss(cfg, ref, state["data"]["labels"], config.loss.loss_type)
        ref_loss.backward()

        for key in keys:
            assert_equal(f"segment {segment} {key}", outputs[key], ref[key])
        assert outputs["logits"].dtype == torch.bfloat16 and outputs["q_halt_logits"].dtype == torch.float32
        assert_equal(f"segment {segment} z_H", carry.inner_carry.z_H, state["z_H"])
        assert_equal(f"segment {segment} z_L", carry.inner_carry.z_L, state["z_L"])
        assert torch.equal(carry.halted, state["halted"]) and torch.equal(carry.steps, state["steps"])
        assert loss.dtype == ref_loss.dtype == torch.float64
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item()), (segment, loss, ref_loss)

        # the fp32 spec from the same carry and data: the scale of bf16's effect on the gradients
        torch.manual_seed(seed)
        before32 = None if before is None else dict(before, z_H=before["z_H"].float(), z_L=before["z_L"].float())
        state32, ref32 = spec_act(P32, cfg32, before32, batch, training=True)
        spec_loss(cfg32, ref32, state32["data"]["labels"], config.loss.loss_type).backward()

        named = {name.removeprefix("model."): p.grad for name, p in head.named_parameters()}
        ids = carry.current_data["puzzle_identifiers"].long()
        table_grad = torch.zeros_like(P["inner.puzzle_emb.weights"])
        named["inner.puzzle_emb.weights"] = table_grad.index_add_(0, ids, model.inner.puzzle_emb.local_weights.grad)
        err2 = ref2 = 0.0
        for name in names:
            got, want, want32 = named[name], P[name].grad, P32[name].grad
            assert got is not None and want is not None and want32 is not None, name
            assert bool(torch.isfinite(got).all()), name
            err, scale = (got - want).norm().item(), want.norm().item()
            assert err <= 16 * eps * scale, f"segment {segment} grad {name}: |error| {err:.3e} > 16 eps x {scale:.3e}"
            err2 += err ** 2
            ref2 += (want32 - want).norm().item() ** 2
        assert err2 ** 0.5 <= 0.5 * ref2 ** 0.5, (segment, err2 ** 0.5, ref2 ** 0.5)

        # next step from clean gradients (local_weights is a buffer: zero_grad leaves it)
        head.zero_grad(set_to_none=True)
        model.inner.puzzle_emb.local_weights.grad = None
        for leaves in (P, P32):
            for t in leaves.values():
                t.grad = None
    assert mixed, "no segment had both continuing and restarting rows"


@pytest.mark.parametrize("puzzle_emb_ndim", [0, 48], ids=["no_puzzle", "puzzle_2_positions"])
def test_prescaled_embeddings_same_input_and_gradients(monkeypatch, puzzle_emb_ndim):
    """``HRMInner.PRESCALED_EMBEDDINGS``: the bf16 input embedding (scale on the table and the
    puzzle rows, before the lookup) equals the spec's bit for bit, and the token table's and the
    puzzle rows' gradients agree with the unscaled path's to bf16 rounding (the sums of rows and
    the scale are rounded in the other order: a few bf16 eps of each value, against a wrong
    or missing scale's O(1))."""
    from hrm.model import HRMInner

    torch.manual_seed(4)
    config = HRMConfig(**tiny_config(puzzle_emb_ndim=puzzle_emb_ndim, forward_dtype="bfloat16"))
    model = HRM(config)
    randomize_(model)
    model.train()
    inner = model.inner
    batch = make_batch(config)
    want = spec_embed(spec_params(model), spec_cfg(config), batch["inputs"], batch["puzzle_identifiers"])
    grads = {}
    for on in (False, True):
        monkeypatch.setattr(HRMInner, "PRESCALED_EMBEDDINGS", on)
        model.zero_grad(set_to_none=True)
        if puzzle_emb_ndim:
            inner.puzzle_emb.local_weights.grad = None
        x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
        assert_equal(f"input embedding (prescaled={on})", x, want)
        (x.float() * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        grads[on] = [inner.embed_tokens.embedding_weight.grad] + (
            [inner.puzzle_emb.local_weights.grad] if puzzle_emb_ndim else [])
    for got, ref in zip(grads[True], grads[False]):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=4 * 2 ** -7, atol=4 * 2 ** -7 * ref.abs().max().item())


def test_softmax_and_stablemax_losses_match_spec():
    for loss_type in ("stablemax_cross_entropy", "softmax_cross_entropy"):
        config = HRMConfig(**tiny_config(loss={"loss_type": loss_type}))
        model = HRM(config)
        randomize_(model)
        head = ACTLossHead(model)
        head.eval()
        assert head.loss_type == loss_type
        batch = make_batch(config)
        _, loss, metrics, _, _ = head(carry=head.initial_carry(batch), batch=batch)
        _, ref = spec_act(spec_params(model), spec_cfg(config), None, batch, training=False)
        assert_close(loss_type, loss, spec_loss(spec_cfg(config), ref, batch["labels"], loss_type))
        assert set(metrics) >= {"count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss",
                                "q_halt_loss"}


def test_metrics_follow_reference_definitions():
    config = HRMConfig(**tiny_config(halt_max_steps=1))
    model = HRM(config)
    randomize_(model)
    head = ACTLossHead(model)
    head.train()
    batch = make_batch(config)
    carry, _, metrics, outputs, all_halted = head(return_keys=("logits", "labels"), carry=head.initial_carry(batch),
                                                  batch=batch)
    assert bool(all_halted)  # halt_max_steps=1: every row halts after one segment
    labels = outputs["labels"]
    valid = labels != IGNORE
    correct = (outputs["logits"].argmax(-1) == labels) & valid
    counted = valid.any(-1)  # row 1 has no labels: not counted
    assert int(metrics["count"]) == int(counted.sum()) == BATCH - 1
    acc = (correct.sum(-1).float() / valid.sum(-1).clamp_min(1))[counted].sum()
    assert_close("accuracy", metrics["accuracy"], acc)
    exact = (correct.sum(-1) == valid.sum(-1)) & counted
    assert int(metrics["exact_accuracy"]) == int(exact.sum())
    assert int(metrics["steps"]) == int(counted.sum())
    assert "q_continue_loss" not in metrics  # no Q target when halt_max_steps == 1
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0


@pytest.mark.parametrize("gated", [False, True])
def test_a_segment_without_metrics_gives_the_same_carry_and_outputs(gated):
    """``metrics=False`` (evaluation's segments before the last): no loss, no metrics (gated: no
    gate stats either), the same carry, requested outputs and all-halted flag as the full call."""
    config = HRMConfig(**tiny_config(halt_max_steps=3, use_gating=gated))
    model = HRM(config)
    randomize_(model)
    head = ACTLossHead(model)
    head.eval()
    batch = make_batch(config)
    runs = []
    for metrics in (True, False):
        with torch.no_grad():
            carry = head.initial_carry(batch)
            for _ in range(2):
                carry, loss, got, outputs, all_halted = head(return_keys=("logits", "labels", "preds", "gate_stats"),
                                                             metrics=metrics, carry=carry, batch=batch)
        assert (loss is None and got == {}) == (not metrics)
        assert ("gate_stats" in outputs) == (gated and metrics)  # no stats computed for a segment without metrics
        runs.append([carry.inner_carry.z_H, carry.inner_carry.z_L, carry.steps, carry.halted,
                     outputs["logits"], outputs["labels"], outputs["preds"], all_halted])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_initialisation_follows_spec():
    config = HRMConfig(**tiny_config(hidden_size=64, expansion=4.0, use_gating=True, puzzle_emb_ndim=64,
                                     pos_encodings="learned"))
    inner = HRM(config).inner
    assert torch.all(inner.q_head.weight == 0) and torch.all(inner.q_head.bias == -5)
    assert torch.all(inner.puzzle_emb.weights == 0)
    gate = inner.L_level.gating_network.gate_proj
    assert gate[0].weight.shape == (16, 192) and gate[2].weight.shape == (192, 16)
    assert torch.all(gate[2].bias == -2.2) and torch.all(gate[0].bias == 0)
    assert inner.L_level.layers[0].mlp.down_proj.weight.shape == (64, 256)  # round(64*4*2/3)=171 -> 256
    w = inner.L_level.layers[0].self_attn.qkv_proj.weight  # [192, 64]: LeCun std 1/8, truncated at 2 std
    assert abs(w.std().item() - 64 ** -0.5) < 0.01 and w.abs().max() <= 2 * 64 ** -0.5 / 0.8796 + 1e-6
    emb = inner.embed_tokens.embedding_weight
    assert emb.abs().max() <= 2 * 64 ** -0.5 / 0.8796 + 1e-6
    assert inner.H_init.shape == (64,) and inner.H_init.abs().max() <= 2 / 0.8796 + 1e-6
    assert inner.H_init.dtype == torch.float32


def test_truncated_normal_std_is_corrected_for_truncation():
    from hrm.layers import trunc_normal_
    x = trunc_normal_(torch.empty(400_000), std=0.5)
    assert abs(x.std().item() - 0.5) < 0.005
    assert x.abs().max() <= 2 * 0.5 / 0.87962566 + 1e-6  # cut at 2 of the underlying normal's std


def test_eval_mode_halts_every_row_exactly_at_halt_max_steps():
    """What train/pretrain.py's evaluate relies on to run the segments without a host check after
    each: in eval mode no row halts early (no Q-halting, no exploration), every row at the last."""
    torch.manual_seed(5)
    head = ACTLossHead(HRM(tiny_config(halt_max_steps=4)))
    randomize_(head)
    with torch.no_grad():  # Q-halting would stop rows at the first segment in training mode
        head.model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    head.eval()
    batch = make_batch(None)
    with torch.inference_mode():
        carry = head.initial_carry(batch)
        for segment in range(1, 5):
            carry, _, _, _, all_finish = head(carry=carry, batch=batch, return_keys=())
            assert bool(all_finish) == (segment == 4)
            assert bool(carry.halted.any()) == (segment == 4)
