"""hrm_kernels: fused Triton kernels for gated Hierarchical Reasoning Models.

Every op has an eager PyTorch fallback (also its test reference) and is registered through
``torch.library`` so that ``torch.compile`` sees it as one node. Which implementation runs is
chosen by ``HRM_KERNELS_BACKEND`` / ``use_backend`` (see ``hrm_kernels.backend``).
"""

from hrm_kernels.adam_atan2 import AdamATan2
from hrm_kernels.add3 import add3, add3_reference
from hrm_kernels.backend import BACKENDS, get_backend, set_backend, use_backend
from hrm_kernels.gated_blend import gated_blend, gated_blend_reference
from hrm_kernels.linear_add_rms_norm import linear_add_rms_norm, linear_add_rms_norm_reference
from hrm_kernels.linear_swiglu import linear_swiglu, linear_swiglu_reference
from hrm_kernels.modules import RMSNorm, SwiGLU
from hrm_kernels.precompile import compile_ahead
from hrm_kernels.rms_norm import rms_norm, rms_norm_reference
from hrm_kernels.rope import first_halves, rope, rope_reference
from hrm_kernels.rope_attention import rope_attention, rope_attention_reference
from hrm_kernels.rope_qkv import rope_qkv, rope_qkv_reference
from hrm_kernels.swiglu import swiglu, swiglu_reference
from hrm_kernels.swiglu_linear import swiglu_linear, swiglu_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "compile_ahead",
    "add3", "add3_reference", "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference",
    "gated_blend", "gated_blend_reference", "linear_swiglu", "linear_swiglu_reference",
    "linear_add_rms_norm", "linear_add_rms_norm_reference", "first_halves", "rope", "rope_reference", "rope_attention", "rope_attention_reference",
    "rope_qkv", "rope_qkv_reference", "swiglu_linear", "swiglu_linear_reference",
    "RMSNorm", "SwiGLU",
    "AdamATan2",
]
