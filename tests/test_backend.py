"""Backend switch: names, precedence, the interpreter rule, and the clear error."""

import pytest
import torch

import hrm_kernels
from hrm_kernels import backend


def test_use_backend_restores_and_nests():
    before = backend.get_backend()
    with hrm_kernels.use_backend("eager"):
        assert backend.get_backend() == "eager"
        with hrm_kernels.use_backend("triton"):
            assert backend.get_backend() == "triton"
        assert backend.get_backend() == "eager"
    assert backend.get_backend() == before


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown hrm_kernels backend 'cuda'.*auto, triton, eager"):
        hrm_kernels.set_backend("cuda")


def test_auto_resolution(monkeypatch):
    cpu = torch.device("cpu")
    with hrm_kernels.use_backend("auto"):
        monkeypatch.setattr(backend, "_INTERPRET", True)
        assert backend.use_triton(cpu)  # interpreter: kernels run on CPU tensors
        monkeypatch.setattr(backend, "_INTERPRET", False)
        assert not backend.use_triton(cpu)  # plain CPU: eager fallback
        assert backend.use_triton(torch.device("cuda"))
    with hrm_kernels.use_backend("eager"):
        assert not backend.use_triton(torch.device("cuda"))


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_INTERPRET", False)
    with hrm_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        hrm_kernels.rms_norm(torch.randn(2, 8))


def test_eager_backend_runs_reference():
    x = torch.randn(3, 37)
    with hrm_kernels.use_backend("eager"):
        assert torch.equal(hrm_kernels.rms_norm(x), hrm_kernels.rms_norm_reference(x))
