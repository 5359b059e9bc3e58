"""The per-puzzle embedding table and its sign-SGD optimizer.

The table (``weights``, [num_puzzle_identifiers, D], zero-initialised, a persistent buffer so it
is never touched by the main optimizer) is far too large to update densely each step. In training
the rows of the current batch are copied into a leaf tensor ``local_weights`` [batch_size, D] that
receives the gradient, and ``CastedSparseEmbeddingSignSGD`` writes the update back into the rows:

    g_id = sum of the gradients of every row with that puzzle id, over all ranks
    w_id = w_id * (1 - lr * weight_decay) - lr * sign(g_id)
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from hrm.layers import trunc_normal_


class CastedSparseEmbedding(nn.Module):
    """Puzzle embedding lookup: ``weights[ids]`` cast to ``cast_to``.

    Buffers (names as in the reference): ``weights`` (persistent), ``local_weights`` and
    ``local_ids`` (per-batch, not saved). In training the batch must have exactly ``batch_size``
    rows (the leaf tensor has a fixed shape so that the optimizer and a compiled graph can hold it).
    ``local_weights`` is a buffer, so a module's or the main optimizer's ``zero_grad()`` leaves its
    gradient alone: ``CastedSparseEmbeddingSignSGD.zero_grad()`` clears it (the trainer calls both);
    code that runs several backward passes on one model without that optimizer must clear it too.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, batch_size: int, init_std: float,
                 cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.register_buffer("weights", trunc_normal_(torch.empty(num_embeddings, embedding_dim), std=init_std))
        self.register_buffer("local_weights", torch.zeros(batch_size, embedding_dim, requires_grad=True),
                             persistent=False)
        self.register_buffer("local_ids", torch.zeros(batch_size, dtype=torch.int32), persistent=False)
        # Set by the trainer around each micro-batch of a gradient-accumulation step: the rows of
        # the per-rank batch it holds (int64 [micro-batch] tensor; a tensor, so torch.compile
        # reuses one graph for every micro-batch). The forward fills those rows of the buffers,
        # whose gradient rows then add up to the whole batch's for the sparse optimizer. None:
        # the whole batch.
        self.row_index: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        # Module.to()/.cuda()/.double() store fn(buffer) outside no_grad: for the local_weights
        # leaf that is a copy with a grad_fn, whose .grad autograd never fills, so the puzzle
        # embedding would silently stop learning. Keep it a leaf that requires grad.
        super()._apply(fn, recurse)
        local = self._buffers["local_weights"]
        if not (local.is_leaf and local.requires_grad):
            self._buffers["local_weights"] = local.detach().requires_grad_(True)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.weights[ids].to(self.cast_to)
        index = self.row_index
        size = self.local_weights.shape[0] if index is None else index.shape[0]
        if ids.shape[0] != size:
            part = "" if index is None else f" and this micro-batch fills {size} of its rows"
            raise ValueError(f"puzzle embedding: a training batch has {ids.shape[0]} rows but the model was "
                             f"built with batch_size={self.local_weights.shape[0]} (the per-rank batch){part}; "
                             "training batches must be full")
        with torch.no_grad():
            if index is None:
                self.local_weights.copy_(self.weights[ids])
                self.local_ids.copy_(ids)
            else:
                self.local_weights.index_copy_(0, index, self.weights[ids])
                self.local_ids.index_copy_(0, index, ids.to(self.local_ids.dtype))
        if index is None:
            return self.local_weights.to(self.cast_to)
        return self.local_weights.index_select(0, index).to(self.cast_to)


