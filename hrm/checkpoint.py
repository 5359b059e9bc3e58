"""Loading reference, gated-reference and our own checkpoints without manual key editing.

Every key is reduced to its name inside the recurrent core: ``torch.compile``'s ``_orig_mod.``
components are removed wherever they are, then a leading ``model.`` (the loss head) and ``inner.``
(the ACT wrapper). Source and target are matched on these names, so a loss-head checkpoint loads
into a bare ``HRM`` and the other way round, compiled or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
from torch import nn

_ORIG_MOD = "_orig_mod."
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def canonical_key(key: str) -> str:
    """``_orig_mod.model._orig_mod.inner.L_level...`` -> ``L_level...``."""
    key = key.replace(_ORIG_MOD, "")
    if key.startswith("model."):
        key = key[len("model."):]
    if key.startswith("inner."):
        key = key[len("inner."):]
    return key


def read_tensors(path: Union[str, os.PathLike], who: str):
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only, no pickled
    code runs. A file it cannot read (truncated, not a checkpoint, a pickled module or other object)
    raises one error that names the file and the way out, instead of torch's advice to disable
    ``weights_only``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing file, permissions: torch's message says it
    except Exception as error:  # noqa: BLE001  (the unpickler raises many kinds on a foreign file)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
        reason = reason.split(". ")[0][:300]  # the cause, without torch's advice that follows it
        raise ValueError(
            f"{who}: {os.fspath(path)} is not a readable checkpoint ({type(error).__name__}: {reason}). "
            "Checkpoints are read without running code from the file, so they must hold tensors in plain "
            "dicts (save with torch.save(model.state_dict(), path)); a truncated file comes from an "
            "interrupted write or copy: use an earlier checkpoint") from error


def _read(path_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path):
            raise IsADirectoryError(f"load_checkpoint: {path} is a directory; pass the checkpoint file inside it "
                                    "(the reference writes one file per step, e.g. step_1234)")
        state = read_tensors(path, "load_checkpoint")
    else:
        state = path_or_state_dict
    if not isinstance(state, Mapping):
        raise TypeError(f"load_checkpoint: expected a state dict (a mapping of names to tensors), got "
                        f"{type(state).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in _WRAPPER_KEYS:  # a training checkpoint wrapping the model's state dict
            if isinstance(state.get(key), Mapping):
                return _read(state[key])
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise TypeError(f"load_checkpoint: entries {bad} are not tensors, and there is no "
                        f"{' / '.join(_WRAPPER_KEYS)} entry holding the model's state dict")
    return state


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the keys of ``state_dict`` to ``target.state_dict()``'s names where their canonical
    names match; keys with no match keep their own name."""
    target_names = {canonical_key(k): k for k in target.state_dict().keys()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = target_names.get(canonical_key(key), key)
        if name in out:
            raise ValueError(f"load_checkpoint: two checkpoint keys map to {name!r} (one of them {key!r})")
        out[name] = value
    return out


def _hints(missing: list[str], unexpected: list[str]) -> list[str]:
    hints = []
    gate_missing = any("gating_network" in k for k in missing)
    gate_unexpected = any("gating_network" in k for k in unexpected)
    if gate_unexpected and not gate_missing:
        hints.append("the checkpoint has gate networks: build the model with use_gating=true (arch=hrm_v1_gated)")
    if gate_missing and not gate_unexpected:
        hints.append("the checkpoint has no gate networks: build the model with use_gating=false (arch=hrm_v1)")
    if any("embed_pos" in k for k in unexpected):
        hints.append("the checkpoint has learned positions: set pos_encodings=learned")
    if any("embed_pos" in k for k in missing):
        hints.append("the checkpoint has no learned positions: set pos_encodings=rope")
    if any("puzzle_emb" in k for k in unexpected):
        hints.append("the checkpoint has a puzzle embedding: set puzzle_emb_ndim > 0")
    if any("puzzle_emb" in k for k in missing):
        hints.append("the checkpoint has no puzzle embedding: set puzzle_emb_ndim=0")
    if any(".layers." in k for k in missing + unexpected):
        hints.append("the number of blocks differs: check H_layers / L_layers")
    return hints


def load_checkpoint(model_or_head: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    strict: bool = True, puzzle_emb_mismatch: str = "error") -> LoadResult:
    """Load weights into an ``HRM``, an ``ACTLossHead`` (either possibly ``torch.compile``d) or an
    ``HRMInner`` from a checkpoint file (read with ``torch.load(weights_only=True)``) or a state dict,
    as written by the reference, its gated variant or this package.

    ``strict``: raise (listing every missing / unexpected key, with hints) unless the key sets match;
    with ``strict=False`` the matching keys are loaded and the lists returned.
    ``puzzle_emb_mismatch``: the checkpoint's puzzle-embedding table has another number of rows
    (another dataset): ``"error"`` (default) or ``"mean"`` (every row becomes the checkpoint's mean
    row, the reference's fine-tuning behaviour). Other shape mismatches always raise.
    """
    if puzzle_emb_mismatch not in ("error", "mean"):
        raise ValueError(f"puzzle_emb_mismatch must be 'error' or 'mean', got {puzzle_emb_mismatch!r}")
    source = normalize_state_dict(_read(path_or_state_dict), model_or_head)
    target = model_or_head.state_dict()

    missing = sorted(k for k in target if k not in source)
    unexpected = sorted(k for k in source if k not in target)
    if strict and (missing or unexpected):
        lines = ["load_checkpoint: the checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): " + ", ".join(unexpected))
        lines += [f"  hint: {h}" for h in _hints(missing, unexpected)]
        raise RuntimeError("\n".join(lines))

    mismatched = []
    for key in sorted(set(source) & set(target)):
        got, want = source[key].shape, target[key].shape
        if got == want:
            continue
        if canonical_key(key) == "puzzle_emb.weights" and len(got) == 2 and got[1] == want[1]:
            if puzzle_emb_mismatch == "mean":
                source[key] = source[key].float().mean(0, keepdim=True).expand(want).to(source[key].dtype).contiguous()
                continue
            mismatched.append(
                f"{key}: the checkpoint has {got[0]} puzzle identifiers, the model {want[0]} "
                f"(num_puzzle_identifiers comes from the dataset, so this is another dataset); pass "
                f"puzzle_emb_mismatch='mean' to start every puzzle from the checkpoint's mean embedding")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(got)} vs model {tuple(want)}")
    if mismatched:
        raise RuntimeError("load_checkpoint: shape mismatch (check hidden_size, expansion, vocab_size, seq_len, "
                           "gate_hidden_ratio, puzzle_emb_ndim against the checkpoint's config)\n  "
                           + "\n  ".join(mismatched))

    model_or_head.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    return LoadResult(missing, unexpected)
