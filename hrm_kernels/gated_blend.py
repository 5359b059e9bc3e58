"""Gate MLP + sigmoid blend, the gated HRM's module input.

    g = sigmoid(W2 @ silu(W1 @ cat(own, other, inj) + b1) + b2)      # [..., 3D]
    g_own, g_other, g_inj = g.split(D, -1)
    out = g_own * own + g_other * other + g_inj * inj                   # [..., D]

Shapes: ``own``, ``other``, ``inj``: [..., D] (``inj=None`` means zeros: the H module's case);
``w1``: [R, 3D], ``b1``: [R], ``w2``: [3D, R], ``b2``: [3D] in ``nn.Linear`` layout. Weights may be
fp32 while activations are bf16/fp16: they are cast at use (as HRM's ``CastedLinear`` does) and
their gradients come back in their own dtype.

``stats=True`` also returns a float32 tensor ``[3, 5]``: one row per gate kind (own, other, inj),
columns ``STATS_COLUMNS``:

* ``mean``: mean gate value;
* ``frac_low``, ``frac_high``: fraction of gates below 0.1 / above 0.9;
* ``contribution``: mean ``|g_k * source_k|`` (each source's share of the module input);
* ``saturation``: the saturation penalty ``mean(relu(|z| - logit(0.9))^2)`` over the gate logits
  ``z``; zero while every gate lies in [0.1, 0.9], growing quadratically in the logit beyond, so
  its gradient pushes saturated gates back towards the middle without vanishing as they saturate.

Only ``saturation`` is differentiable (gradients given to the other columns are ignored: they are
monitoring values). With ``inj=None`` the injection gate is never computed and row 2 is zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hrm_kernels._utils import check_float, check_same

STATS_COLUMNS = ("mean", "frac_low", "frac_high", "contribution", "saturation")
GATE_KINDS = ("own", "other", "inj")
SATURATION_LOGIT = math.log(9.0)  # logit(0.9) = -logit(0.1)


def _check_args(own, other, inj, w1, b1, w2, b2) -> tuple[int, int]:
    op = "gated_blend"
    for name, t in (("own", own), ("other", other), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_float(name, t, op)
    check_same(op, "own", own, "other", other)
    if inj is not None:
        check_float("inj", inj, op)
        check_same(op, "own", own, "inj", inj)
    if own.dim() == 0:
        raise ValueError(f"{op}: own must have a last (feature) dimension, got a scalar")
    d = own.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != 3 * d:
        raise ValueError(f"{op}: w1 has shape {tuple(w1.shape)} but must be [R, 3*D] = [R, {3 * d}] "
                         f"for activations of shape {tuple(own.shape)}")
    r = w1.shape[0]
    expected = {"b1": (r,), "w2": (3 * d, r), "b2": (3 * d,)}
    for name, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but must be {expected[name]} "
                             f"for w1 {tuple(w1.shape)} and activations {tuple(own.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_same(op, "own", own, name, t, shape=False, dtype=False)
    return d, r


def gate_logits_reference(own, other, inj, w1, b1, w2, b2) -> torch.Tensor:
    """The gate logits z = W2 silu(W1 cat + b1) + b2, [..., 3D], in the activations' dtype."""
    dtype = own.dtype
    cat = torch.cat((own, other, inj if inj is not None else torch.zeros_like(own)), dim=-1)
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(cat, w1.to(dtype), b1.to(dtype)))
    return torch.nn.functional.linear(hidden, w2.to(dtype), b2.to(dtype))


def gated_blend_reference(own, other, inj, w1, b1, w2, b2, *, stats: bool = False):
    """Eager PyTorch math of ``gated_blend`` (weights cast to the activation dtype at use, as HRM's
    CastedLinear does); the CPU fallback and the test reference."""
    z = gate_logits_reference(own, other, inj, w1, b1, w2, b2)
    g_own, g_other, g_inj = torch.sigmoid(z).chunk(3, dim=-1)
    out = g_own * own + g_other * other
    if inj is not None:
        out = out + g_inj * inj
    if not stats:
        return out
    rows = []
    sources = (own, other, inj)
    for k, (g, zk) in enumerate(zip((g_own, g_other, g_inj), z.chunk(3, dim=-1))):
        if sources[k] is None:
            rows.append(torch.zeros(len(STATS_COLUMNS), dtype=torch.float32, device=own.device))
            continue
        gf = g.detach().float()
        with torch.no_grad():
            monitor = torch.stack((gf.mean(), (gf < 0.1).float().mean(), (gf > 0.9).float().mean(),
                                   (gf * sources[k].detach().float()).abs().mean()))
        saturation = torch.relu(zk.float().abs() - SATURATION_LOGIT).square().mean()
        rows.append(torch.cat((monitor, saturation[None])))
    return out, torch.stack(rows)


def gated_blend(own: torch.Tensor, other: torch.Tensor, inj: Optional[torch.Tensor],
                w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                *, stats: bool = False):
    """Gated blend of three sources (see the module docstring). Returns ``out`` [..., D], or
    ``(out, stats)`` with ``stats`` [3, 5] float32 when ``stats=True``."""
    _check_args(own, other, inj, w1, b1, w2, b2)
    # The fused Triton kernel lands with issue 3; until then every backend runs the eager math.
    return gated_blend_reference(own, other, inj, w1, b1, w2, b2, stats=stats)