def _sign_sgd_sparse_update(local_grad: Optional[torch.Tensor], local_ids: torch.Tensor, weights: torch.Tensor,
                            lr: float, weight_decay: float, world_size: int,
                            found_inf: Optional[torch.Tensor] = None) -> None:
    """The update of every row whose id is in the batch, without a host synchronisation: the
    number of distinct ids is never read on the host (``unique`` would have to). Rows are grouped
    by a stable sort of the ids; group s sums its gradients into ``grad[s]`` and writes row
    ``ids_of_group[s]``. The n - k unused groups (k distinct ids) repeat group 0's id and value,
    so every write to a row carries the same number. ``found_inf`` (a device scalar): when it is
    nonzero the rows keep their values. ``local_grad`` None (this rank ran no backward): with
    several ranks it still joins the gathers, its ids sent as ``-1 - id`` with zero gradients, and
    a row that no rank with a gradient has in its batch keeps its value (no weight decay)."""
    has_grad = local_grad is not None
    if not has_grad:
        local_grad = torch.zeros((local_ids.numel(), weights.shape[1]), dtype=weights.dtype, device=weights.device)
    sent_ids = local_ids if has_grad else -1 - local_ids
    all_grad, all_ids = local_grad, sent_ids
    if world_size > 1:
        n, d = local_grad.shape
        all_grad = local_grad.new_empty(world_size * n, d)
        all_ids = local_ids.new_empty(world_size * n)
        # (torch 2.14 renamed all_gather_into_tensor, which now warns on every call)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(all_grad, local_grad.contiguous())
        gather(all_ids, sent_ids.contiguous())
    n = all_ids.numel()
    if n == 0:
        return
    all_ids = all_ids.long()
    marked = world_size > 1  # (one process: it has a gradient, or it skipped the step)
    from_grad = all_ids >= 0 if marked else None  # entries of ranks that ran a backward
    sorted_ids, order = (torch.where(from_grad, all_ids, -1 - all_ids) if marked else all_ids).sort(stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = starts.cumsum(0) - 1  # group index of every sorted entry
    grad = all_grad.new_zeros(n, all_grad.shape[1]).index_add_(0, group, all_grad[order])
    ids = torch.zeros_like(sorted_ids).scatter_(0, group, sorted_ids)
    used = torch.arange(n, device=ids.device) <= group[-1]  # the first k groups
    ids = torch.where(used, ids, ids[0])
    rows = weights[ids]
    new_rows = rows * (1.0 - lr * weight_decay) - lr * torch.sign(grad).to(rows.dtype)
    if marked:  # rows that only ranks without a gradient had in their batch keep their values
        touched = torch.zeros(n, dtype=torch.int32, device=group.device).index_add_(
            0, group, from_grad[order].to(torch.int32)) > 0
        new_rows = torch.where(touched[:, None], new_rows, rows)
    if found_inf is not None:
        new_rows = torch.where(found_inf.to(torch.bool), rows, new_rows)
    weights[ids] = torch.where(used[:, None], new_rows, new_rows[:1])


class CastedSparseEmbeddingSignSGD(Optimizer):
    """Sign-SGD with decoupled weight decay for ``CastedSparseEmbedding`` (the reference's
    ``CastedSparseEmbeddingSignSGD_Distributed``).

    ``params``: the embedding module, or its three buffers (``module.buffers()``, the reference's
    way). ``world_size``: ranks to gather gradients from; ``None`` reads torch.distributed (1 when
    it is not initialised). ``lr`` may be 0 and is meant to be set per step through
    ``param_groups[i]["lr"]``. Embedding rows not in the batch are untouched (no decay either).
    """

    def __init__(self, params: Union[CastedSparseEmbedding, Iterable[torch.Tensor]], lr: float = 1e-3,
                 weight_decay: float = 1e-2, world_size: Optional[int] = None):
        if lr < 0:
            raise ValueError(f"CastedSparseEmbeddingSignSGD: lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"CastedSparseEmbeddingSignSGD: weight_decay must be >= 0, got {weight_decay}")
        if isinstance(params, CastedSparseEmbedding):
            params = [params.local_weights, params.local_ids, params.weights]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, world_size=world_size))
        for group in self.param_groups:
            self._split(group)  # validate early

    @staticmethod
    def _split(group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local_weights = local_ids = weights = None
        for p in group["params"]:
            if p.requires_grad:
                local_weights = p
            elif p.ndim == 1:
                local_ids = p
            elif p.ndim == 2:
                weights = p
        if local_weights is None or local_ids is None or weights is None or len(group["params"]) != 3:
            raise ValueError("CastedSparseEmbeddingSignSGD expects a CastedSparseEmbedding or its three buffers "
                             "(local_weights requiring grad, local_ids [B], weights [N, D])")
        return local_weights, local_ids, weights

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the hyper-parameters and state, but keeps each group's ``world_size``: how many
        ranks this process gathers from is where it runs now, not state (a run written on 2
        ranks and resumed on 1 would wait for a process group that does not exist; one resumed
        on more ranks would update only each rank's own rows)."""
        sizes = [group["world_size"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, size in zip(self.param_groups, sizes):
            group["world_size"] = size

    def _world_size(self, group) -> int:
        if group["world_size"] is not None:
            return int(group["world_size"])
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: Optional[torch.Tensor] = None):
        """``found_inf``: an optional device scalar; nonzero leaves every row as it is (the
        update is skipped on the device, with no host synchronisation)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            local_weights, local_ids, weights = self._split(group)
            world_size = self._world_size(group)
            grad = local_weights.grad
            if grad is None and world_size == 1:
                continue  # (with several ranks every rank must join the gathers: see the update)
            _sign_sgd_sparse_update(grad, local_ids, weights, float(group["lr"]),
                                    float(group["weight_decay"]), world_size, found_inf)
        return loss
