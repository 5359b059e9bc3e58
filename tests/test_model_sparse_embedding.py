"""The puzzle embedding and its sign-SGD optimizer (single process and 2-process gloo)."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hrm import ACTLossHead, CastedSparseEmbedding, CastedSparseEmbeddingSignSGD, HRM
from tests.test_model_spec import _single_thread, make_batch, tiny_config  # noqa: F401


def _expected_update(weights, ids, grads, lr, wd):
    """Per unique id: summed gradient, then p * (1 - lr * wd) - lr * sign(g); other rows untouched."""
    out = weights.clone()
    for pid in ids.unique():
        g = grads[ids == pid].sum(0)
        out[pid] = weights[pid] * (1 - lr * wd) - lr * torch.sign(g)
    return out


def test_sign_sgd_update_sums_duplicates_and_decays_only_touched_rows():
    emb = CastedSparseEmbedding(10, 6, batch_size=5, init_std=1.0, cast_to=torch.float32)
    emb.train()
    ids = torch.tensor([3, 7, 3, 0, 3], dtype=torch.int32)
    out = emb(ids)
    assert torch.equal(out, emb.weights[ids.long()])
    upstream = torch.randn(5, 6)
    upstream[0, 0], upstream[2, 0], upstream[4, 0] = 1.0, -3.0, 1.5  # sums to -0.5: sign -1
    (out * upstream).sum().backward()
    assert torch.equal(emb.local_weights.grad, upstream)
    before = emb.weights.clone()
    opt = CastedSparseEmbeddingSignSGD(emb, lr=0.0, weight_decay=0.1)
    for group in opt.param_groups:  # the trainer sets lr every step
        group["lr"] = 0.05
    opt.step()
    want = _expected_update(before, ids.long(), upstream, 0.05, 0.1)
    assert torch.allclose(emb.weights, want, atol=1e-7)
    assert emb.weights[3, 0].item() == pytest.approx(before[3, 0].item() * (1 - 0.005) + 0.05, abs=1e-6)
    untouched = [i for i in range(10) if i not in (0, 3, 7)]
    assert torch.equal(emb.weights[untouched], before[untouched])
    opt.zero_grad()
    assert emb.local_weights.grad is None


def test_reference_style_buffers_argument_and_eval_lookup():
    model = HRM(tiny_config(puzzle_emb_ndim=32))
    emb = model.puzzle_emb
    opt = CastedSparseEmbeddingSignSGD(emb.buffers(), lr=1e-2, weight_decay=0.1)  # the reference's call
    head = ACTLossHead(model)
    head.train()
    batch = make_batch(None, ignore_some=False)  # every row has labels: every row gets a gradient
    _, loss, _, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    assert emb.local_weights.grad is not None and emb.local_weights.grad.abs().sum() > 0
    opt.step()
    changed = (emb.weights != 0).any(-1)
    assert set(changed.nonzero().flatten().tolist()) == set(batch["puzzle_identifiers"].tolist())
    model.eval()  # evaluation reads the table directly, any batch size
    rows = emb(torch.tensor([1, 2]))
    assert torch.equal(rows, emb.weights[[1, 2]])
    # the main optimizer never sees the table: it is a buffer, not a parameter
    assert not any("puzzle_emb" in n for n, _ in head.named_parameters())


def test_training_batch_must_be_full():
    emb = CastedSparseEmbedding(10, 4, batch_size=4, init_std=0.0, cast_to=torch.float32)
    emb.train()
    with pytest.raises(ValueError, match="batch_size=4"):
        emb(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="three buffers"):
        CastedSparseEmbeddingSignSGD([emb.weights], lr=0.1)


def _worker(rank, world_size, init_file, result_file, backward_on=(0, 1)):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same table on every rank
        emb = CastedSparseEmbedding(8, 4, batch_size=3, init_std=1.0, cast_to=torch.float32)
        emb.train()
        ids = torch.tensor([[1, 5, 1], [5, 2, 6]][rank], dtype=torch.int32)
        grad = torch.arange(12, dtype=torch.float32).view(3, 4) * (1 if rank == 0 else -1) - 2.5
        out = emb(ids)
        if rank in backward_on:
            (out * grad).sum().backward()
        CastedSparseEmbeddingSignSGD(emb, lr=0.1, weight_decay=0.5).step()  # world_size read from dist
        if rank == 0:
            torch.save(emb.weights, result_file)
        dist.barrier()  # both ranks done before teardown (gloo aborted a rank leaving early once in CI)
    finally:
        dist.destroy_process_group()


def test_gradients_are_gathered_across_ranks(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file, result_file = tmp_path / "init", tmp_path / "weights.pt"
    mp.spawn(_worker, args=(2, str(init_file), str(result_file)), nprocs=2, join=True)
    got = torch.load(result_file, weights_only=True)
    torch.manual_seed(0)
    before = CastedSparseEmbedding(8, 4, batch_size=3, init_std=1.0, cast_to=torch.float32).weights
    ids = torch.tensor([1, 5, 1, 5, 2, 6])
    grads = torch.cat([torch.arange(12.0).view(3, 4) - 2.5, -torch.arange(12.0).view(3, 4) - 2.5])
    want = _expected_update(before, ids, grads, 0.1, 0.5)
    assert torch.allclose(got, want, atol=1e-6)
    # id 5 is on both ranks: its update uses the sum over both, not either rank's own gradient
    assert not torch.allclose(want[5], _expected_update(before, ids[:3], grads[:3], 0.1, 0.5)[5])


def test_found_inf_skips_the_update_on_the_device():
    emb = CastedSparseEmbedding(10, 4, batch_size=4, init_std=1.0, cast_to=torch.float32)
    emb.train()
    ids = torch.tensor([5, 0, 5, 9], dtype=torch.int32)
    (emb(ids) * torch.randn(4, 4)).sum().backward()
    before = emb.weights.clone()
    opt = CastedSparseEmbeddingSignSGD(emb, lr=0.1, weight_decay=0.1)
    opt.step(found_inf=torch.tensor(1.0))
    assert torch.equal(emb.weights, before)
    opt.step(found_inf=torch.tensor(0.0))
    want = _expected_update(before, ids.long(), emb.local_weights.grad, 0.1, 0.1)
    assert torch.allclose(emb.weights, want, atol=1e-7) and not torch.equal(emb.weights, before)


def test_moved_embedding_keeps_its_rows_a_leaf():
    """``.to(...)`` after construction (here a dtype change; ``.cuda()`` is the same code path): the
    per-batch rows stay a leaf, so the loss still reaches them (a copy with a grad_fn would leave
    .grad None, and the embedding would never be updated)."""
    emb = CastedSparseEmbedding(10, 6, batch_size=4, init_std=1.0, cast_to=torch.float64).double()
    emb.train()
    (emb(torch.tensor([1, 5, 5, 9], dtype=torch.int32)) ** 2).sum().backward()
    assert emb.local_weights.is_leaf and emb.local_weights.dtype == torch.float64
    assert emb.local_weights.grad is not None and emb.local_weights.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_moved_to_cuda_trains_its_puzzle_embedding():
    model = HRM(tiny_config(puzzle_emb_ndim=32)).cuda()
    head = ACTLossHead(model)
    head.train()
    batch = {k: v.cuda() for k, v in make_batch(None).items()}
    _, loss, _, _, _ = head(carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    rows = model.inner.puzzle_emb.local_weights
    assert rows.is_leaf and rows.grad is not None and rows.grad.abs().sum() > 0
    opt = CastedSparseEmbeddingSignSGD(model.inner.puzzle_emb, lr=0.1, weight_decay=0.0)
    before = model.inner.puzzle_emb.weights.clone()
    opt.step()
    assert not torch.equal(model.inner.puzzle_emb.weights, before)


@pytest.mark.parametrize("saved,now", [(2, 1), (1, 2), (2, None)])
def test_load_state_dict_keeps_this_process_world_size(saved, now):
    """A checkpoint written on ``saved`` ranks and resumed on ``now`` (None: read from
    torch.distributed): the hyper-parameters come back, the world size stays where the process
    runs. Then a step on one process updates as a one-process optimizer does."""
    emb = CastedSparseEmbedding(10, 4, batch_size=4, init_std=1.0, cast_to=torch.float32)
    state = CastedSparseEmbeddingSignSGD(emb, lr=0.3, weight_decay=0.2, world_size=saved).state_dict()
    opt = CastedSparseEmbeddingSignSGD(emb, lr=0.0, weight_decay=0.0, world_size=now)
    opt.load_state_dict(state)
    assert [(g["lr"], g["weight_decay"], g["world_size"]) for g in opt.param_groups] == [(0.3, 0.2, now)]
    if now == 2:
        return  # a two-rank step needs a process group (test_gradients_are_gathered_across_ranks)
    emb.train()
    ids = torch.tensor([3, 7, 3, 1], dtype=torch.int32)
    (emb(ids) * torch.randn(4, 4)).sum().backward()
    before = emb.weights.clone()
    opt.step()  # saved=2 would all-gather here without a process group
    assert torch.allclose(emb.weights, _expected_update(before, ids.long(), emb.local_weights.grad, 0.3, 0.2), atol=1e-7)


@pytest.mark.parametrize("backward_on", [(0,), ()], ids=["rank 0 only", "neither"])
def test_a_rank_without_a_gradient_joins_but_decays_nothing(tmp_path, backward_on):
    """A rank whose embedding got no gradient still joins the gathers (or the others would hang), but
    its batch's rows get no weight decay from it: only rows of ranks with a gradient change (with no
    gradient anywhere, none), as a single process skips the step."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file, result_file = tmp_path / "init", tmp_path / "weights.pt"
    mp.spawn(_worker, args=(2, str(init_file), str(result_file), backward_on), nprocs=2, join=True)
    got = torch.load(result_file, weights_only=True)
    torch.manual_seed(0)
    before = CastedSparseEmbedding(8, 4, batch_size=3, init_std=1.0, cast_to=torch.float32).weights
    if backward_on:  # rank 0's ids 1, 5 (5 is rank 1's too: its gradient comes from rank 0 alone)
        want = _expected_update(before, torch.tensor([1, 5, 1]), torch.arange(12.0).view(3, 4) - 2.5, 0.1, 0.5)
    else:
        want = before
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[[2, 6]], before[[2, 6]])  # rank 1's own rows
