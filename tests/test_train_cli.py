"""The training guide's commands, the user's own config directory, and config-mistake messages."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from train.config_utils import ConfigError, compose, parse_cli
from train.pretrain import check_config, resolve_config, run
from train.testing import QUIET, REPO, TINY_ARCH, build_tiny_sudoku4, subprocess_env

PRETRAIN = str(REPO / "train" / "pretrain.py")

# Every command of the guide (../shared/seed/hrm-gating-training-guide.md), `pretrain.py` ->
# `train/pretrain.py`, with what the composed config must hold.
GUIDE_COMMANDS = {
    "method1": ("python train/pretrain.py arch=hrm_v1_gated", {"arch.use_gating": True}),
    "method2": ("""python train/pretrain.py \\
                    arch=hrm_v1 \\
                    arch.use_gating=true \\
                    arch.gate_hidden_ratio=0.25 \\
                    arch.gate_init_bias=-2.2""",
                {"arch.use_gating": True, "arch.gate_hidden_ratio": 0.25, "arch.gate_init_bias": -2.2}),
    "basic": ("""python train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    data_path=path/to/your/data \\
                    global_batch_size=128 \\
                    lr=1e-4""",
              {"arch.use_gating": True, "data_path": "path/to/your/data", "global_batch_size": 128, "lr": 1e-4}),
    "distributed": ("""torchrun --nproc_per_node=4 train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    data_path=path/to/your/data \\
                    global_batch_size=512 \\
                    lr=2e-4""", {"global_batch_size": 512, "lr": 2e-4}),
    "custom": ("""python train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    data_path=path/to/your/data \\
                    global_batch_size=256 \\
                    epochs=50000 \\
                    eval_interval=5000 \\
                    lr=1e-4 \\
                    lr_warmup_steps=1000 \\
                    arch.gate_init_bias=-2.5 \\
                    arch.halt_max_steps=3 \\
                    project_name="HRM-Gating-Experiments" \\
                    run_name="gated-baseline\"""",
               {"epochs": 50000, "eval_interval": 5000, "lr_warmup_steps": 1000, "arch.gate_init_bias": -2.5,
                "arch.halt_max_steps": 3, "project_name": "HRM-Gating-Experiments", "run_name": "gated-baseline"}),
    "resume": ("""python train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    checkpoint_path=checkpoints/existing/run/path""",
               {"checkpoint_path": "checkpoints/existing/run/path"}),
    "scenario1": ("""python train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    arch.hidden_size=128 \\
                    arch.H_layers=2 \\
                    arch.L_layers=2 \\
                    global_batch_size=32 \\
                    epochs=1000 \\
                    eval_interval=100""",
                  {"arch.hidden_size": 128, "arch.puzzle_emb_ndim": 128, "arch.H_layers": 2, "arch.L_layers": 2,
                   "global_batch_size": 32, "epochs": 1000, "eval_interval": 100}),
    "scenario2": ("""torchrun --nproc_per_node=8 train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    data_path=data/arc-full \\
                    global_batch_size=768 \\
                    epochs=100000 \\
                    eval_interval=10000 \\
                    lr=1e-4 \\
                    lr_warmup_steps=2000 \\
                    checkpoint_every_eval=true \\
                    project_name="HRM-Gating-Production" \\
                    run_name="gated-full-v1\"""",
                  {"data_path": "data/arc-full", "checkpoint_every_eval": True, "project_name": "HRM-Gating-Production",
                   "run_name": "gated-full-v1"}),
    "ablation_ungated": ("""python train/pretrain.py \\
                    arch=hrm_v1 \\
                    run_name="ungated-baseline\"""", {"arch.use_gating": False, "run_name": "ungated-baseline"}),
    "ablation_gated": ("""python train/pretrain.py \\
                    arch=hrm_v1_gated \\
                    run_name="gated-default\"""", {"arch.use_gating": True, "run_name": "gated-default"}),
}


def guide_overrides(command: str) -> list[str]:
    """What the shell passes to train/pretrain.py for a guide command."""
    argv = shlex.split(command.replace("\\\n", " "))
    return argv[argv.index("train/pretrain.py") + 1:]


