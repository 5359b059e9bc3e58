"""Float64 truths for the kernel tests, written from each op's documented math (its module
docstring), not through the modules' ``<op>_reference``: those are the eager backend and the CPU
fallback, which the tests check against these. Inputs of any float dtype; results in float64,
differentiable (gradients by autograd)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from tests.tolerance import FLOOR, max_err


def assert_float32_math(name: str, eager32: torch.Tensor, ref64: torch.Tensor, scale: float | None = None) -> None:
    """The eager reference run in fp32 within tolerance.py's fp32 floor (1e-5 x scale, the same
    default scale) of the float64 formula: fp32 rounding stays far below it, so a math error in the
    reference fails here even where ``assert_close_to_reference`` cannot (on the eager backend
    ``got`` is that reference, so only its 5% cap applies)."""
    if scale is None:
        scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    err, bound = max_err(eager32, ref64), FLOOR[torch.float32] * scale
    assert err <= bound, f"{name}: fp32 reference's error {err:.3e} vs float64 exceeds {bound:.3e}"


def rms_norm64(x: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
               residual: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """h / sqrt(mean(h^2) + eps) * weight over the last dimension, h = x + residual."""
    h = x.double() if residual is None else x.double() + residual.double()
    y = h / torch.sqrt((h * h).sum(-1, keepdim=True) / h.shape[-1] + eps)
    return y if weight is None else y * weight.double()


def swiglu64(gate_up: torch.Tensor) -> torch.Tensor:
    """gate / (1 + exp(-gate)) * up, gate and up the first and second halves of the last dimension."""
    half = gate_up.shape[-1] // 2
    gate, up = gate_up.double()[..., :half], gate_up.double()[..., half:]
    return gate / (1 + torch.exp(-gate)) * up


def rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim] with halves (x1, x2), table row p at position p, tables'
    halves (c1, c2), (s1, s2): (x1 c1 - x2 s1, x2 c2 + x1 s2)."""
    half, seq = x.shape[-1] // 2, x.shape[1]
    x = x.double()
    c, s = cos.double()[:seq, None, :], sin.double()[:seq, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)


def rope_qkv64(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rope(q), rope(k), v), q, k, v the thirds of qkv [batch, seq, 3 * heads, head_dim] on dim 2."""
    q, k, v = qkv.double().chunk(3, dim=2)
    return rope64(q, cos, sin), rope64(k, cos, sin), v


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per batch and head, no mask; [batch, seq, heads, head_dim]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
    return torch.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdim=True), v.double())


def rope_attention64(qkv: torch.Tensor, cos: Optional[torch.Tensor] = None,
                     sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attention(rope(q), rope(k), v) (no rotation when cos is None)."""
    q, k, v = qkv.double().chunk(3, dim=2) if cos is None else rope_qkv64(qkv, cos, sin)
    return attention64(q, k, v)


def linear_swiglu64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """swiglu(x @ weight^T), weight [2I, K]."""
    return swiglu64(x.double() @ weight.double().T)


def swiglu_linear64(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """swiglu(gate_up) @ weight^T, weight [N, I]."""
    return swiglu64(gate_up) @ weight.double().T


def linear_add_rms_norm64(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                          eps: float = 1e-5) -> torch.Tensor:
    """rms_norm(residual + x @ weight^T), no weight."""
    return rms_norm64(x.double() @ weight.double().T, residual=residual, eps=eps)
