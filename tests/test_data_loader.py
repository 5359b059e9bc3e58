"""PuzzleDataset: reference on-disk format, training order (determinism, resume, rank shares),
test-mode walk with padding, and the error messages for missing or malformed datasets."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hrm.data import (DatasetFormatError, DatasetNotFoundError, PuzzleDataset, PuzzleDatasetConfig,
                      validate_dataset)
from hrm.data.common import SplitWriter, write_identifiers, write_writer_split

SEQ = 6


def _write_toy(root, n_groups=13, seed=0, dtype=np.uint8):
    """Groups of 1-3 puzzles with 1-4 examples each (ARC-like). Example e has input tokens
    (e % 7) + 1 and label 0 (ignored) at position 0, so batches can be traced back to examples."""
    rng = np.random.default_rng(seed)
    names = ["<blank>"]
    for split in ("train", "test"):
        w = SplitWriter(SEQ, dtype=dtype)
        e = 0
        for g in range(n_groups):
            puzzles, ids = [], []
            for p in range(int(rng.integers(1, 4))):
                exs = []
                for _ in range(int(rng.integers(1, 5))):
                    inp = np.full(SEQ, e % 7 + 1)
                    lab = np.full(SEQ, 2)
                    lab[0] = 0
                    exs.append((inp, lab))
                    e += 1
                puzzles.append(exs)
                names.append(f"{split}_{g}_{p}")
                ids.append(len(names) - 1)
            w.add_group(puzzles, ids)
        write_writer_split(str(root), split, w, vocab_size=9, num_puzzle_identifiers=200)
    write_identifiers(str(root), names)
    return str(root)


@pytest.fixture
def toy(tmp_path):
    return _write_toy(tmp_path / "toy")


def _ds(path, **kw):
    args = dict(seed=3, dataset_path=path, global_batch_size=8, test_set_mode=False)
    args.update(kw)
    return PuzzleDataset(PuzzleDatasetConfig(**args), split="test" if args["test_set_mode"] else "train")


def _batches(ds, n=None):
    out = []
    for item in ds:
        out.append(item)
        if n is not None and len(out) >= n:
            break
    return out


def _same(a, b):
    return a[0] == b[0] and a[2] == b[2] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_validate_and_metadata(toy):
    s = validate_dataset(toy)
    assert s["train"]["groups"] == 13
    ds = _ds(toy)
    assert ds.metadata.seq_len == SEQ and ds.metadata.sets == ["all"]
    assert ds.metadata.mean_puzzle_examples > 1


def test_train_batches_shape_dtype_and_sampling(toy):
    ds = _ds(toy)
    gi = np.load(os.path.join(toy, "train", "all__group_indices.npy"))
    batches = _batches(ds)
    assert len(batches) >= 2
    for name, b, gbs in batches:
        assert name == "all" and gbs == 8
        assert b["inputs"].shape == (8, SEQ) and b["inputs"].dtype == torch.int32
        assert b["labels"].dtype == torch.int32 and b["puzzle_identifiers"].dtype == torch.int32
        assert (b["labels"][:, 0] == -100).all() and (b["labels"][:, 1:] == 2).all()
        assert (b["puzzle_identifiers"] > 0).all()
    # One puzzle per group per epoch: identifiers of one iteration come from distinct groups.
    ids = torch.cat([b["puzzle_identifiers"] for _, b, _ in batches]).numpy()
    group_of = np.searchsorted(gi, ids - 1, side="right") - 1  # identifiers are 1 + puzzle index here
    distinct_puzzles = np.unique(ids)
    assert len(np.unique(group_of[np.isin(ids, distinct_puzzles)])) == len(distinct_puzzles)


def test_determinism_and_epochs_differ(toy):
    a = _batches(_ds(toy))
    b = _batches(_ds(toy))
    assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    ds = _ds(toy)
    e1, e2 = _batches(ds), _batches(ds)  # two iterations of one dataset: different orders
    assert not all(_same(x, y) for x, y in zip(e1, e2))
    c = _batches(_ds(toy, seed=4))
    assert not all(_same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop_after", [0, 1, 2, "end"])
def test_resume_mid_epoch_gives_identical_batches(toy, stop_after):
    ref = _ds(toy)
    ref_iters = [_batches(ref) for _ in range(3)]
    ref_batches = sum(ref_iters, [])

    run = _ds(toy)
    first = _batches(run)
    k = len(ref_iters[1]) if stop_after == "end" else stop_after
    # Interrupted run: one full iteration, then k batches of the second.
    got = list(first)
    it = iter(run)
    for _ in range(k):
        got.append(next(it))
    state = run.state_dict()
    assert state["iters"] == 1 and state["batch_index"] == k

    resumed = _ds(toy)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    got += _batches(resumed) + _batches(resumed)
    assert len(got) == len(ref_batches)
    assert all(_same(x, y) for x, y in zip(got, ref_batches))

    # The same position through the config fields.
    via_cfg = _ds(toy, start_iters=1, start_batch=k)
    assert all(_same(x, y) for x, y in zip(_batches(via_cfg), ref_batches[len(first) + k:]))


def test_resume_rejects_other_seed(toy):
    with pytest.raises(ValueError, match="seed"):
        _ds(toy).load_state_dict({"iters": 1, "batch_index": 0, "seed": 99})


@pytest.mark.parametrize("test_mode", [False, True])
def test_rank_shares_concatenate_to_global_batch(toy, test_mode):
    single = _batches(_ds(toy, test_set_mode=test_mode))
    shares = [_batches(_ds(toy, test_set_mode=test_mode, rank=r, num_replicas=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(single)
    for s, r0, r1 in zip(single, *shares):
        assert r0[2] == r1[2] == s[2]
        for k in s[1]:
            assert r0[1][k].shape[0] == 4
            assert torch.equal(torch.cat([r0[1][k], r1[1][k]]), s[1][k])


def test_test_mode_walks_all_examples_and_pads(toy):
    inputs = np.load(os.path.join(toy, "test", "all__inputs.npy"))
    pidx = np.load(os.path.join(toy, "test", "all__puzzle_indices.npy"))
    pids = np.load(os.path.join(toy, "test", "all__puzzle_identifiers.npy"))
    n = inputs.shape[0]
    ds = _ds(toy, test_set_mode=True)
    batches = _batches(ds)
    assert len(batches) == -(-n // 8) == ds.num_test_batches()
    sizes = [gbs for _, _, gbs in batches]
    assert sum(sizes) == n and sizes[:-1] == [8] * (len(sizes) - 1)
    got_inp = torch.cat([b["inputs"] for _, b, _ in batches]).numpy()
    got_pid = torch.cat([b["puzzle_identifiers"] for _, b, _ in batches]).numpy()
    got_lab = torch.cat([b["labels"] for _, b, _ in batches]).numpy()
    assert np.array_equal(got_inp[:n], inputs)
    assert np.array_equal(got_pid[:n], pids[np.searchsorted(pidx, np.arange(n), side="right") - 1])
    # Padding: pad inputs, ignored labels, blank identifier.
    assert (got_inp[n:] == 0).all() and (got_lab[n:] == -100).all() and (got_pid[n:] == 0).all()
    assert all(b["inputs"].shape == (8, SEQ) for _, b, _ in batches)


def test_loads_reference_style_arrays(tmp_path):
    # The reference writes int64/int32 token arrays depending on the builder, and may store
    # ignore_label_id as null; both must load.
    path = _write_toy(tmp_path / "ref", dtype=np.int64)
    meta_path = os.path.join(path, "train", "dataset.json")
    meta = json.load(open(meta_path))
    meta["ignore_label_id"] = None
    json.dump(meta, open(meta_path, "w"))
    b = _batches(_ds(path), 1)[0][1]
    assert b["inputs"].dtype == torch.int32 and (b["labels"][:, 0] == 0).all()


def test_missing_dataset_message_names_path_and_builder(tmp_path):
    missing = str(tmp_path / "data" / "arc-aug-1000")
    with pytest.raises(DatasetNotFoundError) as e:
        _ds(missing)
    assert missing in str(e.value) and "python -m hrm.data.arc --output-dir" in str(e.value)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        _ds(str(tmp_path / "sudoku-x"))
    os.makedirs(tmp_path / "maze-y" / "train")
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.json.*python -m hrm\.data\.maze"):
        _ds(str(tmp_path / "maze-y"))


@pytest.mark.parametrize("part", ["train", "test", "train/dataset.json", "train/all__inputs.npy"])
def test_data_path_inside_a_dataset_names_its_root(toy, part):
    """A split directory or a file of one given as the dataset: the error names the root to use
    instead of a build command that would build a dataset inside the existing one."""
    with pytest.raises(DatasetNotFoundError) as e:
        _ds(os.path.join(toy, part))
    assert f"data_path={toy}" in str(e.value) and "python -m" not in str(e.value)
    _ds(toy)  # the root itself loads


@pytest.mark.parametrize("path,command", [
    ("data/sudoku-gen-1k-aug-1000", "hrm.data.sudoku --output-dir data/sudoku-gen-1k-aug-1000 --subsample-size 1000 "
                                    "--num-aug 1000"),
    ("data/sudoku-extreme-1k-aug-1000", "hrm.data.sudoku --output-dir data/sudoku-extreme-1k-aug-1000 --difficulty "
                                        "extreme --subsample-size 1000 --num-aug 1000"),
    ("data/sudoku-plain", "hrm.data.sudoku --output-dir data/sudoku-plain --num-aug 0"),
    ("data/arc-aug-1000", "hrm.data.arc --output-dir data/arc-aug-1000 --num-aug 1000"),
    ("data/arc-2-aug-1000", "hrm.data.arc --output-dir data/arc-2-aug-1000 --dataset arc-agi-2 --num-aug 1000"),
    ("data/maze-30x30-hard-1k", "hrm.data.maze --output-dir data/maze-30x30-hard-1k --size 30"),
])
def test_build_hint_builds_what_the_name_says(path, command):
    """The hint's command carries the options the reference's directory names state (copies, size,
    difficulty, ARC version): the builders' defaults would build another dataset under that name."""
    from hrm.data import build_command_hint

    assert build_command_hint(path) == "python -m " + command


