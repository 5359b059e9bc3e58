"""The model configuration (the trainer's ``arch`` group), validated with pydantic v2."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")
FORWARD_DTYPES = ("bfloat16", "float16", "float32")


class LossConfig(BaseModel):
    """The reference's ``arch.loss`` group: ``name`` (its class path, ignored) and ``loss_type``."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    loss_type: Literal["stablemax_cross_entropy", "softmax_cross_entropy"] = "stablemax_cross_entropy"


class HRMConfig(BaseModel):
    """HRM architecture fields (names and defaults of the reference's ``hrm_v1``) plus the gated
    variant, kernel selection and gate regularisation. See ``hrm/__init__.py`` for the meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Data-derived, filled in by the trainer.
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    num_puzzle_identifiers: int = Field(ge=1)

    puzzle_emb_ndim: Optional[int] = Field(default=None, ge=0)  # None: = hidden_size
    H_cycles: int = Field(default=2, ge=1)
    L_cycles: int = Field(default=2, ge=1)
    H_layers: int = Field(default=4, ge=1)
    L_layers: int = Field(default=4, ge=1)
    hidden_size: int = Field(default=512, ge=1)
    expansion: float = Field(default=4.0, gt=0)
    num_heads: int = Field(default=8, ge=1)
    pos_encodings: Literal["rope", "learned"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)
    halt_max_steps: int = Field(default=16, ge=1)
    halt_exploration_prob: float = Field(default=0.1, ge=0, le=1)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    forward_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    use_gating: bool = False
    gate_hidden_ratio: float = Field(default=0.25, gt=0)
    gate_init_bias: float = -2.2
    gate_reg_weight: float = Field(default=0.0, ge=0)
    gate_reg_warmup_steps: int = Field(default=0, ge=0)

    kernels: Literal["auto", "triton", "eager"] = "auto"
    attn_backend: Literal["auto", "flash", "sdpa"] = "auto"
    cuda_graphs: bool = True  # replay the recurrence (and the with-grad calls' backward) as CUDA graphs (CUDA, no torch.compile)

    # Accepted from the reference's hydra group.
    name: Optional[str] = None
    loss: LossConfig = Field(default_factory=LossConfig)
    causal: bool = False  # the reference trainer passes causal=False; HRM's attention is non-causal

    @field_validator("causal")
    @classmethod
    def _non_causal(cls, value: bool) -> bool:
        if value:
            raise ValueError("causal=True is not supported: HRM's attention is bidirectional")
        return value

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_from_mapping(cls, value: Any) -> Any:
        if isinstance(value, str):  # a bare loss type
            return {"loss_type": value}
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> "HRMConfig":
        if self.puzzle_emb_ndim is None:
            object.__setattr__(self, "puzzle_emb_ndim", self.hidden_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.pos_encodings == "rope" and self.head_dim % 2:
            raise ValueError(f"pos_encodings='rope' needs an even head dimension; hidden_size/num_heads = "
                             f"{self.hidden_size}/{self.num_heads} = {self.head_dim}")
        if self.use_gating and self.gate_hidden_size < 1:
            raise ValueError(f"gate_hidden_ratio={self.gate_hidden_ratio} gives a gate MLP of width "
                             f"int(hidden_size * gate_hidden_ratio) = {self.gate_hidden_size}; it must be >= 1")
        if self.gate_reg_weight > 0 and not self.use_gating:
            raise ValueError(f"gate_reg_weight={self.gate_reg_weight} regularises the gates, but use_gating "
                             "is false (there are no gates); set use_gating=true or gate_reg_weight=0")
        return self

    # ------------------------------------------------------------------ derived sizes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        """Number of sequence positions the puzzle embedding occupies: ceil(ndim / hidden)."""
        return -(-int(self.puzzle_emb_ndim) // self.hidden_size)

    @property
    def total_seq_len(self) -> int:
        return self.seq_len + self.puzzle_emb_len

    @property
    def intermediate_size(self) -> int:
        """SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256."""
        inter = round(self.expansion * self.hidden_size * 2 / 3)
        return -(-inter // 256) * 256

    @property
    def gate_hidden_size(self) -> int:
        return int(self.hidden_size * self.gate_hidden_ratio)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.forward_dtype)

    @classmethod
    def coerce(cls, config: Any) -> "HRMConfig":
        """An ``HRMConfig`` from itself, a mapping (dict, OmegaConf DictConfig) or keyword fields."""
        if isinstance(config, cls):
            return config
        if isinstance(config, BaseModel):  # another pydantic model, e.g. a trainer's arch config
            config = {**config.model_dump(), **(config.__pydantic_extra__ or {})}
        if hasattr(config, "items") and not isinstance(config, dict):
            try:
                from omegaconf import DictConfig, OmegaConf
            except ImportError:
                DictConfig = None
            if DictConfig is not None and isinstance(config, DictConfig):
                config = OmegaConf.to_container(config, resolve=True)  # resolves ${...} interpolations
            else:
                config = dict(config.items())
        if not isinstance(config, dict):
            raise TypeError(f"HRM config must be an HRMConfig or a mapping, got {type(config).__name__}")
        return cls(**config)
