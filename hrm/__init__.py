"""hrm: the (gated) Hierarchical Reasoning Model on hrm_kernels.

Reference-exact (``kernels="eager"``, ``attn_backend="sdpa"``, ``forward_dtype="float32"`` computes
the public sapientinc/HRM function), checkpoint-compatible (``state_dict`` keys identical to the
reference's), ``torch.compile``-friendly, with gate monitoring and an optional gate regulariser.
The specification is ``docs/REFERENCE.md``.

Public API
----------

``HRMConfig(**fields)`` (pydantic v2)
    The ``arch`` config group. Data-derived fields (required): ``batch_size`` (per rank),
    ``seq_len``, ``vocab_size``, ``num_puzzle_identifiers``. Defaults = ``hrm_v1``: ``H_cycles=2,
    L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, expansion=4, num_heads=8,
    pos_encodings="rope", rope_theta=10000, puzzle_emb_ndim=None (= hidden_size; 0 disables),
    halt_max_steps=16, halt_exploration_prob=0.1, rms_norm_eps=1e-5, forward_dtype="bfloat16",
    use_gating=False, gate_hidden_ratio=0.25, gate_init_bias=-2.2, kernels="auto"
    (auto|triton|eager; auto defers to hrm_kernels' own choice / HRM_KERNELS_BACKEND),
    attn_backend="auto" (auto|flash|sdpa), gate_reg_weight=0.0 (off), gate_reg_warmup_steps=0,
    cuda_graphs=True`` (on CUDA and outside torch.compile, each segment's no-gradient recurrence
    and its with-gradient last L and H calls, forward and backward, replay as CUDA graphs captured
    on the first call per batch shape; see ``hrm.cuda_graphs``).
    ``name`` (the reference's class path string), ``causal`` (must be false; the reference trainer passes it) and ``loss`` (``{"loss_type": ...}``, the
    reference's ``arch.loss``) are accepted; any other unknown key is an error naming it.
    ``hrm_v1_gated`` = the same defaults with ``use_gating=True``.

``HRM(config)`` (``HRMConfig`` or a plain dict / DictConfig-as-dict)
    The ACT model. ``.inner`` holds the weights (``state_dict`` keys ``inner.*`` as the
    reference). ``initial_carry(batch) -> HRMCarry``; ``forward(carry, batch) -> (carry, outputs)``
    with ``batch = {"inputs", "labels", "puzzle_identifiers"}`` and outputs ``logits``,
    ``q_halt_logits``, ``q_continue_logits``, ``target_q_continue`` (training, halt_max_steps>1)
    and, when gated, ``gate_stats`` ([2, 3, 4] float32: module L/H x kind own/other/inj x
    ``hrm_kernels.gated_blend.STATS_COLUMNS[:4]``; with ``gate_reg_weight > 0`` [2, 3, 5], the
    fifth column, saturation, the only one that carries a gradient).
    ``HRMCarry`` fields: ``inner_carry`` (``z_H``, ``z_L``), ``steps``, ``halted``, ``current_data``.
    ``model.puzzle_emb``: the sparse puzzle embedding module (None when ``puzzle_emb_ndim=0``).
    In training the batch must have exactly ``batch_size`` rows (the puzzle embedding's leaf).
    Kernel choice: ``kernels`` wraps ``forward`` in ``hrm_kernels.use_backend`` (not for "auto");
    attention: FlashAttention when importable, on CUDA and fp16/bf16 (``attn_backend`` auto|flash),
    else ``F.scaled_dot_product_attention``.

``ACTLossHead(model, loss_type=None)``
    ``loss_type`` defaults to ``model.config.loss.loss_type`` ("stablemax_cross_entropy" or
    "softmax_cross_entropy"). ``.model``, ``initial_carry(batch)``,
    ``forward(return_keys=(), carry=..., batch=...) -> (carry, loss, metrics, outputs, all_halted)``.
    ``loss`` is summed over sequences (the trainer scales by 1/global_batch_size before backward).
    ``metrics`` (0-dim tensors, no host sync): the reference's ``count, accuracy, exact_accuracy,
    q_halt_accuracy, steps, lm_loss, q_halt_loss, q_continue_loss``; when gated also
    ``gate/<L|H>/<own|other|inj>_<mean|frac_low|frac_high|contribution|share>`` (and ``_saturation``
    when ``gate_reg_weight > 0``; no ``gate/H/inj_*``: H's injection is zeros), ``gate/count``
    (= 1 per call, the divisor for the ``gate/*`` sums) and ``gate_reg_loss`` (when
    ``gate_reg_weight > 0``).
    ``return_keys`` may name output keys (``logits``, ``q_halt_logits``, ..., ``preds``) or
    keys of the carry's current data (``inputs``, ``labels``, ``puzzle_identifiers``).
    ``set_step(step)``: tell the head the optimizer step (gate-regulariser warm-up); call it every
    step before forward; it only fills a buffer, so a compiled head does not recompile.

``reduce_metrics(summed, global_batch_size, prefix="train/")``
    Turn metric sums (over ranks and/or batches, as floats or tensors) into logged values the
    reference way: ``*loss`` / global_batch_size (/ count when ``global_batch_size`` is None, the
    reference's evaluation rule), ``gate/*`` / ``gate/count``, others / count; ``count`` raw.

Gate regularisation (``gate_reg_weight > 0``)
    ``loss += w(step) * batch_size * mean_{(m,k)} sat_{m,k}``, over the five live (module, kind)
    pairs, with ``sat = mean(relu(|z| - ln 9)^2)`` over the gate logits ``z`` (zero while every
    gate is in [0.1, 0.9]; pushes saturated gates back; the gradient does not vanish as gates
    saturate) and ``w(step) = gate_reg_weight * min(1, step / gate_reg_warmup_steps)``
    (``gate_reg_weight`` at once when warm-up is 0). The ``batch_size`` factor makes the term,
    after the trainer's 1/global_batch_size, equal ``w * mean saturation``.

``CastedSparseEmbeddingSignSGD(params_or_module, lr=1e-3, weight_decay=1e-2, world_size=None)``
    The puzzle-embedding optimizer. Pass ``head.model.inner.puzzle_emb`` (or its ``buffers()``, as
    the reference does). Per step: gradients of the per-batch rows are all-gathered across ranks
    (when torch.distributed is initialised with world_size > 1), summed per unique puzzle id, then
    ``p = p * (1 - lr * wd) - lr * sign(g)``. Set ``param_groups[0]["lr"]`` every step.

``load_checkpoint(model_or_head, path_or_state_dict, strict=True, puzzle_emb_mismatch="error")``
    Loads a reference / gated-reference / our own checkpoint (file or dict; ``model.`` prefix or
    not; ``_orig_mod.`` anywhere; a ``{"model": state_dict, ...}`` wrapper) with
    ``torch.load(weights_only=True)``. Errors list missing / unexpected keys. A puzzle-embedding
    table of another size is an error unless ``puzzle_emb_mismatch="mean"`` (every row set to the
    checkpoint's mean row, as the reference does when fine-tuning on a new dataset).
"""

from hrm.checkpoint import load_checkpoint, normalize_state_dict
from hrm.config import HRMConfig, LossConfig
from hrm.losses import ACTLossHead, reduce_metrics, softmax_cross_entropy, stablemax_cross_entropy
from hrm.model import HRM, HRMCarry, HRMInner, HRMInnerCarry
from hrm.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD

__all__ = [
    "HRMConfig", "LossConfig", "HRM", "HRMCarry", "HRMInner", "HRMInnerCarry",
    "ACTLossHead", "reduce_metrics", "stablemax_cross_entropy", "softmax_cross_entropy",
    "CastedSparseEmbedding", "CastedSparseEmbeddingSignSGD",
    "load_checkpoint", "normalize_state_dict",
]
