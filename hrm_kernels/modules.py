"""Thin ``nn.Module`` wrappers over the functional ops, for users' own models."""

from __future__ import annotations

import torch
from torch import nn

from hrm_kernels.rms_norm import rms_norm
from hrm_kernels.swiglu import swiglu


class RMSNorm(nn.Module):
    """``rms_norm(x, weight, residual=residual)``; ``elementwise_affine=False`` is HRM's weightless norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = (nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
                       if elementwise_affine else None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, residual=residual, eps=self.eps)


class SwiGLU(nn.Module):
    """``silu(gate) * up`` over ``gate_up = [gate, up]`` (the activation only, no projections)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up)
