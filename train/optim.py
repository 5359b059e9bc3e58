"""The main optimizer: Adam-atan2, from hrm_kernels (its fused implementation).

Until ``hrm_kernels.AdamATan2`` exists in an install, this module supplies the same update in
plain PyTorch (REFERENCE.md, "Adam-atan2"), so the trainer never depends on the ``adam-atan2``
CUDA extension that often fails to build.
"""

from __future__ import annotations

import torch

try:
    from hrm_kernels import AdamATan2  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on which hrm_kernels is installed

    class AdamATan2(torch.optim.Optimizer):
        """``p *= 1 - lr*wd; m += (1-b1)(g-m); v += (1-b2)(g*g-v);
        p -= lr/bc1 * atan2(m, sqrt(v)/sqrt(bc2))`` with bc_i = 1 - b_i^t. No epsilon; lr may be 0."""

        def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), weight_decay: float = 1e-2):
            if lr < 0:
                raise ValueError(f"lr must be >= 0, got {lr}")
            super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] += 1
                    t = float(state["step"])
                    g = p.grad
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.lerp_(g * g, 1 - beta2)
                    bc1 = 1 - beta1 ** t
                    bc2 = 1 - beta2 ** t
                    p.add_(torch.atan2(m, v.sqrt() / (bc2 ** 0.5)), alpha=-lr / bc1)
            return loss


def cosine_schedule_with_warmup(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                                min_ratio: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then a half cosine down to
    ``base_lr * min_ratio`` at ``total_steps`` (the reference's schedule; step counts from 1)."""
    import math

    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))
