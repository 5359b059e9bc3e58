"""HRM's building blocks: casted linear/embedding, RoPE, attention, SwiGLU MLP, post-norm block.

Parameters are fp32 and cast to the activation dtype at use. The add+RMSNorm and the SwiGLU
activation go through ``hrm_kernels`` (fused Triton kernels or their eager fallbacks).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hrm_kernels import (_gluon_gemm, deferred_norm, first_halves, linear_add_rms_norm, linear_swiglu, rms_norm, rope,
                         rope_attention, rope_qkv, rope_reference, swiglu, swiglu_linear)
from hrm_kernels.backend import use_triton
from hrm_kernels.swiglu_linear import swiglu_linear_backward

# the modules (the package's ``linear_swiglu`` / ``rope_attention`` attributes are the functions): their
# switches and limits are read at call time
_linear_swiglu_module = importlib.import_module("hrm_kernels.linear_swiglu")
_rope_attention_module = importlib.import_module("hrm_kernels.rope_attention")


def _import_flash_attn():
    """FlashAttention 3 (Hopper) first, then 2; both optional. A package that is installed but
    fails to import (ABI or CUDA mismatch) is reported once instead of silently ignored."""
    import warnings

    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return __import__(module, fromlist=["flash_attn_func"]).flash_attn_func
        except ImportError as e:
            if getattr(e, "name", None) not in (module, None) or "undefined symbol" in str(e):
                warnings.warn(f"{module} is installed but failed to import ({e}); attention uses "
                              "torch's scaled_dot_product_attention instead", stacklevel=2)
        except Exception as e:  # pragma: no cover - depends on the install
            warnings.warn(f"{module} is installed but failed to import ({type(e).__name__}: {e}); "
                          "attention uses torch's scaled_dot_product_attention instead", stacklevel=2)
    return None


_flash_attn_func = _import_flash_attn()

FLASH_ATTN_AVAILABLE = _flash_attn_func is not None


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` in place with a normal truncated to [lower, upper] standard deviations whose
    *resulting* standard deviation is ``std`` (JAX's ``truncated_normal`` initialiser convention:
    the scale is divided by the truncated distribution's own std). ``std=0`` gives zeros."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        # Standard normal pdf/cdf at the bounds, via erf.
        cdf_lo, cdf_hi = (math.erf(b / math.sqrt(2.0)) for b in (lower, upper))
        mass = (cdf_hi - cdf_lo) / 2
        pdf_lo, pdf_hi = (math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi) for b in (lower, upper))
        truncated_var = 1 - (upper * pdf_hi - lower * pdf_lo) / mass - ((pdf_hi - pdf_lo) / mass) ** 2
        scale = std / math.sqrt(truncated_var)
        # Inverse-CDF sampling: uniform in erf space, then erfinv.
        tensor.uniform_(cdf_lo, cdf_hi).erfinv_().mul_(math.sqrt(2.0) * scale)
        return tensor.clamp_(lower * scale, upper * scale)


class CastedLinear(nn.Module):
    """``F.linear`` with fp32 parameters cast to the input dtype. LeCun truncated-normal weight
    (std 1/sqrt(in_features)), zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=in_features ** -0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._weight_cast: Optional[torch.Tensor] = None  # set inside hoisted_weight_casts

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: inside ``hoisted_weight_casts``, the cast made there once (a
        cast made without gradients serves only calls without them); else a fresh cast."""
        cast = self._weight_cast
        if (cast is not None and cast.dtype == dtype
                and (cast.requires_grad or not torch.is_grad_enabled() or not self.weight.requires_grad)):
            return cast
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight_as(x.dtype), bias)


@contextlib.contextmanager
def hoisted_weight_casts(modules: list[nn.Module], dtype: torch.dtype):
    """Inside the block, the ``CastedLinear`` layers under ``modules`` take their weights in
    ``dtype`` from one cast made on entry, instead of casting at every call: a recurrence that calls
    the same blocks several times casts each weight once (same values). Entered with gradients on,
    the casts are autograd's (each use's gradient reaches the weight through the one cast) and
    serve calls with and without gradients; entered without, calls without gradients only. A
    block entered inside another keeps the outer block's casts; weights already in ``dtype`` need
    none."""
    linears = [m for module in modules for m in module.modules()
               if isinstance(m, CastedLinear) and m._weight_cast is None and m.weight.dtype != dtype]
    try:
        for m in linears:  # (a cast of another dtype is a new tensor, not the Parameter itself)
            m._weight_cast = m.weight.to(dtype)
        yield
    finally:
        for m in linears:
            m._weight_cast = None


class CastedEmbedding(nn.Module):
    """Embedding table (fp32, truncated normal with ``init_std``) looked up then cast."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(trunc_normal_(torch.empty(num_embeddings, embedding_dim), std=init_std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """cos/sin tables [positions, head_dim] for rotate-half RoPE (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_positions: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached, self.sin_cached


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [positions >= seq, head_dim] fp32. Rotation in
    fp32, result in x's dtype. Eager: ``hrm_kernels.rope`` (one Triton pass on CUDA). Under
    torch.compile the plain math, which Inductor fuses with the layout change attention needs."""
    if torch.compiler.is_compiling():
        return rope_reference(x, cos, sin)
    return rope(x, cos, sin)


class Attention(nn.Module):
    """Bidirectional multi-head attention with one fused qkv projection.

    ``backend``: ``flash`` (FlashAttention, CUDA + fp16/bf16 only), ``sdpa``
    (``F.scaled_dot_product_attention``) or ``auto`` (flash when it can run, else sdpa).

    Outside torch.compile and where SDPA would run (not FlashAttention, which was not measured
    against it), ``hrm_kernels.rope_attention`` runs RoPE and attention as one kernel, and with a
    gradient its backward as one kernel that writes the qkv gradient (sequences up to its
    ``MAX_FUSED_SEQ``; longer ones as the RoPE kernel + SDPA). ``FUSED_NO_GRAD`` / ``FUSED_GRAD``
    switch it off without / with gradients (then RoPE runs as its own pass).

    ``ROPE_QKV``: wherever RoPE runs apart from the attention (FlashAttention, long sequences, the
    switches above off) and outside
    torch.compile, RoPE goes through ``hrm_kernels.rope_qkv``, whose backward writes the qkv
    gradient in one pass instead of autograd's concatenation, zero-filled slice gradients and their
    sum (H100, Sudoku gated training step: 83.7 vs 88.7 ms, benchmarks/RESULTS.md).

    ``ROPE_IN_QKV``: in those same places, blocks running on deferred-norm states (no gradient,
    ``Block.deferred``) rotate q and k in their qkv matmul's epilogue instead (``qkv_rope``; H100,
    ARC's 96 x 901 rows: 264 us a call in session 27 against 340 for the matmul and a RoPE pass in
    session 26)."""

    FUSED_NO_GRAD = True
    FUSED_GRAD = True
    ROPE_QKV = True
    # The RoPE kernels read the tables' first halves only (``_kernel_tables``).
    HALF_TABLES = True
    # Blocks on deferred-norm states (no gradient) rotate q and k in their qkv matmul's epilogue
    # wherever RoPE would otherwise be a pass of its own (``qkv_rope``).
    ROPE_IN_QKV = True
    # ... and also where rope_attention's fused kernel would rotate them as it loads (sequences up to
    # its MAX_FUSED_SEQ: Sudoku), which then attends without rotation (the Gluon attention kernel
    # skips its k rotation and the barrier after it). Session 32 (H100, fused, alternating A/Bs):
    # ungated Sudoku step 64.3 / 64.2 ms against 65.3 / 65.1 off (and 63.1 / 63.9 against 64.2 /
    # 64.3 in another call); gated 67.3 / 67.1 against 67.1 / 67.6, no change.
    ROPE_IN_QKV_SHORT = True
    # With a gradient, beyond rope_attention's fused kernel (ARC's last L and H calls), q and k
    # rotated in the qkv matmul's epilogue too, inside ``Block``'s keep-input path
    # (``linear_rope_keep_input``; RoPE's backward is rope_qkv's one-pass gradient kernel). Off: its
    # GPU tests pass (session 33, H100), but it gains nothing in the ungated ARC step: 116.1 / 116.2
    # ms with it on top of the long attention's gradient path against 116.8 / 115.1 without it (114.7
    # / 115.6 with the long attention alone): the GPU time of matmuls rose 66.5 -> 68.0 ms and of
    # other 11.4 -> 12.0, the attention's fell nothing; peak memory fell 16.0 -> 14.7 GiB.
    # The RoPE pass it replaces took 10 calls, 1.03 ms of an ungated ARC step (session 32).
    ROPE_IN_QKV_GRAD = False

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if backend == "flash" and not FLASH_ATTN_AVAILABLE:
            raise RuntimeError("attn_backend='flash' but neither flash_attn_interface (FlashAttention 3) nor "
                               "flash_attn (FlashAttention 2) can be imported; install one or use "
                               "attn_backend='auto' / 'sdpa'")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.qkv_proj = CastedLinear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = CastedLinear(hidden_size, hidden_size, bias=False)

    def _use_flash(self, q: torch.Tensor) -> bool:
        if self.backend == "sdpa" or not FLASH_ATTN_AVAILABLE:
            return False
        ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if self.backend == "flash" and not ok:
            raise RuntimeError(f"attn_backend='flash' needs CUDA fp16/bf16 activations, got {q.device.type} "
                               f"{q.dtype}; use attn_backend='auto' or 'sdpa'")
        return ok

    def forward(self, h: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return self.from_qkv(self.qkv_proj(h), cos_sin)

    def from_qkv(self, qkv: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``forward`` from the qkv projection [batch, seq, 3 * hidden]: [batch, seq, hidden]."""
        return self.o_proj(self.heads_from_qkv(qkv, cos_sin))

    def heads(self, h: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Attention before the output projection: [batch, seq, hidden] (heads concatenated)."""
        return self.heads_from_qkv(self.qkv_proj(h), cos_sin)

    def heads_from_qkv(self, qkv: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``heads`` from the qkv projection [batch, seq, 3 * hidden]: [batch, seq, hidden]."""
        batch, seq, three_hidden = qkv.shape
        hidden = three_hidden // 3
        qkv = qkv.view(batch, seq, 3 * self.num_heads, self.head_dim)
        if self._fused_attention():
            cos, sin = self._kernel_tables(cos_sin, qkv.device) if cos_sin is not None else (None, None)
            return rope_attention(qkv, cos, sin).reshape(batch, seq, hidden)
        if cos_sin is not None and self.ROPE_QKV and not torch.compiler.is_compiling():
            q, k, v = rope_qkv(qkv, *self._kernel_tables(cos_sin, qkv.device))  # dqkv written in one pass
        else:
            q, k, v = qkv.split(self.num_heads, dim=2)  # each [batch, seq, heads, head_dim]
            if cos_sin is not None:  # q and k rotated together: one strided slice of qkv
                q, k = apply_rope(qkv[:, :, :2 * self.num_heads], *self._kernel_tables(cos_sin, qkv.device)
                                  ).split(self.num_heads, dim=2)
        return self._attend(q, k, v).reshape(batch, seq, hidden)

    def _fused_attention(self) -> bool:
        """Whether ``heads_from_qkv`` calls ``hrm_kernels.rope_attention`` (which picks its kernel or
        rope_qkv + SDPA by sequence length)."""
        return ((self.FUSED_GRAD if torch.is_grad_enabled() else self.FUSED_NO_GRAD)
                and (self.backend == "sdpa" or not FLASH_ATTN_AVAILABLE) and not torch.compiler.is_compiling())

    def qkv_rope(self, seq: int, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> Optional[tuple]:
        """``deferred_norm.norm_linear``'s ``rope`` argument for this layer's qkv projection of [batch,
        seq] rows, no gradient: ``(cos, sin, seq, head_dim)`` (half tables) where RoPE would otherwise
        run as a pass of its own (sequences beyond ``rope_attention``'s fused kernel, which rotates as
        it loads; FlashAttention), else None. ``heads_from_qkv`` then takes no tables."""
        if (cos_sin is None or not (self.ROPE_IN_QKV and self.HALF_TABLES) or not use_triton(device)
                or torch.compiler.is_compiling() or self.head_dim not in _gluon_gemm.ROPE_HEAD_DIMS):
            return None
        if self._fused_attention() and seq <= _rope_attention_module.MAX_FUSED_SEQ and not self.ROPE_IN_QKV_SHORT:
            return None
        return (*first_halves(*cos_sin), seq, self.head_dim)

    def qkv_rope_grad(self, x: torch.Tensor, weight: torch.Tensor,
                      cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> Optional[tuple]:
        """``linear_rope_keep_input``'s ``rope`` argument for this layer's qkv projection of x [batch,
        seq, hidden] with a gradient: ``(cos, sin, seq, head_dim)`` (half tables) where
        ``ROPE_IN_QKV_GRAD`` applies (sequences beyond rope_attention's fused kernel, which rotates as
        it loads, and the Gluon GEMM can run), else None."""
        if (not self.ROPE_IN_QKV_GRAD or cos_sin is None or not self.HALF_TABLES or not torch.is_grad_enabled()
                or torch.compiler.is_compiling() or not use_triton(x.device) or not self._fused_attention()
                or self.head_dim not in _gluon_gemm.ROPE_HEAD_DIMS
                or x.shape[1] <= _rope_attention_module.MAX_FUSED_SEQ
                or not _gluon_gemm.supported(x.reshape(-1, x.shape[-1]), weight, "rope")):
            return None
        return (*first_halves(*cos_sin), x.shape[1], self.head_dim)

    def _kernel_tables(self, cos_sin: tuple[torch.Tensor, torch.Tensor], device: torch.device):
        """The tables for hrm_kernels' RoPE kernels: with ``HALF_TABLES`` their first halves (views),
        one table load per rotated pair instead of two. This relies on the tables repeating their
        halves, as RotaryEmbedding's do (rotate-half RoPE); tables that do not would rotate
        differently here than on the eager backend and under torch.compile, which get the full
        tables (the reference's work)."""
        if not self.HALF_TABLES or not use_triton(device) or torch.compiler.is_compiling():
            return cos_sin
        return first_halves(*cos_sin)

    def first_query_heads(self, h: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``heads(h, cos_sin)[:, :1]``, position 0's query against every key: [batch, 1, hidden].
        Keys and values are projected (and keys rotated) for every position, the query for
        position 0 alone."""
        batch, seq, hidden = h.shape
        weight = self.qkv_proj.weight_as(h.dtype)  # (no bias: the projection has none)
        q = F.linear(h[:, :1], weight[:hidden]).view(batch, 1, self.num_heads, self.head_dim)
        kv = F.linear(h, weight[hidden:])
        k, v = kv.view(batch, seq, 2 * self.num_heads, self.head_dim).split(self.num_heads, dim=2)
        if cos_sin is not None:
            cos, sin = self._kernel_tables(cos_sin, h.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q at position 0, k at all
        return self._attend(q, k, v).reshape(batch, 1, hidden)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention, bidirectional: q [batch, queries, heads, head_dim], k and v [batch,
        keys, heads, head_dim] -> [batch, queries, heads, head_dim]."""
        if self._use_flash(q):
            out = _flash_attn_func(q, k, v, causal=False)
            return out[0] if isinstance(out, tuple) else out  # FlashAttention 3 also returns the log-sum-exp
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=False).transpose(1, 2)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate) * up)`` with ``gate, up`` the halves of one fused projection.

    Without gradients (most of a segment) and outside torch.compile, the activation runs in the
    gate_up matmul's epilogue (``hrm_kernels.linear_swiglu``), so [.., 2I] is never written;
    set ``FUSED_NO_GRAD = False`` to always use the matmul and the activation kernel. With
    gradients, the activation and the down projection run as ``hrm_kernels.swiglu_linear``, whose
    backward computes the SwiGLU gradient in the down projection's input-gradient matmul."""

    FUSED_NO_GRAD = True

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = CastedLinear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = CastedLinear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.down_proj.bias is None:
            return self.from_gate_up(self.gate_up_proj(x))
        return self.down_proj(self.hidden(x))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The gradient pass's ``forward`` from the gate_up projection [..., 2I]: [..., hidden]
        (no down_proj bias)."""
        return swiglu_linear(gate_up, self.down_proj.weight_as(gate_up.dtype))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up``: [..., intermediate_size], the down projection's input."""
        if (self.FUSED_NO_GRAD and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and self.gate_up_proj.bias is None):
            return linear_swiglu(x, self.gate_up_proj.weight_as(x.dtype))
        return swiglu(self.gate_up_proj(x))


class _LinearKeepInput(torch.autograd.Function):
    """``(x @ w^T, x)``: a linear layer that also hands its input on, for the residual branch that
    reads the same ``x``. Its backward sums the two gradients of ``x`` inside the input-gradient
    matmul, ``dx = dx_kept + dy @ w`` (cuBLAS's accumulating epilogue), instead of autograd's
    separate add of two [.., in] tensors. x: [..., in], w: [out, in] in x's dtype.

    The sum is written into ``dx_kept`` itself (an out-of-place addmm would first copy it: one
    more pass). That is safe where every other reader of that gradient runs before this node, as
    in the post-norm block: the kept ``x`` and the sublayer's output meet in one add+RMSNorm, whose
    backward hands the same tensor to both, and the sublayer's backward, which reads it, must
    finish before ``dy`` (this projection's output gradient) exists."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor):
        ctx.save_for_backward(x, w)
        return F.linear(x, w), x

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dx_kept: torch.Tensor):
        x, w = ctx.saved_tensors
        return _keep_input_grads(ctx, x, w, dx_kept, dy.reshape(-1, dy.shape[-1]))


class _LinearRopeKeepInput(torch.autograd.Function):
    """``_LinearKeepInput`` for a qkv projection whose q and k heads leave rotated: ``(rope_qkv(x @
    w^T), x)`` as one [..., 3 * hidden] tensor, RoPE in the Gluon GEMM's "rope" epilogue. RoPE is
    linear, so the backward needs no unrotated qkv: ``dqkv = rope^T(dq', dk'), dv`` (rope_qkv's
    gradient kernel, one pass), then ``dx = dx_kept + dqkv @ w`` and ``dw = dqkv^T x``. x: [batch, seq,
    in] contiguous, w: [3 * hidden, in] in x's dtype; rope: ``(cos, sin, seq, head_dim)`` half tables."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq: int,
                head_dim: int):
        ctx.save_for_backward(x, w, cos, sin)
        ctx.head_dim = head_dim
        y = _gluon_gemm.gemm(x.reshape(-1, x.shape[-1]), w, "rope", rope=(cos, sin, seq, head_dim))
        return y.view(*x.shape[:-1], -1), x

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dx_kept: torch.Tensor):
        from hrm_kernels.rope_qkv import _grad_launch

        x, w, cos, sin = ctx.saved_tensors
        batch, seq, width = dy.shape
        heads = width // 3 // ctx.head_dim
        dq, dk, dv = dy.reshape(batch, seq, 3 * heads, ctx.head_dim).split(heads, dim=2)
        dy2 = _grad_launch(dq, dk, dv, cos, sin).view(batch * seq, width)
        return *_keep_input_grads(ctx, x, w, dx_kept, dy2), None, None, None, None