def test_missing_array_file(toy):
    os.remove(os.path.join(toy, "train", "all__labels.npy"))
    with pytest.raises(DatasetNotFoundError, match="all__labels.npy"):
        _batches(_ds(toy))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("seq_len"), "seq_len"),
    (lambda m: m.update(vocab_size="big"), "vocab_size"),
    (lambda m: m.update(pad_id=50), "pad_id"),
    (lambda m: m.update(sets=[]), "sets"),
])
def test_malformed_metadata_names_field(toy, edit, field):
    meta_path = os.path.join(toy, "train", "dataset.json")
    meta = json.load(open(meta_path))
    edit(meta)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(DatasetFormatError, match=f"'{field}'"):
        _ds(toy)


def test_metadata_not_json(toy):
    with open(os.path.join(toy, "train", "dataset.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        _ds(toy)


def test_validate_catches_inconsistent_arrays(toy):
    p = os.path.join(toy, "train", "all__puzzle_indices.npy")
    a = np.load(p)
    a[-1] += 1
    np.save(p, a)
    with pytest.raises(DatasetFormatError, match="puzzle_indices"):
        validate_dataset(toy)


def test_bad_batch_split(toy):
    with pytest.raises(ValueError, match="multiple"):
        _ds(toy, global_batch_size=9, num_replicas=2, rank=0)


def test_split_defaults_follow_mode(toy):
    assert PuzzleDataset(seed=0, dataset_path=toy, global_batch_size=4, test_set_mode=True).split == "test"
    assert PuzzleDataset(seed=0, dataset_path=toy, global_batch_size=4, test_set_mode=False).split == "train"
    assert PuzzleDataset(seed=0, dataset_path=toy, global_batch_size=4, test_set_mode=True, split="train").split == "train"


def _two_sets(toy):
    """The toy's train split stored twice, as sets ``a`` and ``b`` (as a dataset with several sets is)."""
    train = os.path.join(toy, "train")
    for name in os.listdir(train):
        if name.startswith("all__"):
            for s in ("a", "b"):
                shutil.copy(os.path.join(train, name), os.path.join(train, f"{s}__{name[5:]}"))
    meta_path = os.path.join(train, "dataset.json")
    meta = json.loads(open(meta_path).read())
    meta.update(sets=["a", "b"], total_groups=2 * meta["total_groups"])
    open(meta_path, "w").write(json.dumps(meta))
    return toy


@pytest.mark.parametrize("stop_in", ["a", "b", "a_end"])
def test_resume_inside_a_pass_over_several_sets(toy, stop_in):
    """With two sets an ``iter()`` is a pass over both (two iterations, one shuffle each): a position
    inside the pass continues with the rest of it, not from the first set again."""
    path = _two_sets(toy)
    ref = _ds(path)
    passes = [_batches(ref) for _ in range(2)]
    names = [name for name, _, _ in passes[0]]
    n_a = names.count("a")
    assert names == ["a"] * n_a + ["b"] * (len(names) - n_a) and 0 < n_a < len(names)
    assert ref.state_dict()["iters"] == 4

    run = _ds(path)
    k = {"a": 1, "b": n_a + 1, "a_end": n_a}[stop_in]
    it = iter(run)
    got = [next(it) for _ in range(k)]
    resumed = _ds(path)
    resumed.load_state_dict(run.state_dict())
    got += _batches(resumed)  # the rest of the first pass
    assert len(got) == len(passes[0]) and all(_same(x, y) for x, y in zip(got, passes[0]))
    assert resumed.state_dict()["iters"] == 2
    second = _batches(resumed)
    assert len(second) == len(passes[1]) and all(_same(x, y) for x, y in zip(second, passes[1]))
