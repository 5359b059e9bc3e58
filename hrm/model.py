"""The Hierarchical Reasoning Model: recurrent core (``HRMInner``) and ACT wrapper (``HRM``).

One ACT segment of the core (docs/REFERENCE.md, "The recurrent core")::

    x = embed(inputs, puzzle_ids)
    no grad:  for i < H_cycles, j < L_cycles, except the last (i, j):  z_L = L(z_L, z_H, x)
              after each i but the last:                                 z_H = H(z_H, z_L)
    grad:     z_L = L(z_L, z_H, x);  z_H = H(z_H, z_L)                   (the one-step gradient)
    logits = lm_head(z_H)[:, puzzle_emb_len:];  (q_halt, q_continue) = q_head(z_H[:, 0])

where a module's input is ``own + other + inj`` (ungated) or ``gated_blend(own, other, inj)``
(gated; H's injection is zeros, ``inj=None``), followed by its post-norm blocks.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hrm_kernels import _math, add3, gated_blend, get_backend, rms_norm, use_backend
from hrm_kernels._gluon_gemm import shared_weight_layouts
from hrm_kernels.normed_add import normed_add
from hrm_kernels.precompile import compiling_ahead
from hrm_kernels.reset_rows import reset_rows, reset_rows_reference
from hrm.config import HRMConfig
from hrm.cuda_graphs import GradGraphCache, GraphCache, module_tensors, storage_key
from hrm.layers import (Attention, Block, CastedEmbedding, CastedLinear, RotaryEmbedding, SwiGLUMLP,
                        hoisted_weight_casts, trunc_normal_)
from hrm.sparse_embedding import CastedSparseEmbedding

# the kernel module whose switch changes what a captured graph records (the package exports a
# function under the same name)
_swiglu_linear_module = importlib.import_module("hrm_kernels.swiglu_linear")
_linear_swiglu_module = importlib.import_module("hrm_kernels.linear_swiglu")
_gated_blend_module = importlib.import_module("hrm_kernels.gated_blend")  # (the package exports the function)
_rope_attention_module = importlib.import_module("hrm_kernels.rope_attention")

LEARNED_POS_SCALE = 0.707106781  # the reference's constant (1/sqrt(2) to 9 digits)


@dataclass
class HRMInnerCarry:
    z_H: torch.Tensor  # [batch, total_seq_len, hidden], forward dtype
    z_L: torch.Tensor


class PendingNorm(NamedTuple):
    """A module's output state whose closing RMSNorm has not run: its value is ``rms_norm(h)``
    (``h`` [batch, seq, hidden], ``ss`` [batch * seq, T] fp32 partial sums of squares of h's rows,
    ``hrm_kernels.deferred_norm``). The ungated module input reads it through ``normed_add``."""

    h: torch.Tensor
    ss: torch.Tensor
    eps: float

    def close(self) -> torch.Tensor:
        return rms_norm(self.h, eps=self.eps)


def closed(state) -> torch.Tensor:
    """The state as a tensor (a ``PendingNorm`` closed)."""
    return state.close() if isinstance(state, PendingNorm) else state


@dataclass
class HRMCarry:
    inner_carry: HRMInnerCarry
    steps: torch.Tensor  # [batch] int32
    halted: torch.Tensor  # [batch] bool
    current_data: dict[str, torch.Tensor]


class GatingNetwork(nn.Module):
    """Gate MLP ``[own, other, inj] (3D) -> R -> 3D``; ``gate_proj.0`` / ``gate_proj.2`` are its
    linears (the public gated code's key names). The blend itself runs in ``gated_blend``."""

    def __init__(self, hidden_size: int, gate_hidden_size: int, init_bias: float):
        super().__init__()
        self.gate_proj = nn.Sequential(
            CastedLinear(3 * hidden_size, gate_hidden_size, bias=True),
            nn.SiLU(),
            CastedLinear(gate_hidden_size, 3 * hidden_size, bias=True),
        )
        with torch.no_grad():
            self.gate_proj[2].bias.fill_(init_bias)

    def blend(self, own: torch.Tensor, other: torch.Tensor, inj: Optional[torch.Tensor], stats: bool,
              saturation: bool = False):
        # Weights in the activations' dtype, as the reference's CastedLinear uses them (gated_blend
        # also takes fp32 weights, but its bf16-weight kernels are faster: 919 vs 993 us fwd+bwd at
        # the Sudoku shape on an H100, and one set of kernel variants compiles for both passes).
        first, second = self.gate_proj[0], self.gate_proj[2]
        return gated_blend(own, other, inj, first.weight_as(own.dtype), first.bias, second.weight_as(own.dtype),
                           second.bias, stats=stats, saturation=saturation)


class ReasoningModule(nn.Module):
    """``h = input(own, other, inj)``, then the blocks. Ungated input: ``own + (other + inj)``.

    ``FUSED_INPUT`` (on): that sum is ``hrm_kernels.add3``, one pass over memory instead of two
    adds, bit-identical to them (the L modules' calls, which have an injection; ``_input_sum``)."""

    FUSED_INPUT = True

    def __init__(self, config: HRMConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, config.intermediate_size, config.rms_norm_eps,
                  config.attn_backend)
            for _ in range(num_layers)
        )
        self.gating_network = (GatingNetwork(config.hidden_size, config.gate_hidden_size, config.gate_init_bias)
                               if config.use_gating else None)
        # the stats' saturation column (a third of their cost in the kernel) only for the regulariser
        self.gate_saturation = config.gate_reg_weight > 0

    def _input_sum(self, own: torch.Tensor, other: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        """``own + (other + inj)``; through ``add3`` where it applies (not under torch.compile, which
        fuses the two adds itself; one shape and dtype, as the model's states have)."""
        if (self.FUSED_INPUT and not torch.compiler.is_compiling() and own.dtype == other.dtype == inj.dtype
                and own.shape == other.shape == inj.shape):
            return add3(own, other, inj)
        return own + (other + inj)

    def _pending_input(self, own, other, inj: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The ungated input sum through ``normed_add`` where ``own`` or ``other`` is a
        ``PendingNorm`` (None where neither is, or the module is gated)."""
        if self.gating_network is not None or not (isinstance(own, PendingNorm) or isinstance(other, PendingNorm)):
            return None
        (a, a_ss, a_eps), (b, b_ss, b_eps) = (tuple(s) if isinstance(s, PendingNorm) else (s, None, None)
                                              for s in (own, other))
        return normed_add(a, b, inj, a_ss=a_ss, b_ss=b_ss, eps=a_eps or b_eps)

    def forward(self, own, other, inj: Optional[torch.Tensor], cos_sin, stats: bool = False,
                first_position: bool = False, pending: bool = False):
        """Returns (new state, gate stats [3, 4] or None; [3, 5] with the regulariser's saturation
        column when ``gate_reg_weight > 0``). ``first_position``: the state at
        position 0 alone, [batch, 1, hidden] (the last block computes nothing else). ``own`` and
        ``other`` may be ``PendingNorm`` states; with ``pending`` the new state is one where the
        blocks end with a deferred norm (``Block.DEFERRED_NORM``), else a tensor."""
        gate_stats = None
        h = self._pending_input(own, other, inj)
        if h is None:
            own, other = closed(own), closed(other)
            if self.gating_network is None:
                h = own + other if inj is None else self._input_sum(own, other, inj)
            elif stats:
                h, gate_stats = self.gating_network.blend(own, other, inj, stats=True,
                                                          saturation=self.gate_saturation)
            else:
                h = self.gating_network.blend(own, other, inj, stats=False)
        last = len(self.layers) - 1  # (no slicing: a new ModuleList per call would recompile torch.compile's graphs)
        ss = None  # with deferred norms: h's partial sums of squares, the state being rms_norm(h)
        for i, layer in enumerate(self.layers):
            first = first_position and i == last
            if not first and layer.runs_deferred(h):
                h, ss = layer.deferred(h, ss, cos_sin)
                continue
            if ss is not None:  # a plain block reads the materialized state
                h, ss = rms_norm(h, eps=layer.eps), None
            h = layer.first_position(h, cos_sin) if first else layer(h, cos_sin)
        if ss is not None:
            if pending:
                return PendingNorm(h, ss, self.layers[last].eps), gate_stats
            h = rms_norm(h, eps=self.layers[last].eps)
        return (h[:, :1] if first_position and last < 0 else h), gate_stats


class HRMInner(nn.Module):
    """The recurrent core: embeddings, L and H modules, output heads and the carry's reset states.

    With ``config.cuda_graphs`` (CUDA, outside torch.compile) the no-gradient recurrence replays as
    CUDA graphs, and with ``GRAPH_GRAD_CALLS`` also the with-gradient last L and H calls, forward
    and backward (``hrm.cuda_graphs.GradGraphCache``): hundreds of launches from Python fewer per
    step, which is what a step costs when the batch is small."""

    GRAPH_GRAD_CALLS = True
    HOIST_WEIGHT_CASTS = True
    Q_TARGET_FIRST_POSITION = True  # see ``q_values``
    PREFIX_IN_GRAD_GRAPH = True  # see ``_grad_calls``
    PENDING_NORMS = True  # see ``recurrence``
    Q_TARGET_IN_GRAD_GRAPH = True  # see ``forward``'s ``next_q``
    SHARE_WEIGHT_LAYOUTS = True  # see ``_shared_weight_casts``
    PRESCALED_EMBEDDINGS = True  # see ``input_embeddings``
    UNCOPIED_INPUT_GRADS = True  # see ``_grad_calls``
    EMBEDDINGS_IN_GRAPH = True  # see ``_no_grad_segment``

    def __init__(self, config: HRMConfig):
        super().__init__()
        self.config = config
        dtype = config.torch_dtype
        hidden = config.hidden_size
        self.forward_dtype = dtype
        self.embed_scale = math.sqrt(hidden)
        embed_std = 1.0 / self.embed_scale
        self.puzzle_emb_len = config.puzzle_emb_len

        self.embed_tokens = CastedEmbedding(config.vocab_size, hidden, init_std=embed_std, cast_to=dtype)
        self.lm_head = CastedLinear(hidden, config.vocab_size, bias=False)
        self.q_head = CastedLinear(hidden, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = CastedSparseEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim,
                                                    batch_size=config.batch_size, init_std=0.0, cast_to=dtype)
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.total_seq_len, config.rope_theta)
        else:
            self.embed_pos = CastedEmbedding(config.total_seq_len, hidden, init_std=embed_std, cast_to=dtype)

        self.H_level = ReasoningModule(config, config.H_layers)
        self.L_level = ReasoningModule(config, config.L_layers)
        self.register_buffer("H_init", trunc_normal_(torch.empty(hidden, dtype=dtype), std=1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(hidden, dtype=dtype), std=1.0))
        with torch.no_grad():  # Q-learning head starts at "don't halt" with a small, equal value
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.graphs = GraphCache()  # CUDA graphs of the no-gradient recurrence (config.cuda_graphs)
        self.grad_graphs = GradGraphCache()  # and of the with-gradient L and H calls (GRAPH_GRAD_CALLS)

    # --------------------------------------------------------------------------- pieces

    def input_embeddings(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        """[batch, seq_len] token ids (+ [batch] puzzle ids) -> [batch, total_seq_len, hidden]:
        ``embed_scale * cat(puzzle rows, token rows)`` in the forward dtype. With
        ``PRESCALED_EMBEDDINGS`` (outside torch.compile, which fuses the scale itself; not with
        learned positions) the scale multiplies the [vocab, hidden] table and the [batch, puzzle]
        rows before the lookup and the concatenation: the same rounded products (one bf16 product a
        value either way), one [batch, seq, hidden] pass less forward and one less backward; the
        table's gradient sums the unscaled rows, then scales (a different rounding order)."""
        scale = self.embed_scale
        if (self.PRESCALED_EMBEDDINGS and self.config.pos_encodings != "learned"
                and not torch.compiler.is_compiling()):
            table = self.embed_tokens  # (its weight read directly: hooks on embed_tokens do not fire here)
            x = F.embedding(inputs.to(torch.int32), table.embedding_weight.to(table.cast_to) * scale)
            scale = None
        else:
            x = self.embed_tokens(inputs.to(torch.int32))
        if self.config.puzzle_emb_ndim > 0:
            puzzle = self.puzzle_emb(puzzle_identifiers)
            if scale is None:
                puzzle = puzzle * self.embed_scale
            pad = self.puzzle_emb_len * self.config.hidden_size - puzzle.shape[-1]
            if pad > 0:
                puzzle = F.pad(puzzle, (0, pad))
            x = torch.cat((puzzle.view(-1, self.puzzle_emb_len, self.config.hidden_size), x), dim=-2)
        if self.config.pos_encodings == "learned":
            x = LEARNED_POS_SCALE * (x + self.embed_pos.embedding_weight.to(self.forward_dtype))
        return x if scale is None else scale * x

    def empty_carry(self, batch_size: int, device=None) -> HRMInnerCarry:
        shape = (batch_size, self.config.total_seq_len, self.config.hidden_size)
        device = self.H_init.device if device is None else device
        return HRMInnerCarry(z_H=torch.zeros(shape, dtype=self.forward_dtype, device=device),
                             z_L=torch.zeros(shape, dtype=self.forward_dtype, device=device))

    def reset_carry(self, reset: torch.Tensor, carry: HRMInnerCarry,
                    out: Optional[HRMInnerCarry] = None) -> HRMInnerCarry:
        """Rows where ``reset`` is set go back to ``H_init`` / ``L_init`` (``hrm_kernels.reset_rows``:
        the ``torch.where`` in one copy-speed kernel on CUDA). With ``out`` (a carry of the model's
        dtype) the result is written there and returned."""
        if self._in_model_dtype(carry):
            outs = (None, None) if out is None else (out.z_H, out.z_L)
            return HRMInnerCarry(z_H=reset_rows(carry.z_H, reset, self.H_init, out=outs[0]),
                                 z_L=reset_rows(carry.z_L, reset, self.L_init, out=outs[1]))
        if out is not None:
            raise ValueError(f"reset_carry: out needs a carry in the model's dtype {self.H_init.dtype}, got "
                             f"{carry.z_H.dtype} / {carry.z_L.dtype}")
        # a carry of another dtype than the model's: promoted, as torch.where does
        return HRMInnerCarry(z_H=reset_rows_reference(carry.z_H, reset, self.H_init),
                             z_L=reset_rows_reference(carry.z_L, reset, self.L_init))

    def _in_model_dtype(self, carry: HRMInnerCarry) -> bool:
        return carry.z_H.dtype == carry.z_L.dtype == self.H_init.dtype == self.L_init.dtype

    @property
    def segment_calls(self) -> int:
        """Module calls in one segment: H_cycles * L_cycles L-calls and H_cycles H-calls."""
        return self.config.H_cycles * (self.config.L_cycles + 1)

    def _cos_sin(self):
        return self.rotary_emb() if self.config.pos_encodings == "rope" else None

    # --------------------------------------------------------------------------- segment

    def recurrence(self, z_H, z_L, x: torch.Tensor, steps: int, first_position: bool = False,
                   pending_out: bool = False):
        """The first ``steps`` module calls of a segment's H_cycles * L_cycles L-calls and
        H_cycles H-calls, in order (each L-call, then an H-call after every L_cycles of them),
        without gate stats. Returns (z_H, z_L); with ``first_position`` (all the calls), the
        last H-call computes z_H at position 0 alone ([batch, 1, hidden]). Without gradients and
        with ``HOIST_WEIGHT_CASTS``, the blocks' weights are cast to the forward dtype once for all
        the calls, not once per call, and so are the gate MLPs' (outside torch.compile, which
        fuses the casts itself). Ungated, with ``PENDING_NORMS``, the states pass between the
        calls as ``PendingNorm`` (the next module input closes the norm as it reads them); they
        come back so with ``pending_out``, else as tensors."""
        if not torch.is_grad_enabled() and steps > 1:
            with self._shared_weight_casts():
                return self._recurrence(z_H, z_L, x, steps, first_position, pending_out)
        return self._recurrence(z_H, z_L, x, steps, first_position, pending_out)

    def _shared_weight_casts(self):
        """``hoisted_weight_casts`` of the L and H modules where ``HOIST_WEIGHT_CASTS`` applies, and
        with ``SHARE_WEIGHT_LAYOUTS`` one reordered copy of each gate_up weight for the Gluon SwiGLU
        matmuls (``shared_weight_layouts``) instead of one per call: 8 copies of [3072, 512] a Sudoku
        training step instead of 48. Neither under torch.compile, which fuses the casts itself."""
        if torch.compiler.is_compiling():
            return contextlib.nullcontext()
        with contextlib.ExitStack() as stack:  # (an error entering the second leaves the first)
            if self.HOIST_WEIGHT_CASTS:
                stack.enter_context(hoisted_weight_casts([self.L_level, self.H_level], self.forward_dtype))
            if self.SHARE_WEIGHT_LAYOUTS:
                stack.enter_context(shared_weight_layouts())
            return stack.pop_all()

    def _recurrence(self, z_H, z_L, x: torch.Tensor, steps: int, first_position: bool = False,
                    pending_out: bool = False):
        cfg, cos_sin = self.config, self._cos_sin()
        if first_position and steps != self.segment_calls:
            raise ValueError(f"first_position needs all {self.segment_calls} module calls, got {steps}")
        pending = self.PENDING_NORMS and not cfg.use_gating and not torch.is_grad_enabled()
        calls = 0
        for _ in range(cfg.H_cycles):
            for _ in range(cfg.L_cycles):
                if calls == steps:
                    break
                z_L, _ = self.L_level(z_L, z_H, x, cos_sin, pending=pending)
                calls += 1
            if calls == steps:
                break
            z_H, _ = self.H_level(z_H, z_L, None, cos_sin, first_position=first_position and calls == steps - 1,
                                  pending=pending)
            calls += 1
        return (z_H, z_L) if pending_out else (closed(z_H), closed(z_L))

    def _no_grad_recurrence(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, steps: int):
        """``recurrence`` without gradients; through a CUDA graph where ``config.cuda_graphs`` allows."""
        with torch.no_grad():
            if steps == 0 or not self._use_graphs(x):
                return self.recurrence(z_H, z_L, x, steps)
            key = (steps, *self._graph_key(z_H, z_L, x))
            z_H, z_L = self.graphs.run(key, lambda h, l, e: self.recurrence(h, l, e, steps),
                                       (z_H, z_L, x.detach()))
            return z_H, z_L

    def _no_grad_segment(self, carry: HRMInnerCarry, batch: dict[str, torch.Tensor], steps: int,
                         reset: Optional[torch.Tensor] = None):
        """A segment's whole recurrence without gradients, from the batch's ids and the carry (its
        ``reset`` rows first set back, where given): (z_H, z_L). With ``EMBEDDINGS_IN_GRAPH``, in
        evaluation mode (the puzzle embedding's training forward stages rows) and through a CUDA
        graph, the input embedding is part of the captured graph: its static inputs are the
        [batch, seq] ids instead of a copy of x [batch, seq, hidden], and x lives in the graph's
        pool instead of as an eager tensor and that copy: one activation-sized buffer fewer at
        evaluation's peak (session 38: 3.32 vs 3.40 GiB at ARC). There the reset writes the states
        straight into the graph's static input buffers (at the capture into new tensors that become
        them): no copy of the carry into the graph and none held beside it."""
        inputs, puzzle_ids = batch["inputs"], batch["puzzle_identifiers"]
        training = self.training or getattr(self, "puzzle_emb", self).training
        on_device = inputs.device == puzzle_ids.device == carry.z_H.device  # (no host copy inside a capture)
        if not (self.EMBEDDINGS_IN_GRAPH and not training and steps > 0 and on_device
                and self._use_graphs(carry.z_H)):
            if reset is not None:
                carry = self.reset_carry(reset, carry)
            return self._no_grad_recurrence(carry.z_H, carry.z_L, self.input_embeddings(inputs, puzzle_ids), steps)
        with torch.no_grad():
            if reset is not None and not self._in_model_dtype(carry):
                carry, reset = self.reset_carry(reset, carry), None  # promoted to another dtype: copied in
            key = (steps, "embedded", inputs.shape, inputs.dtype, puzzle_ids.shape, puzzle_ids.dtype,
                   self.PRESCALED_EMBEDDINGS, *self._graph_key(carry.z_H, carry.z_L, carry.z_H))
            donated = 0
            if reset is not None:
                static = self.graphs.static_inputs(key)
                if static is None:  # the capture's: new dense tensors, writable outside inference mode
                    with torch.inference_mode(False):
                        static = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                       for t in (carry.z_H, carry.z_L))
                    donated = 2
                if static[0].is_contiguous() and static[1].is_contiguous():
                    carry = self.reset_carry(reset, carry, out=HRMInnerCarry(z_H=static[0], z_L=static[1]))
                else:  # buffers an earlier capture cloned from a strided carry: reset apart, copied in
                    carry = self.reset_carry(reset, carry)
            run = lambda h, l, i, p: self.recurrence(h, l, self.input_embeddings(i, p), steps)  # noqa: E731
            z_H, z_L = self.graphs.run(key, run, (carry.z_H, carry.z_L, inputs, puzzle_ids), donated=donated)
            return z_H, z_L

    def q_values(self, carry: HRMInnerCarry, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(carry, batch)``'s (q_halt, q_continue), [batch] fp32 each, without gradients:
        what the ACT continue target reads. With ``Q_TARGET_FIRST_POSITION`` the segment's last
        H block runs for position 0 alone, the only position the Q head reads (its attention
        still uses every position's keys and values), and no logits are made: the same math with
        about one block of the segment's 24 less (rounding may differ: the matmuls have other
        shapes). Off, the whole ``forward`` runs, as the reference does. With CUDA graphs this pass
        has a graph of its own (ungated, evaluation's whole-recurrence graph no longer serves it:
        one more set of static buffers). Called as a method, it bypasses ``HRMInner.__call__`` (its
        hooks; a ``torch.compile`` of ``inner`` alone would not cover it)."""
        with torch.no_grad():
            if not self.Q_TARGET_FIRST_POSITION:
                return self(carry, batch, gate_stats=False)[2]
            x = self.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
            steps = self.segment_calls
            run = lambda h, l, e: self.recurrence(h, l, e, steps, first_position=True, pending_out=True)[:1]  # noqa: E731
            if self._use_graphs(x):
                (z_H0,) = self.graphs.run((steps, "first_position", *self._graph_key(carry.z_H, carry.z_L, x)),
                                          run, (carry.z_H, carry.z_L, x))
            else:
                (z_H0,) = run(carry.z_H, carry.z_L, x)
            return self._q_head(z_H0)

    def _q_head(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_halt, q_continue) [batch] fp32 from position 0 of ``z_H``."""
        q = self.q_head(z_H[:, 0]).to(torch.float32)
        return q[..., 0], q[..., 1]

    def _next_q(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``q_values`` (with ``Q_TARGET_FIRST_POSITION``) of the carry (z_H, z_L) on the inputs'
        embeddings ``x``, as one [batch, 2] fp32 tensor, launched here (by ``_grad_calls``, inside
        its graph where that runs)."""
        with torch.no_grad():
            z_H0 = self.recurrence(z_H.detach(), z_L.detach(), x.detach(), self.segment_calls, first_position=True,
                                   pending_out=True)[0]  # (z_L unread: left pending)
            return torch.stack(self._q_head(z_H0), dim=-1)

    def _graph_key(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> tuple:
        """What a captured graph depends on besides the values: shapes, dtypes, device, kernels,
        the model's fusion switches, where its parameters and buffers live and which of them
        require grad."""
        tensors = module_tensors(self)
        return (x.shape, x.dtype, z_H.dtype, z_L.dtype, x.device, get_backend(), SwiGLUMLP.FUSED_NO_GRAD,
                Attention.FUSED_NO_GRAD, Attention.FUSED_GRAD, Attention.ROPE_QKV, Attention.HALF_TABLES,
                Attention.ROPE_IN_QKV, Attention.ROPE_IN_QKV_SHORT, Attention.ROPE_IN_QKV_GRAD,
                Block.FUSED_NO_GRAD, Block.FUSED_GRAD_RESIDUAL, Block.DEFERRED_NORM, ReasoningModule.FUSED_INPUT,
                self.HOIST_WEIGHT_CASTS, self.PENDING_NORMS, self.SHARE_WEIGHT_LAYOUTS, _math.FAST_SIGMOID,
                _swiglu_linear_module.FUSED_BACKWARD,
                _swiglu_linear_module.USE_GLUON,
                _linear_swiglu_module.USE_GLUON, _linear_swiglu_module.USE_TMA,
                _linear_swiglu_module.GLUON_KEEPS_GATE_UP, _gated_blend_module.USE_GLUON,
                _gated_blend_module.USE_GLUON_DPRE, _gated_blend_module.USE_GLUON_MAIN,
                _gated_blend_module.USE_GLUON_STORE,
                _rope_attention_module.USE_GLUON, _rope_attention_module.USE_GLUON_BACKWARD,
                _rope_attention_module.USE_GLUON_LONG, _rope_attention_module.USE_GLUON_LONG_GRAD,
                _rope_attention_module.MAX_FUSED_SEQ,
                storage_key(tensors),
                tuple(t.requires_grad for t in tensors))

    def _grad_calls(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, stats: bool,
                    no_grad_calls: int = 0, next_q: bool = False):
        """``no_grad_calls`` module calls without gradients (the segment's first ones), then the
        segment's last L and H calls (with gradients where grad mode is on): ``(z_H, z_L)``, plus
        their gate stats ``(l_stats, h_stats)`` when ``stats``; z_L comes back detached (the loss
        reads z_H alone, and a gradient-free output spares the backward a zero gradient and two
        copies). With ``next_q`` a last output, [batch, 2] fp32: the continue target's Q values of
        the new state (``_next_q``).

        Where ``GRAPH_GRAD_CALLS`` and ``config.cuda_graphs`` allow, all of it replays as one pair
        of CUDA graphs (``PREFIX_IN_GRAD_GRAPH``: the states pass between the calls in the graph's
        memory instead of through static buffers, five copies of [batch, seq, hidden] less a step);
        with graphs but without that pair (evaluation with gate stats, anomaly mode) the calls
        without gradients take the no-gradient graphs. The calls launched here share one cast of
        each weight (``HOIST_WEIGHT_CASTS``; autograd's, with gradients). With
        ``UNCOPIED_INPUT_GRADS`` the graph hands x's gradient to the input embedding's backward as
        its own buffer (``GradGraphCache.run``'s ``copy_input_grads=False``): one [batch, seq,
        hidden] copy less a step. x must then be an intermediate, as ``forward``'s is (a leaf's
        ``.grad`` is a copy either way; ``torch.autograd.grad`` with respect to x would return the
        buffer the next step overwrites)."""
        cos_sin = self._cos_sin()

        def calls(z_H, z_L, x):
            z_L, l_stats = self.L_level(z_L, z_H, x, cos_sin, stats=stats)
            z_H, h_stats = self.H_level(z_H, z_L, None, cos_sin, stats=stats)
            z_L = z_L.detach()
            # without the regulariser the stats have no saturation column and need no gradient
            # (a CUDA graph records a backward for every output that requires grad)
            return ((z_H, z_L) + ((l_stats, h_stats) if stats else ())
                    + ((self._next_q(z_H, z_L, x),) if next_q else ()))

        def segment(z_H, z_L, x):
            with self._shared_weight_casts():  # one cast per weight for all of the segment's calls
                with torch.no_grad():
                    z_H, z_L = self.recurrence(z_H, z_L, x, no_grad_calls, pending_out=True)
                return calls(z_H, z_L, x)

        inputs = (z_H.detach(), z_L.detach(), x)
        use_graphs = self._use_graphs(x)
        graphed = use_graphs and self._grad_graphs_run()
        if use_graphs and not (graphed and self.PREFIX_IN_GRAD_GRAPH):  # the no-gradient graphs
            inputs, no_grad_calls = (*self._no_grad_recurrence(*inputs, no_grad_calls), x), 0
        if not graphed:
            return segment(*inputs)
        key = ("grad", no_grad_calls, stats, next_q, x.requires_grad, *self._graph_key(z_H, z_L, x))
        # (the inputs' gradient buffers handed on uncopied: x's, the one input with a gradient, is
        # this forward's own input embedding, consumed by its backward at once)
        return self.grad_graphs.run(key, segment, inputs, (self.L_level, self.H_level),
                                    copy_input_grads=not self.UNCOPIED_INPUT_GRADS)

    def _grad_graphs_run(self) -> bool:
        """Whether ``_grad_calls`` replays its CUDA graphs where graphs apply (``_use_graphs``; ask
        that first: torch.compile breaks its graph on ``is_anomaly_enabled``)."""
        return (self.GRAPH_GRAD_CALLS and torch.is_grad_enabled()
                and not torch.is_anomaly_enabled())  # anomaly mode checks values on the host

    def _use_graphs(self, x: torch.Tensor) -> bool:
        return (self.config.cuda_graphs and x.is_cuda and not torch.compiler.is_compiling()
                and not compiling_ahead() and not torch.cuda.is_current_stream_capturing()
                and not torch.is_autocast_enabled("cuda")  # its weight-cast cache lives outside graphs
                and not getattr(self, "_is_replica", False))  # nn.DataParallel: new copies every call

    def _apply(self, fn, recurse=True):
        self.graphs.clear()  # moved or converted: the graphs read the old storage
        self.grad_graphs.clear()
        return super()._apply(fn, recurse)

    def forward(self, carry: HRMInnerCarry, batch: dict[str, torch.Tensor], gate_stats: bool = True,
                next_q: bool = False, reset: Optional[torch.Tensor] = None):
        """One segment, from ``carry`` with its ``reset`` rows ([batch] bool, where given) first set
        back to the initial states (``reset_carry``). Returns ``(new_carry, logits, (q_halt,
        q_continue), stats)`` where ``stats`` is [2, 3, 4] (L, H x own/other/inj x
        STATS_COLUMNS[:4]; [2, 3, 5], saturation too, with the regulariser) from the segment's last
        L and H calls when gated and ``gate_stats``, else None. Without gradients and without stats
        the whole recurrence is one no-gradient run; else it goes through ``_grad_calls`` (its last
        L and H calls with gradients where grad mode is on). With ``next_q`` a fifth item,
        ``q_values(new_carry, batch)`` (no gradients); with gradients on and
        ``Q_TARGET_IN_GRAD_GRAPH`` it is computed by ``_grad_calls`` (inside the segment's CUDA
        graph where that graph runs), else by ``q_values``."""
        cfg = self.config
        want_stats = gate_stats and cfg.use_gating
        all_calls = self.segment_calls
        fused_next_q = False
        if not torch.is_grad_enabled() and not want_stats:
            z_H, z_L = self._no_grad_segment(carry, batch, all_calls, reset)
        else:
            if reset is not None:
                carry = self.reset_carry(reset, carry)
            x = self.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
            # the continue target inside the segment's graph, or with no graphs at all (elsewhere
            # q_values replays a no-gradient graph of its own)
            fused_next_q = (next_q and self.Q_TARGET_IN_GRAD_GRAPH and self.Q_TARGET_FIRST_POSITION
                            and torch.is_grad_enabled() and (not self._use_graphs(x) or self._grad_graphs_run()))
            z_H, z_L, *gate_stats = self._grad_calls(carry.z_H, carry.z_L, x, want_stats,
                                                     no_grad_calls=all_calls - 2, next_q=fused_next_q)

        new_carry = HRMInnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        logits = self.lm_head(z_H)[:, self.puzzle_emb_len:]
        stats = torch.stack(gate_stats[:2]) if want_stats else None
        outputs = (new_carry, logits, self._q_head(z_H), stats)
        if not next_q:
            return outputs
        if fused_next_q:
            q_next = gate_stats[-1]
            return outputs + ((q_next[..., 0], q_next[..., 1]),)
        return outputs + (self.q_values(new_carry, batch),)


def _kernel_context(kernels: str):
    # "auto" leaves the choice to hrm_kernels (and HRM_KERNELS_BACKEND); the others force it.
    return contextlib.nullcontext() if kernels == "auto" else use_backend(kernels)


class HRM(nn.Module):
    """HRM with adaptive computation time (ACT). ``HRM(config)`` with an ``HRMConfig`` or a mapping.

    ``initial_carry(batch)`` -> every row halted (so the first ``forward`` loads the batch);
    ``forward(carry, batch) -> (carry, outputs)``: one segment for every row (see module docstring
    and docs/REFERENCE.md "ACT wrapper"). Outputs: ``logits`` [B, seq_len, vocab], ``q_halt_logits``,
    ``q_continue_logits`` [B] fp32, ``target_q_continue`` [B] (training with halt_max_steps > 1),
    ``gate_stats`` [2, 3, 4] (gated; [2, 3, 5] with ``gate_reg_weight > 0``; not with
    ``forward(..., gate_stats=False)``, which gated models then run without the stats' work).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = HRMConfig.coerce(config)
        self.inner = HRMInner(self.config)

    @property
    def puzzle_emb(self) -> Optional[CastedSparseEmbedding]:
        """The sparse puzzle embedding (for ``CastedSparseEmbeddingSignSGD``), or None."""
        return getattr(self.inner, "puzzle_emb", None)

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> HRMCarry:
        inputs = batch["inputs"]
        batch_size, device = inputs.shape[0], inputs.device
        return HRMCarry(
            inner_carry=self.inner.empty_carry(batch_size, device),
            steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: HRMCarry, batch: dict[str, torch.Tensor],
                gate_stats: bool = True) -> tuple[HRMCarry, dict[str, torch.Tensor]]:
        with _kernel_context(self.config.kernels):
            return self._forward(carry, batch, gate_stats)

    def _forward(self, carry: HRMCarry, batch: dict[str, torch.Tensor], gate_stats: bool = True):
        cfg = self.config
        halted = carry.halted
        steps = torch.where(halted, 0, carry.steps)
        current_data = {
            k: torch.where(halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()
        }

        q_target = self.training and cfg.halt_max_steps > 1
        # the halted rows' states reset inside (on the evaluation graph's path into its static inputs)
        inner_carry, logits, (q_halt, q_continue), stats, *next_q = self.inner(
            carry.inner_carry, current_data, gate_stats=gate_stats, next_q=q_target, reset=halted)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
        if stats is not None:
            outputs["gate_stats"] = stats

        with torch.no_grad():
            steps = steps + 1
            is_last = steps >= cfg.halt_max_steps
            halted = is_last
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | (q_halt > q_continue)
                # Exploration: with probability p, a random minimum of 2..halt_max_steps segments.
                explore = torch.rand_like(q_halt) < cfg.halt_exploration_prob
                min_steps = explore * torch.randint_like(steps, low=2, high=cfg.halt_max_steps + 1)
                halted = halted & (steps >= min_steps)
                # Q-learning target: the next segment's Q values (bootstrapped, no gradient).
                (next_halt, next_continue), = next_q
                outputs["target_q_continue"] = torch.sigmoid(
                    torch.where(is_last, next_halt, torch.maximum(next_halt, next_continue)))

        return HRMCarry(inner_carry, steps, halted, current_data), outputs
