"""Optimizers and the learning-rate schedule.

The main optimizer is ``hrm_kernels.AdamATan2`` (docs/REFERENCE.md, "Adam-atan2": the ``adam-atan2``
package's update, fused on CUDA, eager PyTorch on CPU), so training never depends on the
``adam-atan2`` CUDA extension that often fails to build. The puzzle embeddings use
``hrm.CastedSparseEmbeddingSignSGD``.
"""

from __future__ import annotations

import math

from hrm_kernels import AdamATan2  # noqa: F401  (re-exported for the trainer)


def cosine_schedule_with_warmup(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                                min_ratio: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then a half cosine down to
    ``base_lr * min_ratio`` at ``total_steps`` (the reference's schedule; ``step`` counts from 1)."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))
