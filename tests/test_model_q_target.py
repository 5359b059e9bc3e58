"""The continue target's pass (``HRMInner.q_values``): the segment's last H block computed for
position 0 alone (``Block.first_position``, ``Attention.first_query_heads``) gives the Q values of
the whole segment, with the work of the other positions' queries, MLPs and logits left out."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hrm import HRM
from hrm.layers import Block, RotaryEmbedding
from hrm.model import HRMInner
from hrm_kernels import use_backend
from hrm_kernels.backend import triton_can_run
from tests.conftest import requires_cuda
from tests.test_model_spec import (CASES, assert_close, make_batch, randomize_, spec_attention, spec_mlp,
                                   spec_rmsnorm, tiny_config)

needs_triton = pytest.mark.skipif(not triton_can_run(torch.device("cpu")),
                                  reason="Triton's interpreter is off (TRITON_INTERPRET unset)")


def _block_case(hidden, heads, intermediate, seq, rope):
    """A randomized fp32 block, its input, RoPE tables (or None) and the float64 specification of
    its output at position 0 (docs/REFERENCE.md's block in plain tensor math)."""
    torch.manual_seed(11)
    block = Block(hidden, heads, intermediate, eps=1e-5, attn_backend="sdpa")
    randomize_(block)
    h = torch.randn(5, seq, hidden)
    cos_sin = RotaryEmbedding(hidden // heads, seq, 10000.0)() if rope else None
    P = {k: v.double() for k, v in block.state_dict().items()}
    h64 = h.double()
    rope64 = tuple(t.double() for t in cos_sin) if rope else None
    h64 = spec_rmsnorm(h64 + spec_attention(P, "self_attn.", h64, heads, rope64), 1e-5)
    want = spec_rmsnorm(h64 + spec_mlp(P, "mlp.", h64), 1e-5)[:, :1]
    return block, h, cos_sin, want


def _max_error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("kernels", ["eager", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_block_first_position_is_position_zero_of_the_block(rope, kernels):
    """Odd sizes (hidden 40 over 2 heads, 37 intermediate, 13 positions), fp32 against the float64
    specification: within 4x the error of the whole block's fp32 output at position 0 (the same
    math on other matmul shapes; in the interpreter, Triton's RoPE on strided keys and the
    add+RMSNorm and SwiGLU kernels on one position)."""
    block, h, cos_sin, want = _block_case(40, 2, 37, 13, rope)
    with use_backend(kernels), torch.no_grad():
        whole = block(h, cos_sin)[:, :1]
        got = block.first_position(h, cos_sin)
    assert got.shape == (5, 1, 40) and got.dtype == torch.float32
    assert _max_error(got, want) <= 4 * _max_error(whole, want) + 1e-6


@pytest.mark.parametrize("H_layers", [1, 2])
@pytest.mark.parametrize("overrides", CASES)
def test_q_values_match_the_whole_segment(overrides, H_layers, monkeypatch):
    """fp32 model: Q values from the trimmed pass and from ``forward`` (what the reference runs)
    agree to fp32 rounding (the same tolerance as the parity test with the specification)."""
    torch.manual_seed(5)
    model = HRM(tiny_config(**overrides, H_layers=H_layers))
    randomize_(model)
    inner = model.inner
    batch = make_batch(None)
    carry = inner.reset_carry(torch.tensor([True, False, False]), inner.empty_carry(3))
    carry.z_H.add_(torch.randn_like(carry.z_H))  # rows that are not at their initial state
    with torch.no_grad():
        want = inner(carry, batch, gate_stats=False)[2]
        got = inner.q_values(carry, batch)
        monkeypatch.setattr(HRMInner, "Q_TARGET_FIRST_POSITION", False)
        untrimmed = inner.q_values(carry, batch)
    for name, g, u, w in zip(("q_halt", "q_continue"), got, untrimmed, want):
        assert g.dtype == torch.float32 and g.shape == (3,)
        assert_close(name, g, w)
        assert torch.equal(u, w)  # switched off: exactly forward


def test_q_values_leave_out_the_other_positions_work(monkeypatch):
    """Counted matmul FLOPs: the trimmed pass does exactly the full pass's work less the logits and,
    in the last H block, the queries, output projection and MLP of positions 1..S-1."""
    model = HRM(tiny_config(use_gating=True, puzzle_emb_ndim=32))
    inner, cfg = model.inner, model.config
    batch = make_batch(None)
    carry = inner.empty_carry(3)

    def matmul_flops():
        with use_backend("eager"), FlopCounterMode(display=False) as counter, torch.no_grad():  # (Triton's are not counted)
            inner.q_values(carry, batch)
        counts = counter.get_flop_counts()["Global"]
        return sum(n for op, n in counts.items() if "attention" not in str(op))

    trimmed = matmul_flops()
    monkeypatch.setattr(HRMInner, "Q_TARGET_FIRST_POSITION", False)
    full = matmul_flops()
    B, S, D, I, V = 3, cfg.total_seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    others = 2 * B * (S - 1) * D * (D + D + 2 * I + I)  # q, o, gate_up, down of positions 1..S-1
    assert full - trimmed == others + 2 * B * S * D * V  # ... and the logits


@requires_cuda
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_q_values_in_bfloat16_on_the_gpu(gated, monkeypatch):
    """bf16, Triton kernels, CUDA graphs (the training configuration), 257 sequences: the trimmed
    pass against the whole segment. Different matmul shapes round differently, and the Q head reads
    a bf16 hidden state: within 4 bf16 roundings (eps 2^-7) of the largest |q|."""
    torch.manual_seed(9)
    model = HRM(tiny_config(use_gating=gated, puzzle_emb_ndim=32, forward_dtype="bfloat16", kernels="triton",
                            batch_size=257, hidden_size=128, num_heads=2, seq_len=81)).cuda()
    randomize_(model)
    inner = model.inner
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(0, 12, (257, 81), generator=g).cuda(),
             "puzzle_identifiers": torch.randint(0, 7, (257,), generator=g).cuda()}
    carry = inner.empty_carry(257)
    carry.z_H.copy_(torch.randn_like(carry.z_H))
    carry.z_L.copy_(torch.randn_like(carry.z_L))
    with torch.no_grad():
        got = inner.q_values(carry, batch)
        monkeypatch.setattr(HRMInner, "Q_TARGET_FIRST_POSITION", False)
        want = inner.q_values(carry, batch)
    for name, g_, w in zip(("q_halt", "q_continue"), got, want):
        bound = 4 * 2.0 ** -7 * w.abs().max().item()
        err = (g_ - w).abs().max().item()
        assert err <= bound, f"{name}: max |diff| {err:.3e} > {bound:.3e}"
        assert w.abs().max() > 0.5  # the Q head is not trivial


def _next_q_case(device: str, **overrides):
    torch.manual_seed(13)
    model = HRM(tiny_config(**overrides)).to(device)
    randomize_(model)
    inner = model.inner
    batch = {k: v.to(device) for k, v in make_batch(None).items()}
    carry = inner.empty_carry(3, device)
    carry.z_H.copy_(torch.randn_like(carry.z_H))
    carry.z_L.copy_(torch.randn_like(carry.z_L))
    return inner, batch, carry


def _assert_next_q_is_q_values(inner, batch, carry):
    """``forward(..., next_q=True)``'s fifth item is exactly ``q_values`` of its new carry (the same
    kernels on the same inputs), and computing it leaves the rest of the output unchanged."""
    plain = inner(carry, batch)
    new_carry, *rest, (next_halt, next_continue) = inner(carry, batch, next_q=True)
    assert torch.equal(new_carry.z_H, plain[0].z_H) and torch.equal(new_carry.z_L, plain[0].z_L)
    for a, b in zip(rest[1], plain[2]):
        assert torch.equal(a, b)
    want_halt, want_continue = inner.q_values(new_carry, batch)
    assert not next_halt.requires_grad and next_halt.shape == (3,) and next_halt.dtype == torch.float32
    assert torch.equal(next_halt, want_halt) and torch.equal(next_continue, want_continue)
    assert want_halt.abs().max() > 0  # the Q head is not trivial


@pytest.mark.parametrize("fused", [True, False], ids=["in_grad_graph", "separate"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_next_q_is_q_values_of_the_new_carry(gated, fused, monkeypatch):
    """CPU, eager kernels: with gradients on, the continue target computed inside ``_grad_calls``
    (``Q_TARGET_IN_GRAD_GRAPH``) or by a separate ``q_values`` call gives the same bits."""
    monkeypatch.setattr(HRMInner, "Q_TARGET_IN_GRAD_GRAPH", fused)
    inner, batch, carry = _next_q_case("cpu", use_gating=gated, puzzle_emb_ndim=32)
    with use_backend("eager"):
        _assert_next_q_is_q_values(inner, batch, carry)


@requires_cuda
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_next_q_in_the_grad_graph_is_q_values(gated):
    """bf16, Triton kernels, CUDA graphs: the continue target replayed inside the with-gradient
    segment's graph gives the bits of the separate ``q_values`` pass (its own graph)."""
    inner, batch, carry = _next_q_case("cuda", use_gating=gated, puzzle_emb_ndim=32, forward_dtype="bfloat16",
                                       kernels="triton", cuda_graphs=True)
    _assert_next_q_is_q_values(inner, batch, carry)
    assert len(inner.grad_graphs) == 1
