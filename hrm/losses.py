"""The ACT loss head: LM loss + Q-learning halting losses, metrics, gate monitoring and the
optional gate-saturation regulariser.

Loss (summed over the sequences of the batch; the trainer scales it by 1/global_batch_size)::

    lm_loss         = sum_seq  sum_tok loss(logits, label) / n_valid_tokens(seq)
    q_halt_loss     = sum_seq  BCE_logits(q_halt, seq_is_exact)
    q_continue_loss = sum_seq  BCE_logits(q_continue, target_q_continue)     (training only)
    loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss) [+ gate_reg_loss]

Gate regulariser (``gate_reg_weight > 0``, gated models only)::

    sat_{m,k}     = mean over gate logits z of relu(|z| - ln 9)^2       (m in L, H; k in own, other[, inj])
    gate_reg_loss = w(step) * batch_size * mean_{m,k} sat_{m,k}
    w(step)       = gate_reg_weight * min(1, step / gate_reg_warmup_steps)   (full weight if no warm-up)

``sat`` is zero while a gate lies in [0.1, 0.9] (|z| <= logit(0.9) = ln 9) and grows quadratically
in the logit beyond, so its gradient pushes saturated gates back to the middle and does not vanish
as they saturate (a penalty on g itself would: dsigmoid -> 0). The ``batch_size`` factor makes the
term, after the trainer's division by the global batch size, ``w * mean saturation`` whatever the
batch size or number of ranks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hrm_kernels.gated_blend import GATE_KINDS, STATS_COLUMNS

IGNORE_LABEL_ID = -100
GATE_MODULES = ("L", "H")
# Live (module, kind) pairs: H's injection is zeros, its gate never matters.
GATE_PAIRS = tuple((m, k) for m in GATE_MODULES for k in GATE_KINDS if not (m == "H" and k == "inj"))
_COL = {name: i for i, name in enumerate(STATS_COLUMNS)}


def _stablemax_s(x: torch.Tensor, epsilon: float = 1e-30) -> torch.Tensor:
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s = _stablemax_s(x)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token ``-log stablemax(logits)[label]`` in float64 (0 where ignored). [..., V] -> [...]."""
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).to(torch.long)
    picked = torch.gather(logprobs, index=safe.unsqueeze(-1), dim=-1).squeeze(-1)
    return -torch.where(valid, picked, 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token softmax cross-entropy in float32 (0 where ignored). [..., V] -> [...]."""
    flat = F.cross_entropy(logits.to(torch.float32).reshape(-1, logits.shape[-1]), labels.to(torch.long).reshape(-1),
                           ignore_index=ignore_index, reduction="none")
    return flat.view(labels.shape)


LOSS_FUNCTIONS = {"stablemax_cross_entropy": stablemax_cross_entropy, "softmax_cross_entropy": softmax_cross_entropy}


def gate_metrics(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named monitoring values from ``gate_stats`` [2, 3, 5] (detached, 0-dim fp32).

    ``gate/<m>/<k>_{mean,frac_low,frac_high,contribution}`` (and ``_saturation`` when the stats carry
    that column: with the regulariser on) and ``gate/<m>/<k>_share`` = that source's contribution /
    the sum of the module's contributions."""
    stats = stats.detach()
    out: dict[str, torch.Tensor] = {}
    for mi, module in enumerate(GATE_MODULES):
        kinds = [k for (m, k) in GATE_PAIRS if m == module]
        contrib = stats[mi, :len(kinds), _COL["contribution"]]
        share = contrib / contrib.sum().clamp_min(torch.finfo(torch.float32).tiny)
        for ki, kind in enumerate(kinds):
            for col, name in enumerate(STATS_COLUMNS[:stats.shape[-1]]):
                out[f"gate/{module}/{kind}_{name}"] = stats[mi, ki, col]
            out[f"gate/{module}/{kind}_share"] = share[ki]
    return out


class ACTLossHead(nn.Module):
    """Wraps an ``HRM``: ``forward(return_keys=(), carry=..., batch=...) ->
    (carry, loss, metrics, outputs, all_halted)`` (see the module docstring for the loss).
    ``forward(..., metrics=False)`` runs the segment without the loss, the metrics (returned as
    None and ``{}``) and the gate stats that feed them: an evaluation's segments before its last,
    whose values nobody reads (a gated model's whole recurrence then replays as one CUDA graph).

    Metrics (0-dim tensors; counted over the sequences that halted this segment and have at least
    one label): ``count, accuracy, exact_accuracy, q_halt_accuracy, steps, lm_loss, q_halt_loss``,
    ``q_continue_loss`` (training); gated: ``gate/*`` (per-call means, see ``gate_metrics``),
    ``gate/count`` (1), and ``gate_reg_loss`` when the regulariser is on. ``reduce_metrics`` turns
    their sums into logged values.
    """

    def __init__(self, model: nn.Module, loss_type: Optional[str] = None):
        super().__init__()
        self.model = model
        config = getattr(model, "config", None)
        if loss_type is None:
            loss_type = config.loss.loss_type if config is not None else "stablemax_cross_entropy"
        if loss_type not in LOSS_FUNCTIONS:
            raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_FUNCTIONS)}")
        self.loss_type = loss_type
        self.loss_fn = LOSS_FUNCTIONS[loss_type]
        self.gate_reg_weight = float(getattr(config, "gate_reg_weight", 0.0) or 0.0)
        self.gate_reg_warmup_steps = int(getattr(config, "gate_reg_warmup_steps", 0) or 0)
        # The current regulariser weight w(step), a buffer so that a compiled head does not
        # recompile when it changes; not saved (state_dict keys stay the reference's).
        self.register_buffer("gate_reg_scale", torch.tensor(self.gate_reg_weight_at(0)), persistent=False)

    def gate_reg_weight_at(self, step: int) -> float:
        """``w(step)`` of the gate regulariser (0 when off)."""
        if self.gate_reg_weight <= 0:
            return 0.0
        if self.gate_reg_warmup_steps <= 0:
            return self.gate_reg_weight
        return self.gate_reg_weight * min(1.0, max(0, step) / self.gate_reg_warmup_steps)

    def set_step(self, step: int) -> None:
        """Tell the head the current optimizer step (for the regulariser's warm-up ramp)."""
        self.gate_reg_scale.fill_(self.gate_reg_weight_at(int(step)))

    def initial_carry(self, *args, **kwargs):
        return self.model.initial_carry(*args, **kwargs)

    def forward(self, return_keys: Sequence[str] = (), metrics: bool = True, **model_kwargs):
        new_carry, outputs = self.model(**model_kwargs) if metrics else self.model(**model_kwargs, gate_stats=False)
        if not metrics:
            if "preds" in return_keys:
                outputs["preds"] = torch.argmax(outputs["logits"], dim=-1)
            return new_carry, None, {}, _returned(outputs, new_carry.current_data, return_keys), new_carry.halted.all()
        labels = new_carry.current_data["labels"]
        logits = outputs["logits"]

        with torch.no_grad():
            outputs["preds"] = torch.argmax(logits, dim=-1)
            mask = labels != IGNORE_LABEL_ID
            loss_counts = mask.sum(-1)
            loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)
            is_correct = mask & (outputs["preds"] == labels)
            seq_is_correct = is_correct.sum(-1) == loss_counts
            valid = new_carry.halted & (loss_counts > 0)
            metrics = {
                "count": valid.sum(),
                "accuracy": torch.where(valid, (is_correct.to(torch.float32) / loss_divisor).sum(-1), 0).sum(),
                "exact_accuracy": (valid & seq_is_correct).sum(),
                "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_is_correct)).sum(),
                "steps": torch.where(valid, new_carry.steps, 0).sum(),
            }

        lm_loss = (self.loss_fn(logits, labels, ignore_index=IGNORE_LABEL_ID) / loss_divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(
            outputs["q_halt_logits"], seq_is_correct.to(outputs["q_halt_logits"].dtype), reduction="sum")
        metrics["lm_loss"] = lm_loss.detach()
        metrics["q_halt_loss"] = q_halt_loss.detach()
        loss = lm_loss + 0.5 * q_halt_loss
        if "target_q_continue" in outputs:
            q_continue_loss = F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum")
            metrics["q_continue_loss"] = q_continue_loss.detach()
            loss = loss + 0.5 * q_continue_loss

        stats = outputs.get("gate_stats")
        if stats is not None:
            metrics.update(gate_metrics(stats))
            metrics["gate/count"] = torch.ones((), dtype=torch.float32, device=stats.device)
            if self.gate_reg_weight > 0:
                saturation = stats[:, :, _COL["saturation"]]
                penalty = torch.stack([saturation[GATE_MODULES.index(m), GATE_KINDS.index(k)]
                                       for m, k in GATE_PAIRS]).mean()
                gate_reg_loss = self.gate_reg_scale * labels.shape[0] * penalty
                metrics["gate_reg_loss"] = gate_reg_loss.detach()
                loss = loss + gate_reg_loss

        return new_carry, loss, metrics, _returned(outputs, new_carry.current_data, return_keys), new_carry.halted.all()


def _returned(outputs: dict, data: dict, return_keys: Sequence[str]) -> dict:
    """The ``return_keys`` found in the model's outputs, else in the batch, detached."""
    return {k: (outputs[k] if k in outputs else data[k]).detach()
            for k in return_keys if k in outputs or k in data}


def reduce_metrics(summed: Mapping[str, object], global_batch_size: Optional[int], prefix: str = "train/") -> dict[str, float]:
    """Logged values from metric sums (over ranks, and over batches in evaluation).

    ``*loss`` keys are divided by ``global_batch_size`` (the reference's training rule; pass None
    to divide them by ``count`` as the reference's evaluation does),
    ``gate/*`` keys by ``gate/count`` (they are per-call means; ``gate/count`` is dropped), all
    others by ``count`` (floored at 1). ``count`` itself is logged raw (the reference logs
    count / count = 1, which says nothing).
    """
    values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in summed.items()}
    count = max(values.get("count", 0.0), 1.0)
    gate_count = max(values.get("gate/count", 0.0), 1.0)
    out: dict[str, float] = {}
    for key, value in values.items():
        if key == "gate/count":
            continue
        if key.endswith("loss"):
            value = value / (global_batch_size if global_batch_size is not None else count)
        elif key.startswith("gate/"):
            value = value / gate_count
        elif key != "count":
            value = value / count
        out[prefix + key] = value
    return out