def linear_rope_keep_input(x: torch.Tensor, w: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_keep_input`` with q and k rotated in the matmul (``_LinearRopeKeepInput``; same
    precondition on the kept x's gradient). rope: ``Attention.qkv_rope_grad``'s tuple."""
    return _LinearRopeKeepInput.apply(x, w, *rope)


def _keep_input_grads(ctx, x: torch.Tensor, w: torch.Tensor, dx_kept: torch.Tensor, dy2: torch.Tensor) -> tuple:
    """A keep-input linear's ``(dx, dw)`` from its output gradient ``dy2`` [rows, out]: ``dx = dx_kept +
    dy2 @ w`` (``_add_matmul``) and ``dw = dy2^T x``, each None where ``ctx`` needs none."""
    dx = _add_matmul(dx_kept, dy2, w).view(x.shape) if ctx.needs_input_grad[0] else None
    dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    return dx, dw


def _add_matmul(dx_kept: torch.Tensor, dy2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``dx_kept + dy2 @ w`` as [rows, in], written into ``dx_kept`` where it is contiguous (autograd
    hands in zeros when the kept x went unused): the keep-input functions' input gradient."""
    if dx_kept.is_contiguous():
        return dx_kept.view(dy2.shape[0], -1).addmm_(dy2, w)
    return torch.addmm(dx_kept.reshape(dy2.shape[0], -1), dy2, w)


class _SwiGLUMLPKeepInput(torch.autograd.Function):
    """``(down(silu(gate) * up), x)`` with ``gate, up`` the halves of ``x @ w_gate_up.T``: the MLP
    with its input handed on. Forward: the activation and gate_up from one kernel
    (``hrm_kernels.linear_swiglu.linear_swiglu_keep``), then the down projection; backward:
    ``swiglu_linear``'s (the SwiGLU gradient inside the dact matmul), the weight gradients, then
    ``dx = dx_kept + dgate_up @ w_gate_up`` written into ``dx_kept``. The same backward as
    ``linear_keep_input`` + ``swiglu_linear``, one pass less forward (no separate SwiGLU kernel).

    In the post-norm block both outputs meet in one add+RMSNorm, whose backward hands the *same*
    tensor as ``dy`` and ``dx_kept``: everything that reads ``dy`` runs before the in-place sum.
    x: [..., in]; w_gate_up: [2I, in], w_down: [out, I] in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
        rows = x.reshape(-1, x.shape[-1])
        act, gate_up = _linear_swiglu_module.linear_swiglu_keep(rows, w_gate_up)
        ctx.save_for_backward(rows, w_gate_up, w_down, gate_up, act)
        return F.linear(act, w_down).view(*x.shape[:-1], w_down.shape[0]), x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor, dx_kept: torch.Tensor):
        rows, w_gate_up, w_down, gate_up, act = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw_gate_up = dw_down = dgate_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dgate_up = swiglu_linear_backward(dy2, w_down, gate_up)
        if ctx.needs_input_grad[2]:
            dw_down = dy2.t() @ act
        if ctx.needs_input_grad[1]:
            dw_gate_up = dgate_up.t() @ rows
        if ctx.needs_input_grad[0]:  # last: dx_kept may be dy itself
            dx = _add_matmul(dx_kept, dgate_up, w_gate_up).view(dx_kept.shape)
        return dx, dw_gate_up, dw_down


def linear_keep_input(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.linear(x, w), x)`` whose backward adds the gradient reaching the returned ``x`` inside
    the matmul that computes ``dy @ w`` (``_LinearKeepInput``).

    Precondition: that gradient is written to in place, so nothing that runs later in the backward
    may read it. ``Block`` guarantees this (its only other reader, the sublayer's backward, runs
    first); a caller that also feeds the returned ``x`` into a branch whose backward runs after
    this node, or passes its own gradient tensor for it to ``backward``, gets it overwritten."""
    return _LinearKeepInput.apply(x, w)


class Block(nn.Module):
    """Post-norm transformer block: ``h = norm(h + attn(h)); h = norm(h + mlp(h))`` (weightless
    RMSNorm, the add fused into the norm).

    With ``FUSED_NO_GRAD`` the no-gradient passes outside torch.compile run each output projection
    with its add+RMSNorm as the matmul's epilogue (``hrm_kernels.linear_add_rms_norm``). Off: on an
    H100 it made the Sudoku training step slower (96.3 vs 88.7 ms), because its matmul runs well
    below cuBLAS's (benchmarks/RESULTS.md).

    With ``FUSED_GRAD_RESIDUAL`` (on) the gradient passes outside torch.compile hand each
    sublayer's input through its input projection (``linear_keep_input``), so the backward adds the
    residual branch's gradient inside that projection's input-gradient matmul instead of one
    [.., hidden] add per sublayer (H200, Sudoku training step: 71.7-72.2 vs 72.5-72.8 ms gated).
    That path calls the attention's and MLP's weights directly, not the ``self_attn``/``mlp`` and
    projection submodules: hooks on those modules do not fire there, and a full backward hook on
    ``o_proj`` must not keep its ``grad_output`` (it is summed into in place later). Set
    ``FUSED_GRAD_RESIDUAL`` False for such instrumentation. With ``linear_swiglu.GLUON_KEEPS_GATE_UP``
    (on) the MLP there runs as ``_SwiGLUMLPKeepInput`` where its Gluon GEMM can run: gate_up and
    the activation from one kernel. With ``Attention.ROPE_IN_QKV_GRAD`` (off) the attention's qkv
    projection there also rotates q and k in its epilogue past rope_attention's fused length
    (``linear_rope_keep_input``).

    With ``DEFERRED_NORM`` (on: H100, gated training step 71.3-71.6 vs 73.3-74.0 ms at Sudoku and
    125.9 vs 128.3 ms at ARC, benchmarks/RESULTS.md) the no-gradient passes outside
    torch.compile on a Hopper GPU keep each block's state as ``hrm_kernels.deferred_norm``'s
    ``(h, ss)``: the two add+RMSNorm passes of a block happen inside its matmuls' epilogues (Gluon
    GEMMs, also for gate_up + SwiGLU whatever ``linear_swiglu.USE_GLUON`` says), and
    ``ReasoningModule`` normalizes once after its last block. It takes precedence over
    ``FUSED_NO_GRAD`` where both could run, and calls the weights directly too."""

    FUSED_NO_GRAD = False
    FUSED_GRAD_RESIDUAL = True
    DEFERRED_NORM = True

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float,
                 attn_backend: str = "auto"):
        super().__init__()
        self.eps = float(eps)
        self.self_attn = Attention(hidden_size, num_heads, attn_backend)
        self.mlp = SwiGLUMLP(hidden_size, intermediate_size)

    def forward(self, h: torch.Tensor, cos_sin) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        if (self.FUSED_NO_GRAD and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and attn.o_proj.bias is None and mlp.down_proj.bias is None):
            h = linear_add_rms_norm(attn.heads(h, cos_sin), attn.o_proj.weight_as(h.dtype), h, self.eps)
            return linear_add_rms_norm(mlp.hidden(h), mlp.down_proj.weight_as(h.dtype), h, self.eps)
        if (self.FUSED_GRAD_RESIDUAL and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and attn.qkv_proj.bias is None and attn.o_proj.bias is None and mlp.gate_up_proj.bias is None
                and mlp.down_proj.bias is None):
            w_qkv = attn.qkv_proj.weight_as(h.dtype)
            rope = attn.qkv_rope_grad(h, w_qkv, cos_sin)
            if rope is None:
                qkv, h = linear_keep_input(h, w_qkv)
            else:  # q and k leave the matmul rotated
                qkv, h = linear_rope_keep_input(h, w_qkv, rope)
            h = rms_norm(h, residual=attn.from_qkv(qkv, cos_sin if rope is None else None), eps=self.eps)
            w_gate_up = mlp.gate_up_proj.weight_as(h.dtype)
            if _linear_swiglu_module.keeps_gate_up_in_gluon(h.reshape(-1, h.shape[-1]), w_gate_up):
                y, h = _SwiGLUMLPKeepInput.apply(h, w_gate_up, mlp.down_proj.weight_as(h.dtype))
                return rms_norm(h, residual=y, eps=self.eps)
            gate_up, h = linear_keep_input(h, w_gate_up)
            return rms_norm(h, residual=mlp.from_gate_up(gate_up), eps=self.eps)
        h = rms_norm(h, residual=self.self_attn(h, cos_sin), eps=self.eps)
        return rms_norm(h, residual=self.mlp(h), eps=self.eps)

    def runs_deferred(self, h: torch.Tensor) -> bool:
        """Whether ``deferred`` runs its fused kernels for this input: ``DEFERRED_NORM`` on, no
        gradient, outside torch.compile, no biases, and ``hrm_kernels.deferred_norm``'s kernels can
        run (Hopper, bf16/fp16, widths multiples of 8); elsewhere the plain forward is as fast."""
        attn, mlp = self.self_attn, self.mlp
        return (self.DEFERRED_NORM and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and deferred_norm.available(h)  # (before any weight cast)
                and all(p.bias is None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
                and deferred_norm.runs_fused(h, attn.o_proj.weight_as(h.dtype))
                and deferred_norm.runs_fused(h, mlp.gate_up_proj.weight_as(h.dtype), "swiglu"))

    def deferred(self, h: torch.Tensor, ss: Optional[torch.Tensor], cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on the state ``(h, ss)`` of ``hrm_kernels.deferred_norm`` (input ``rms_norm(h)``,
        or ``h`` when ``ss`` is None), returning the output state the same way: the block's two
        add+RMSNorm passes happen inside its matmuls. No gradient. h: [batch, seq, hidden]."""
        attn, mlp = self.self_attn, self.mlp
        shape, dtype = h.shape, h.dtype
        h = h.reshape(-1, shape[-1])
        rope = attn.qkv_rope(shape[1], cos_sin, h.device)  # RoPE in the qkv matmul, or in the attention
        # No local names for the intermediates (qkv, heads, act): each is freed as soon as the
        # next op has read it, not at return (here qkv and heads would stay allocated through the
        # MLP: 246 MiB more peak memory at the Sudoku batch)
        h, ss = deferred_norm.linear_add_sumsq(
            attn.heads_from_qkv(
                deferred_norm.norm_linear(h, ss, attn.qkv_proj.weight_as(dtype), self.eps, rope=rope).view(*shape[:-1], -1),
                cos_sin if rope is None else None).reshape(h.shape[0], -1),
            attn.o_proj.weight_as(dtype), h, ss, self.eps)
        h, ss = deferred_norm.linear_add_sumsq(
            deferred_norm.norm_linear(h, ss, mlp.gate_up_proj.weight_as(dtype), self.eps, "swiglu"),
            mlp.down_proj.weight_as(dtype), h, ss, self.eps)
        return h.view(shape), ss

    def first_position(self, h: torch.Tensor, cos_sin) -> torch.Tensor:
        """``forward(h, cos_sin)[:, :1]`` computed for position 0 alone (its attention still reads
        every position's keys and values): [batch, 1, hidden]."""
        attn = self.self_attn
        h0 = rms_norm(h[:, :1], residual=attn.o_proj(attn.first_query_heads(h, cos_sin)), eps=self.eps)
        return rms_norm(h0, residual=self.mlp(h0), eps=self.eps)
