"""Which implementation an op runs: the Triton kernels or the eager PyTorch fallback.

One switch, read at call time (so it also works inside ``torch.compile``d code, where every op is
an opaque ``torch.library`` custom op):

* the environment variable ``HRM_KERNELS_BACKEND=auto|triton|eager`` (default ``auto``);
* ``set_backend(name)`` and the context manager ``use_backend(name)``, which override it.

``auto`` runs Triton on CUDA tensors and the eager fallback on CPU tensors, except that with
``TRITON_INTERPRET=1`` (Triton's numpy interpreter, how CI tests the kernels) Triton runs on CPU
tensors too. ``triton`` where Triton cannot run raises an error instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "eager")
_override: str | None = None
# Read once at import: kernels pick the interpreter at decoration time anyway, and a plain global
# is something torch.compile can guard on (os.environ lookups are not).
_ENV_BACKEND = os.environ.get("HRM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown hrm_kernels backend {name!r}: choose one of {', '.join(BACKENDS)} "
            "(set HRM_KERNELS_BACKEND or call hrm_kernels.set_backend)"
        )
    return name


def get_backend() -> str:
    """The requested backend name: the Python override if set, else ``HRM_KERNELS_BACKEND``."""
    if _override is not None:
        return _override
    return _check(_ENV_BACKEND)


def set_backend(name: str | None) -> None:
    """Force ``name`` for every following call; ``None`` goes back to the environment variable
    (as read when hrm_kernels was imported)."""
    global _override
    _override = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("eager"): ...`` runs the block with that backend, then restores."""
    global _override
    previous, _override = _override, _check(name)
    try:
        yield
    finally:
        _override = previous


def triton_interpreting() -> bool:
    return _INTERPRET


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_can_run(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def use_triton(device: torch.device) -> bool:
    """Resolve the backend for tensors on ``device``: True for Triton, False for eager."""
    name = get_backend()
    if name == "eager":
        return False
    if name == "triton":
        if not triton_can_run(device):
            why = ("Triton is not installed" if not triton_available()
                   else f"Triton kernels run on CUDA tensors, or on CPU only with TRITON_INTERPRET=1 "
                        f"set before importing hrm_kernels; got a {device.type} tensor")
            raise RuntimeError(
                f"hrm_kernels backend 'triton' was requested but {why}. "
                "Use HRM_KERNELS_BACKEND=auto (or eager) to run the PyTorch fallback."
            )
        return True
    return triton_can_run(device)