def select(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("name", sorted(GUIDE_COMMANDS))
def test_guide_command_composes(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command, expected = GUIDE_COMMANDS[name]
    cfg = compose(guide_overrides(command))
    for key, value in expected.items():
        assert select(cfg, key) == value, key
    # Reference defaults stay where the command does not touch them.
    assert cfg.arch.H_cycles == 2 and cfg.arch.num_heads == 8 and cfg.arch.gate_hidden_ratio in (0.25,)
    if not any(o.startswith("data_path=") for o in guide_overrides(command)):
        assert cfg.data_path == "data/arc-aug-1000"


def test_gated_arch_is_ungated_plus_gating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ungated, gated = compose(["arch=hrm_v1"]).arch, compose(["arch=hrm_v1_gated"]).arch
    diff = {k for k in ungated if ungated[k] != gated[k]}
    assert diff == {"use_gating"}
    assert compose([]).arch.use_gating is False
    assert ungated.hidden_size == 512 and ungated.H_layers == 4 and ungated.halt_max_steps == 16


def test_reference_training_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose([])
    want = dict(data_path="data/arc-aug-1000", global_batch_size=768, epochs=100000, eval_interval=10000,
                checkpoint_every_eval=True, lr=1e-4, lr_min_ratio=1.0, lr_warmup_steps=2000, beta1=0.9, beta2=0.95,
                weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, seed=0)
    assert {k: cfg[k] for k in want} == want


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_sudoku4(tmp_path_factory.mktemp("data") / "sudoku4")


@pytest.mark.parametrize("name", sorted(GUIDE_COMMANDS))
def test_guide_command_trains(name, tiny_data, tmp_path, monkeypatch):
    """Each guide command as written, plus a tiny model/dataset and two steps, trains and checkpoints."""
    monkeypatch.chdir(tmp_path)
    overrides = guide_overrides(GUIDE_COMMANDS[name][0])
    overrides = [o for o in overrides if not o.startswith("data_path=")]
    # Tiny sizes appended (the last value wins); test_guide_command_composes checks the guide's own.
    overrides += [f"data_path={tiny_data}", *TINY_ARCH, *QUIET, "max_steps=2", "global_batch_size=32"]
    run(overrides)
    ckpt_root = tmp_path / "checkpoints"
    files = list(ckpt_root.rglob("step_2.pt"))
    assert len(files) == 1, files
    expected = GUIDE_COMMANDS[name][1]
    if "project_name" in expected:
        assert files[0].parent.parent.name == expected["project_name"]
    if "run_name" in expected:
        assert files[0].parent.name == expected["run_name"]
    if name == "resume":
        assert files[0].parent == tmp_path / "checkpoints/existing/run/path"
    if "project_name" not in expected and name != "resume":
        assert files[0].parent.parent.name == "Sudoku4 ACT-torch"  # "<dataset dir> ACT-torch"
    if "run_name" not in expected and name != "resume":
        assert files[0].parent.name.startswith("HRM ")            # "<model class> <slug>"


MY_GATED_CONFIG = """\
# Custom gated HRM configuration
defaults:
  - hrm_v1_gated

# Override specific parameters
hidden_size: 256  # Smaller model for testing
H_layers: 2
L_layers: 2

# Adjust gating parameters
gate_hidden_ratio: 0.3  # Slightly larger gate networks
gate_init_bias: -1.5    # Gates start more open
"""


def test_user_config_dir(tiny_data, tmp_path):
    """Method 3: config/arch/my_gated_config.yaml in the working directory, arch=my_gated_config."""
    (tmp_path / "config" / "arch").mkdir(parents=True)
    (tmp_path / "config" / "arch" / "my_gated_config.yaml").write_text(MY_GATED_CONFIG)
    cmd = [sys.executable, PRETRAIN, "arch=my_gated_config", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import yaml

    cfg = yaml.safe_load(out.stdout)
    assert cfg["arch"]["hidden_size"] == 256 and cfg["arch"]["H_layers"] == 2 and cfg["arch"]["L_layers"] == 2
    assert cfg["arch"]["gate_hidden_ratio"] == 0.3 and cfg["arch"]["gate_init_bias"] == -1.5
    assert cfg["arch"]["use_gating"] is True and cfg["arch"]["H_cycles"] == 2  # inherited
    # And it trains, from that directory, through the script.
    tiny = [o for o in TINY_ARCH if not o.startswith(("arch.H_layers", "arch.L_layers"))]
    cmd = [sys.executable, PRETRAIN, "arch=my_gated_config", f"data_path={tiny_data}", *tiny, *QUIET,
           "max_steps=1", "run_name=mine"]
    out = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = (tmp_path / "checkpoints" / "Sudoku4 ACT-torch" / "mine" / "all_config.yaml").read_text()
    assert "gate_init_bias: -1.5" in saved and "H_layers: 2" in saved
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.log"))


def _error_of(overrides, cwd, monkeypatch, world_size=None):
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError) as e:
        cfg = resolve_config(overrides)
        if world_size is not None:
            from train.config_utils import to_container

            check_config(to_container(cfg), world_size)
        else:
            run(list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_error_unknown_key(tmp_path, monkeypatch):
    msg = _error_of(["arch.gate_hiden_ratio=0.3"], tmp_path, monkeypatch)
    assert "unknown config key 'arch.gate_hiden_ratio'" in msg
    msg = _error_of(["learning_rate=1e-3"], tmp_path, monkeypatch)
    assert "unknown config key 'learning_rate'" in msg
    msg = _error_of(["arch=hrm_v2"], tmp_path, monkeypatch)
    assert "unknown arch config 'hrm_v2'" in msg and "hrm_v1_gated" in msg


def test_error_arch_field_at_the_top_level(tmp_path, monkeypatch):
    """The guide names gate settings without the arch. prefix: the error points to it, and adding
    the field at the top level with '+' (which nothing reads) is refused rather than ignored."""
    msg = _error_of(["gate_init_bias=-3.0"], tmp_path, monkeypatch)
    assert "did you mean arch.gate_init_bias?" in msg and "+gate_init_bias" not in msg
    msg = _error_of(["+use_gating=true"], tmp_path, monkeypatch)
    assert "write arch.use_gating=true" in msg
    msg = _error_of(["arch=hrm_v1_gated", "arch.gate_init_bia=-3.0"], tmp_path, monkeypatch)
    assert "did you mean arch.gate_init_bias?" in msg
    msg = _error_of(["lr_warmup=10"], tmp_path, monkeypatch)
    assert "did you mean lr_warmup_steps?" in msg


def test_error_eval_interval(tiny_data, tmp_path, monkeypatch):
    msg = _error_of([f"data_path={tiny_data}", "epochs=1000", "eval_interval=300"], tmp_path, monkeypatch)
    assert "eval_interval=300 must divide epochs=1000" in msg


@pytest.mark.parametrize("override,expected", [
    ("wandb=off", "wandb must be true or false, got 'off'"),
    ("progress=1", "progress must be true or false, got 1"),
    ("beta1=1.5", "beta1 must be a number in [0, 1), got 1.5"),
    ("beta2=abc", "beta2 must be a number in [0, 1), got 'abc'"),
    ("log_interval=0", "log_interval must be a whole number >= 1, got 0"),
    ("seed=abc", "seed must be a whole number, got 'abc'"),
    ("device=gpu", "device must be auto, cpu or cuda, got 'gpu'"),
    # YAML's true is an int to Python: counts and rates given a boolean are refused, not read as 1
    ("epochs=true", "epochs must be a positive integer, got True"),
    ("eval_interval=true", "eval_interval must be a positive integer, got True"),
    ("global_batch_size=true", "global_batch_size must be a positive integer, got True"),
    ("max_steps=true", "max_steps must be null or an integer >= 0, got True"),
    ("lr=true", "lr must be a number >= 0, got True"),
])
def test_error_setting_values(override, expected, tiny_data, tmp_path, monkeypatch):
    """Values that would be taken silently (``wandb=off`` is a true string) or fail late."""
    assert expected in _error_of([f"data_path={tiny_data}", override], tmp_path, monkeypatch)


def test_error_batch_vs_ranks(tmp_path, monkeypatch):
    msg = _error_of(["global_batch_size=766"], tmp_path, monkeypatch, world_size=4)
    assert "global_batch_size=766 is not divisible by the number of ranks (4)" in msg


def test_error_missing_dataset_names_path_and_builder(tmp_path, monkeypatch):
    msg = _error_of(["arch=hrm_v1_gated"], tmp_path, monkeypatch)
    assert "data/arc-aug-1000" in msg and "python -m hrm.data.arc --output-dir data/arc-aug-1000" in msg


def test_error_malformed_dataset(tiny_data, tmp_path, monkeypatch):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    meta = json.loads((bad / "train" / "dataset.json").read_text())
    del meta["seq_len"]
    (bad / "train" / "dataset.json").write_text(json.dumps(meta))
    msg = _error_of([f"data_path={bad}"], tmp_path, monkeypatch)
    assert "dataset.json" in msg and "seq_len" in msg


def test_error_checkpoint_path_is_a_file(tmp_path, monkeypatch):
    """A checkpoint file given as checkpoint_path (evaluate.py's checkpoint= takes one) names both fixes."""
    ckpt = tmp_path / "run" / "step_4.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read")
    msg = _error_of([f"checkpoint_path={ckpt}"], tmp_path, monkeypatch)
    assert f"checkpoint_path={ckpt} is a file" in msg
    assert f"checkpoint_path={ckpt.parent};" in msg and f"init_from={ckpt}" in msg


def test_error_init_from_not_a_file(tmp_path, monkeypatch):
    msg = _error_of(["init_from=checkpoints/nope/step_9.pt"], tmp_path, monkeypatch)
    assert msg.startswith("init_from=checkpoints/nope/step_9.pt does not exist: it takes one checkpoint file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "step_7.pt").write_bytes(b"not read")
    msg = _error_of([f"init_from={run_dir}"], tmp_path, monkeypatch)
    assert f"init_from={run_dir} is a directory" in msg and f"e.g. init_from={run_dir / 'step_7.pt'}" in msg


def test_checkpoint_path_without_a_checkpoint_says_a_new_run_starts(tmp_path, monkeypatch, capsys):
    """A mistyped run directory is not resumed: the run says it starts anew (fresh runs may name
    their output directory this way, so it is a note, not an error)."""
    monkeypatch.chdir(tmp_path)
    resolve_config(["checkpoint_path=checkpoints/p/typo"])
    out = capsys.readouterr()
    assert ("note: checkpoint_path=checkpoints/p/typo does not exist: nothing to resume, so a NEW run starts "
            "there from step 0") in out.err
    assert "note" not in out.out  # stdout stays clean: --cfg job prints the config there
    resolve_config([])  # the default directory: no note
    assert "note:" not in capsys.readouterr().err


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, PRETRAIN, "arch.hiden_size=64"], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown config key 'arch.hiden_size'")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_parse_cli():
    assert parse_cli(["--config-name", "quickstart", "lr=1"]) == ("quickstart", ["lr=1"], None)
    assert parse_cli(["--config-name=quickstart.yaml"]) == ("quickstart", [], None)
    assert parse_cli(["--cfg", "job", "arch=hrm_v1"])[2] == "job"
    with pytest.raises(ConfigError):
        parse_cli(["--lr", "1"])


def test_quickstart_config_composes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose([], "quickstart")
    assert cfg.arch.use_gating is True and cfg.data_build == "quickstart" and cfg.arch.kernels == "auto"
    assert cfg.epochs % cfg.eval_interval == 0


def test_quickstart_builds_its_data_on_first_use(tmp_path, monkeypatch):
    """The README command's path, cut to two steps: the dataset appears, training runs, a
    checkpoint is written (the full run is measured by hand: see the README)."""
    monkeypatch.chdir(tmp_path)
    run(["max_steps=2", "wandb=false", "progress=false", "arch.kernels=eager"], config_name="quickstart")
    assert (tmp_path / "data" / "quickstart-sudoku4" / "test" / "dataset.json").is_file()
    assert list((tmp_path / "checkpoints" / "HRM quickstart").glob("*/step_2.pt"))


def _tiny_run(data, *extra):
    return [f"data_path={data}", *TINY_ARCH, *QUIET, "device=cpu", "max_steps=1", *extra]


def test_cli_triton_kernels_where_triton_cannot_run(tiny_data, tmp_path):
    """arch.kernels=triton on the CPU without Triton's interpreter: one line and exit 2 before any work
    (it used to load the data, build the model, start W&B, write the run directory, then fail at the
    first step with a traceback)."""
    out = subprocess.run([sys.executable, PRETRAIN, *_tiny_run(tiny_data, "arch.kernels=triton", "wandb=true")],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("error: arch.kernels=triton needs")
    assert "device is cpu" in lines[0] and "arch.kernels=auto" in lines[0] and "eager" in lines[0]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "wandb").exists()


def test_error_triton_backend_where_triton_cannot_run(tiny_data, tmp_path, monkeypatch):
    """The same in-process (the interpreter switched off), and for HRM_KERNELS_BACKEND=triton, which
    arch.kernels=auto defers to."""
    from hrm_kernels import backend

    monkeypatch.setattr(backend, "_INTERPRET", False)
    msg = _error_of(_tiny_run(tiny_data, "arch.kernels=triton"), tmp_path, monkeypatch)
    assert msg.startswith("arch.kernels=triton needs") and "TRITON_INTERPRET=1" in msg
    monkeypatch.setattr(backend, "_ENV_BACKEND", "triton")
    msg = _error_of(_tiny_run(tiny_data, "arch.kernels=auto"), tmp_path, monkeypatch)
    assert msg.startswith("HRM_KERNELS_BACKEND=triton") and "arch.kernels=eager" in msg
    assert not (tmp_path / "checkpoints").exists()


def test_error_flash_attention_where_it_cannot_run(tiny_data, tmp_path, monkeypatch):
    """arch.attn_backend=flash: FlashAttention not importable, a CPU device, float32 activations are
    each refused before any work, naming arch.attn_backend=sdpa (they failed while building the model,
    or at the first forward)."""
    import torch

    import hrm.layers

    args = _tiny_run(tiny_data, "arch.attn_backend=flash")
    if not hrm.layers.FLASH_ATTN_AVAILABLE:
        msg = _error_of(args, tmp_path, monkeypatch)
        assert msg.startswith("arch.attn_backend=flash needs FlashAttention") and "cannot be imported" in msg
        assert "use arch.attn_backend=sdpa" in msg
    monkeypatch.setattr(hrm.layers, "FLASH_ATTN_AVAILABLE", True)  # installed: then the device is the problem
    msg = _error_of(args, tmp_path, monkeypatch)
    assert msg.startswith("arch.attn_backend=flash runs on CUDA only") and "device is cpu" in msg
    assert "use arch.attn_backend=sdpa" in msg
    assert not (tmp_path / "checkpoints").exists()
    # On a CUDA device (checked without one): float32 activations.
    from train.pretrain import check_device_options

    cfg = {"arch": {"attn_backend": "flash", "forward_dtype": "float32", "kernels": "eager"}}
    with pytest.raises(ConfigError, match=r"needs bfloat16 or float16 activations, but arch.forward_dtype=float32"):
        check_device_options(cfg, torch.device("cuda"))
    check_device_options({"arch": {**cfg["arch"], "forward_dtype": "auto"}}, torch.device("cuda"))  # bf16: fine


def test_error_batch_larger_than_the_data(tiny_data, tmp_path, monkeypatch):
    """A global batch larger than the epochs' examples trained 0 steps and exited 0 with an empty
    step_0.pt; a batch larger than one iteration's (eval_interval epochs) examples did the same even
    though total_steps > 0 (the loader makes batches within an iteration and drops a partial one)."""
    # 272 training examples an epoch
    msg = _error_of(_tiny_run(tiny_data, "epochs=2", "eval_interval=1", "global_batch_size=1024"), tmp_path,
                    monkeypatch)
    assert msg.startswith("global_batch_size=1024 is larger than the training data: an epoch holds 272 examples")
    assert "epochs=2" in msg and "global_batch_size=272" in msg and "more epochs" in msg
    msg = _error_of(_tiny_run(tiny_data, "epochs=4", "eval_interval=1", "global_batch_size=384"), tmp_path,
                    monkeypatch)
    assert msg.startswith("global_batch_size=384 is larger than an iteration of the training data")
    assert "eval_interval=1 epoch(s) hold at most 272 examples" in msg and "global_batch_size=272" in msg
    assert "eval_interval=2" in msg
    assert not (tmp_path / "checkpoints").exists()
    # One iteration of 2 epochs holds 544 >= 384: it trains.
    run(_tiny_run(tiny_data, "epochs=4", "eval_interval=2", "global_batch_size=384"))
    assert list((tmp_path / "checkpoints").rglob("step_1.pt"))
