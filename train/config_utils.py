"""Compose the training config with Hydra, and turn config mistakes into one clear line.

Composition uses Hydra's compose API (no ``hydra.main``): nothing changes the working directory,
no ``outputs/`` directories or log files appear, and the same function serves the command line,
``torchrun`` and tests. Config search path: ``train/config`` (this package) and
``<working directory>/config``, so a user's ``config/arch/my_gated_config.yaml`` works with
``arch=my_gated_config``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
DEFAULT_CONFIG_NAME = "cfg_pretrain"



def user_searchpath_override() -> str:
    """``hydra.searchpath=['file://<cwd>/config']``: os.getcwd(), not $PWD (stale under
    subprocess(cwd=...)), quoted for Hydra's override grammar."""
    path = (Path(os.getcwd()) / "config").as_posix()
    quoted = path.replace("\\", "\\\\").replace("'", "\\'")
    return f"hydra.searchpath=['file://{quoted}']"


class ConfigError(ValueError):
    """A user mistake in the config or command line; its message is meant to be shown as is."""


def compose(overrides: Sequence[str] = (), config_name: str = DEFAULT_CONFIG_NAME) -> DictConfig:
    """The composed, struct-mode config for ``overrides`` (Hydra override syntax)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    overrides = list(overrides)
    hydra_overrides = overrides
    if not any(o.lstrip("+").startswith("hydra.searchpath") for o in overrides):
        hydra_overrides = [user_searchpath_override()] + overrides
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None, job_name="pretrain"), \
                warnings.catch_warnings():
            # <cwd>/config usually does not exist; that is fine, not worth a warning.
            warnings.filterwarnings("ignore", message=r".*hydra\.searchpath.* is not available")
            cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides)
    except OverrideParseException as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"could not parse the command-line override(s) {overrides}: {first} "
                          "(expected key=value, e.g. lr=1e-4 arch.hidden_size=256)") from None
    except MissingConfigException as e:
        raise ConfigError(_missing_config_message(str(e), config_name)) from None
    except HydraException as e:
        raise ConfigError(_composition_message(e, overrides, config_name)) from None
    OmegaConf.set_struct(cfg, True)
    for override in overrides:  # '+use_gating=true' composes, but nothing reads a top-level use_gating
        key = override.split("=", 1)[0]
        if key.startswith("+") and not key.startswith("++") and key[1:] in cfg.get("arch", {}):
            raise ConfigError(f"{override!r} adds a top-level '{key[1:]}' that nothing reads: '{key[1:]}' is a "
                              f"setting of the model, write arch.{override[1:]}")
    return cfg


def _fields_near(key: str, overrides: Sequence[str], config_name: str) -> list[str]:
    """The full names of the config fields (arch's as ``arch.<field>``) that ``key`` may have meant:
    the same name one level down or up (``gate_init_bias`` for ``arch.gate_init_bias``), else close
    spellings of a field at the same level. The config is composed again with only the arch choice
    of ``overrides`` (``arch=...``), which composed before the unknown key stopped it."""
    try:
        base = compose([o for o in overrides if o.startswith("arch=")], config_name)
    except ConfigError:
        return []
    parent, _, leaf = key.rpartition(".")
    top = [k for k in base if not isinstance(base[k], DictConfig)]
    fields = {"": top, **{name: list(base[name]) for name in base if isinstance(base[name], DictConfig)}}
    if parent not in fields:
        return []
    moved = ([f"{name}.{leaf}" for name in fields if name and leaf in fields[name]] if not parent
             else [leaf] if leaf in top else [])
    if moved:
        return moved
    prefix = f"{parent}." if parent else ""
    return [prefix + f for f in difflib.get_close_matches(leaf, fields[parent], n=3, cutoff=0.75)]


def _missing_config_message(text: str, config_name: str) -> str:
    m = re.search(r"Could not find '([^']+)'", text)
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    if m and "/" in m.group(1):
        group, name = m.group(1).rsplit("/", 1)
        where = f"{CONFIG_DIR}/{group}/ or {os.getcwd()}/config/{group}/"
        avail = f" Available: {', '.join(options)}." if options else ""
        return f"unknown {group} config '{name}': no {name}.yaml in {where}.{avail}"
    if "Cannot find primary config" in text or (m is None):
        return (f"unknown config name '{config_name}': no {config_name}.yaml in {CONFIG_DIR} "
                "(use --config-name cfg_pretrain or quickstart)")
    return text.splitlines()[0]


def _composition_message(e: Exception, overrides: Sequence[str], config_name: str) -> str:
    cause = e.__cause__
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and cause is not None and "not in struct" in str(cause):
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        near = _fields_near(key, overrides, config_name)
        hint = f"did you mean {' or '.join(near)}?" if near else "check the spelling (--cfg job lists every field)"
        return (f"unknown config key '{key}': '{leaf}' is not a field of "
                f"{'the ' + parent + ' config' if parent else config_name}: {hint}")
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return f"'+{m.group(1)}' adds a field that already exists: write {m.group(1)}=... without the '+'"
    first = text.splitlines()[0] if text else type(e).__name__
    if cause is not None:
        first += f" ({str(cause).splitlines()[0]})"
    return first


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str], str | None]:
    """``[--config-name NAME] [--cfg job] [overrides...]`` -> (config_name, overrides, show)."""
    config_name = DEFAULT_CONFIG_NAME
    overrides: list[str] = []
    show = None
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config-name", "-cn"):
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a config name, e.g. {a} quickstart")
            config_name = args[i + 1]
            i += 2
            continue
        if a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif a in ("--cfg", "-c"):
            show = args[i + 1] if i + 1 < len(args) and not "=" in args[i + 1] else "job"
            i += 2 if show == (args[i + 1] if i + 1 < len(args) else None) else 1
            continue
        elif a in ("-h", "--help"):
            show = "help"
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}: pass settings as key=value "
                              "(e.g. arch=hrm_v1_gated lr=1e-4), or --config-name NAME")
        else:
            overrides.append(a)
        i += 1
    if config_name.endswith(".yaml"):
        config_name = config_name[: -len(".yaml")]
    return config_name, overrides, show


def exit_with(message: str, code: int = 2) -> None:
    """Print ``error: message`` and exit with ``code``. Under torchrun every rank hits the same
    config error: one process per machine (LOCAL_RANK 0) prints it, the others exit quietly."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
