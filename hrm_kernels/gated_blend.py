"""Gate MLP + sigmoid blend, the gated HRM's module input.

    g = sigmoid(W2 @ silu(W1 @ cat(own, other, inj) + b1) + b2)      # [..., 3D]
    g_own, g_other, g_inj = g.split(D, -1)
    out = g_own * own + g_other * other + g_inj * inj                   # [..., D]

Shapes: ``own``, ``other``, ``inj``: [..., D] (``inj=None`` means zeros: the H module's case);
``w1``: [R, 3D], ``b1``: [R], ``w2``: [3D, R], ``b2``: [3D] in ``nn.Linear`` layout. Weights may be
fp32 while activations are bf16/fp16: they are cast at use (as HRM's ``CastedLinear`` does) and
their gradients come back in their own dtype.

``stats=True`` also returns a float32 tensor ``[3, 4]``: one row per gate kind (own, other, inj),
columns ``STATS_COLUMNS[:4]``; ``saturation=True`` adds the fifth, ``[3, 5]``:

* ``mean``: mean gate value;
* ``frac_low``, ``frac_high``: fraction of gates below 0.1 / above 0.9;
* ``contribution``: mean ``|g_k * source_k|`` (each source's share of the module input);
* ``saturation``: the saturation penalty ``mean(relu(|z| - logit(0.9))^2)`` over the gate logits
  ``z``; zero while every gate lies in [0.1, 0.9], growing quadratically in the logit beyond, so
  its gradient pushes saturated gates back towards the middle without vanishing as they saturate.

Fused Triton kernels (forward and backward, see the layout notes below) run on CUDA tensors and
under the Triton interpreter; gate hidden sizes R above ``MAX_FUSED_R`` run the eager math. On
Hopper the forward without stats (the model's recurrence; with ``USE_GLUON_STORE`` also the calls a
backward follows) and both backward phases without the saturation term (``USE_GLUON_DPRE``,
``USE_GLUON_MAIN``) run the warp-specialised Gluon kernels of ``hrm_kernels._gluon_gated_blend``
instead where they can (the forward's switch: ``USE_GLUON``). With
bf16/fp16 activations on CUDA the gates' sigmoid is ``hrm_kernels._math``'s one-instruction
``tanh.approx`` form (absolute error under 2^-12, below the bf16 rounding of the blend).

Only ``saturation`` is differentiable (gradients given to the other columns are ignored: they are
monitoring values; without ``saturation`` the stats tensor does not require grad). It costs a third
of what the stats add to the forward kernel (SASS of the blend loop, H100/H200: 1185 instructions a
thread and D-chunk with it, 1013 without, 667 without stats), so it is computed only when asked for:
the gate regulariser needs it, monitoring does not. With ``inj=None`` the injection gate is never
computed and row 2 is zeros.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
import triton
import triton.language as tl

from hrm_kernels import _gluon_gated_blend
from hrm_kernels._math import cast as _cast, fast_sigmoid_for, sigmoid
from hrm_kernels._utils import as_rows, cdiv, check_float, check_same, next_power_of_2, num_programs_for
from hrm_kernels.backend import triton_interpreting, use_triton
from hrm_kernels.precompile import launch

STATS_COLUMNS = ("mean", "frac_low", "frac_high", "contribution", "saturation")
GATE_KINDS = ("own", "other", "inj")
SATURATION_LOGIT = math.log(9.0)  # logit(0.9) = -logit(0.1)
# Widest D the fused kernels take with stats=True: each row's two gate counts share one int32.
# Wider gates run the eager math.
MAX_STATS_D = 2**15 - 1

# Widest gate hidden size R the fused kernels take: the [BLOCK_M, R] hidden tile lives in
# registers and shared memory. Wider gate MLPs run the eager math (same results, no fusion).
# GPU checks of the two-kernel forward (H100): bf16/fp16 up to R=128 and fp32 at R=100 pass; R=256
# in fp16 overflowed shared memory before the tile-shrinking rule in _launch_configs. The
# one-kernel forward has run on the GPU at R=10..128 only (tests/test_gated_blend.py).
MAX_FUSED_R = 256

# The no-gradient forward without stats (the model's recurrence calls) on Hopper: the warp-specialised
# Gluon kernel (``hrm_kernels._gluon_gated_blend``) where it runs (2-byte activations and weights of
# one dtype, D a multiple of 64, R of 64 or 128), else the Triton kernel below.
USE_GLUON = True
# The forward with a backward to come (pre1 and z written out) and without stats through the same
# Gluon kernel (``store_hidden``) where it runs; else the Triton kernel. Session 42 (H100, bf16,
# R = 128, GPU time): 177.3 vs 229.3 us at Sudoku's 62976 x 512 with inj (126.1 vs 176.6 without),
# ARC's 86496 rows 255.7 vs 327.1 (180.2 vs 250.2).
USE_GLUON_STORE = True
# The backward's first phase (d_pre1) as a warp-specialised Gluon kernel
# (``hrm_kernels._gluon_gated_blend.backward_dpre``: ``USE_GLUON_DPRE``) where it runs (as above,
# and no saturation term). Session 30 (H100, bf16,
# R = 128, GPU time): phase 1 152.6 us against Triton's 253.2 at Sudoku's 62976 x 512 with inj
# (111.4 vs 190.0 without; ARC's 86496 rows 218.0 vs 383.4, 157.5 vs 268.9). The whole backward, in
# one run: Gluon d_pre1 + Triton phase 2 616.4 us, both Gluon 695.0, both Triton 694.4 (ARC 798.4,
# 879.7, 966.1): that Gluon phase 2 was the slower (benchmarks/RESULTS.md, session 30), so it was
# removed in session 31 (commit 56cf018 has it); session 42's, below, is faster.
USE_GLUON_DPRE = True
# The backward's second phase as a warp-specialised Gluon kernel (``hrm_kernels._gluon_gated_blend.
# backward_main``: a 64-column block's two halves on two consumer warpgroups, all four products
# wgmmas from shared memory) where it runs (as the d_pre1 kernel's requirements, and no saturation
# term); else the Triton kernel below. Session 42 (H100, bf16, R = 128, GPU time): 360.5 vs 442.6 us
# at Sudoku's 62976 x 512 with inj (284.3 vs 333.6 without), ARC's 86496 rows 438.3 vs 556.3
# (336.5 vs 406.9).
USE_GLUON_MAIN = True
# The backward's weight gradients from its partial sums in one Triton kernel (``_weight_grads_kernel``)
# instead of torch's four sums, casts and (inj=None) cats (``_weight_grads_torch``). Session 43 (H100,
# Sudoku with inj, in the op): the sums took 47.4 us of its 715 (db1's [984, 128] alone 13.6), the casts 5.3.
# Off until its first GPU run: written in session 44 without one (tested in the interpreter, compiled
# for sm_90); ``bash experiments/gluon_first_run/run_44.sh`` on a Hopper GPU decides it.
FUSED_WEIGHT_SUMS = False

# How the kernels split the work (M rows, D features, R gate hidden units, K = 3 kinds, or 2
# with inj=None; "GEMM" = one M x D*K x R matmul, 2*M*K*D*R FLOP):
#
# forward, one program per BLOCK_M rows: (a) pre1 = [own|other|inj] @ W1^T + b1 (k-loop over the
#   K*D inputs, [BLOCK_M, R] fp32 accumulator), z = silu(pre1), both written ([M, R], small)
#   unless the caller says no backward will read them (eager calls without gradients, compiled
#   ones that need none); (b) for each D-chunk in turn (a software pipeline): per kind the logits
#   z @ W2_chunk^T + b2, g = sigmoid, out += g * src. 2 GEMMs, reads the sources twice (the second
#   time mostly from L2), writes out; with stats, per-row sums (4 per kind) in registers, then
#   15 fp32 sums per program (a row of 16 floats in the partials). (FUSE_HIDDEN off: (a) as a
#   kernel of its own, always storing z, then (b) as one program per (D-chunk, BLOCK_M rows), z
#   read back from memory.)
# backward phase 1 (_dpre), one program per BLOCK_M rows: recompute the logits from z, d_logit
#   = dout * src * g * (1 - g) (+ the saturation term), d_z = d_logit @ W2, d_pre1 = d_z *
#   silu'(pre1) -> [M, R]; db1 partial per program. 2 GEMMs, reads dout and the sources.
# backward phase 2, one program per (kind, D-chunk, row split): recompute logits and d_logit for
#   its chunk over its rows, d_src = dout * g + d_pre1 @ W1_chunk, and accumulate the weight
#   gradients of its chunk in registers: dW2_chunk = d_logit^T @ z, dW1_chunk = d_pre1^T @ src,
#   db2_chunk; one fp32 partial per row split. 4 GEMMs, reads dout and the sources, writes their
#   gradients.
# weight gradients: every partial (the row splits' dW1, dW2, db2 and phase 1's db1) summed over its
#   leading axis and cast to the weights' dtype, by torch ops, or with ``FUSED_WEIGHT_SUMS`` by one
#   launch of ``_weight_grads_kernel``.
# Nothing of width K*D (cat, gates, logits) ever reaches memory.
# On Hopper the forward without stats (``USE_GLUON``, ``USE_GLUON_STORE``) is one warp-specialised
#   Gluon kernel instead (``hrm_kernels._gluon_gated_blend``): the same two GEMMs and blend, TMA
#   loads run ahead of the tensor cores by a producer warp; so are phase 1 (``USE_GLUON_DPRE``) and
#   phase 2 (``USE_GLUON_MAIN``: a program per (64-column block, row split) item, its two halves on
#   two consumer warpgroups, all four products wgmmas from shared memory).
# (Tried and measured slower, session 16, H200: phase 2 as cuBLAS matmuls over a d_logit [M, K*D]
#   written by phase 1, 1099 against 880 us fwd+bwd at the Sudoku shape; benchmarks/RESULTS.md.)

_SAT_L = tl.constexpr(SATURATION_LOGIT)



# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, acc, EMU_BF16: tl.constexpr, PREC: tl.constexpr):
    # EMU_BF16: the interpreter's bf16 tl.dot is broken, so it multiplies in fp32 there.
    if EMU_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _source(kind: tl.constexpr, OWN, OTHER, INJ):
    """The [M, D] source of gate kind ``kind``: 0 own, 1 other, 2 inj."""
    if kind == 0:
        return OWN
    elif kind == 1:
        return OTHER
    else:
        return INJ


@triton.jit
def _load_gate_weights(W2, B2, gcols, c_mask, r_idx, r_mask, R, act: tl.constexpr, EMU_BF16: tl.constexpr):
    """The gate layer's weights for logit columns ``gcols`` (``kind * D + cols``): W2's rows
    transposed, [BLOCK_R, BLOCK_D] in the activation dtype, and b2 [BLOCK_D] (cast like the
    reference casts its weights, then fp32)."""
    w2t = _cast(tl.load(W2 + gcols[None, :] * R + r_idx[:, None], mask=r_mask[:, None] & c_mask[None, :],
                        other=0.0), act, EMU_BF16)
    b2 = _cast(tl.load(B2 + gcols, mask=c_mask, other=0.0), act, EMU_BF16).to(tl.float32)
    return w2t, b2


@triton.jit
def _gate(z, w2t, b2, EMU_BF16: tl.constexpr, PREC: tl.constexpr, FAST_SIGMOID: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gate logits ``z @ w2t + b2`` and gates ``sigmoid(logits)``, [BLOCK_M, BLOCK_D] fp32 each
    (FAST_SIGMOID: the one-instruction sigmoid of ``hrm_kernels._math``)."""
    logit = _mm(z, w2t, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), EMU_BF16, PREC)
    logit += b2[None, :]
    return logit, sigmoid(logit, FAST_SIGMOID)


@triton.jit
def _stats_update(g, x, logit, c_valid, s_mean, s_count, s_contrib, s_sat, EVEN_D: tl.constexpr,
                  WITH_SAT: tl.constexpr):
    """Adds one [BLOCK_M, BLOCK_D] tile's row sums to the per-row stats: gate sum,
    the two counts packed in one int32 (below 0.1 + 2^16 * above 0.9: exact while D < 2^15,
    ``MAX_STATS_D``), |g x| and (WITH_SAT) the saturation term. Up to four reductions inside a warp per kind and
    tile; rows past the end are dropped once, at the end (``_store_stats``); columns past D here,
    unless EVEN_D."""
    if not EVEN_D:  # past D the logit is exactly 0 (W2 and b2 load as 0): counts and saturation
        g = tl.where(c_valid[None, :], g, 0.0)  # see nothing there; the gate, sigmoid(0), is masked
    s_mean += tl.sum(g, 1)
    # g < 0.1 <=> logit < -logit(0.9); g > 0.9 <=> logit > logit(0.9)
    s_count += tl.sum(tl.where(logit < -_SAT_L, 1, tl.where(logit > _SAT_L, 65536, 0)), 1)
    s_contrib += tl.sum(g * tl.abs(x), 1)  # |g x| = g |x| (g > 0): one FMA an element; x is 0 past D
    if WITH_SAT:
        e = tl.maximum(tl.abs(logit) - _SAT_L, 0.0)
        s_sat += tl.sum(e * e, 1)
    return s_mean, s_count, s_contrib, s_sat


@triton.jit
def _store_stats(P, row_mask, s_mean, s_count, s_contrib, s_sat):
    """The program's five sums of one gate kind at P[0:5] (STATS_COLUMNS order)."""
    s_count = tl.where(row_mask, s_count, 0)
    tl.store(P + 0, tl.sum(tl.where(row_mask, s_mean, 0.0), 0))
    tl.store(P + 1, tl.sum((s_count & 0xFFFF).to(tl.float32), 0))
    tl.store(P + 2, tl.sum((s_count >> 16).to(tl.float32), 0))
    tl.store(P + 3, tl.sum(tl.where(row_mask, s_contrib, 0.0), 0))
    tl.store(P + 4, tl.sum(tl.where(row_mask, s_sat, 0.0), 0))


@triton.jit
def _hidden_pre(OWN, OTHER, INJ, W1, B1, rows, row_mask, r_idx, r_mask, D, act: tl.constexpr,
                HAS_INJ: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """pre1 = [own|other|inj] @ W1^T + b1 for rows ``rows`` (int64), rounded to the activation dtype:
    a GEMM whose k-loop walks the present sources in turn (the concatenation is never formed;
    inj=None skips its slice)."""
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for kind in tl.static_range(3):
        if kind < 2 or HAS_INJ:
            SRC = _source(kind, OWN, OTHER, INJ)
            for d0 in range(0, D, BLOCK_K):
                cols = d0 + tl.arange(0, BLOCK_K)
                c_mask = cols < D
                x = tl.load(SRC + rows[:, None] * D + cols[None, :],
                            mask=row_mask[:, None] & c_mask[None, :], other=0.0)
                w1t = _cast(tl.load(W1 + r_idx[None, :] * (3 * D) + (kind * D + cols)[:, None],
                                    mask=c_mask[:, None] & r_mask[None, :], other=0.0), act, EMU_BF16)
                acc = _mm(x, w1t, acc, EMU_BF16, PREC)
    b1 = _cast(tl.load(B1 + r_idx, mask=r_mask, other=0.0), act, EMU_BF16).to(tl.float32)
    return _cast(acc + b1[None, :], act, EMU_BF16)


@triton.jit
def _hidden(OWN, OTHER, INJ, W1, B1, PRE1, Z, rows, row_mask, r_idx, r_mask, D, R, act: tl.constexpr,
            HAS_INJ: tl.constexpr, STORE: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """z = silu(pre1), [BLOCK_M, BLOCK_R] in the activation dtype, for rows ``rows`` (int64); with
    STORE also pre1 and z written to PRE1 and Z ([M, R], what the backward reads)."""
    pre = _hidden_pre(OWN, OTHER, INJ, W1, B1, rows, row_mask, r_idx, r_mask, D, act, HAS_INJ, EMU_BF16, PREC,
                      BLOCK_M, BLOCK_K, BLOCK_R)
    z = _cast(pre.to(tl.float32) * tl.sigmoid(pre.to(tl.float32)), act, EMU_BF16)
    if STORE:
        hr_mask = row_mask[:, None] & r_mask[None, :]
        hr_off = rows[:, None] * R + r_idx[None, :]
        tl.store(PRE1 + hr_off, pre, mask=hr_mask)
        tl.store(Z + hr_off, z, mask=hr_mask)
    return z


@triton.jit
def _gated_blend_hidden_kernel(
    OWN, OTHER, INJ, W1, B1, PRE1, Z,
    n_rows, D, R,
    HAS_INJ: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """pre1 = [own|other|inj] @ W1^T + b1 and z = silu(pre1), [M, R] each: a GEMM whose k-loop
    walks the present sources in turn (the concatenation is never formed; inj=None skips its slice)."""
    # All [M, D] tensors are contiguous rows of width D; W1 is [R, 3D], W2 [3D, R] contiguous.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    r_idx = tl.arange(0, BLOCK_R)
    _hidden(OWN, OTHER, INJ, W1, B1, PRE1, Z, rows.to(tl.int64), row_mask, r_idx, r_idx < R, D, R,
            Z.dtype.element_ty, HAS_INJ, True, EMU_BF16, PREC, BLOCK_M, BLOCK_K, BLOCK_R)


@triton.jit
def _gated_blend_forward_kernel(
    OWN, OTHER, INJ, W1, B1, W2, B2, PRE1, Z, OUT, STATS,
    n_rows, D, R,
    HAS_INJ: tl.constexpr, WITH_STATS: tl.constexpr, WITH_SAT: tl.constexpr, FUSE_HIDDEN: tl.constexpr,
    STORE_HIDDEN: tl.constexpr,
    EVEN_D: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr, FAST_SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, D_STAGES: tl.constexpr,
):
    """[BLOCK_M, BLOCK_D] tiles of out: per kind the logits z @ W2_chunk^T + b2, the gate and its
    share of the blend. Program (chunk, row block).

    FUSE_HIDDEN: the program first computes its rows' z itself (the hidden kernel's GEMM; pre1 and z
    written out only with STORE_HIDDEN, for the backward), then walks every D-chunk (D_STAGES deep
    pipeline), reading its rows' sources a second time, now from L2; the grid has one chunk column.
    Else z comes from Z (the hidden kernel's) and each program owns one chunk, the chunk the fast
    grid axis: programs that share rows (and their z tile) run together."""
    chunk = tl.program_id(0)
    pid_m = tl.program_id(1)
    act = OUT.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    r_idx = tl.arange(0, BLOCK_R)
    r_mask = r_idx < R
    if FUSE_HIDDEN:
        z = _hidden(OWN, OTHER, INJ, W1, B1, PRE1, Z, rows, row_mask, r_idx, r_mask, D, R, act, HAS_INJ,
                    STORE_HIDDEN, EMU_BF16, PREC, BLOCK_M, BLOCK_K, BLOCK_R)
        d_begin = 0
        d_end = D
    else:
        z = tl.load(Z + rows[:, None] * R + r_idx[None, :], mask=row_mask[:, None] & r_mask[None, :],
                    other=0.0)
        d_begin = chunk * BLOCK_D
        d_end = d_begin + BLOCK_D
    zero_m = tl.zeros([BLOCK_M], dtype=tl.float32)
    zero_c = tl.zeros([BLOCK_M], dtype=tl.int32)
    o0, o1, o2, o3 = zero_m, zero_c, zero_m, zero_m
    t0, t1, t2, t3 = zero_m, zero_c, zero_m, zero_m
    i0, i1, i2, i3 = zero_m, zero_c, zero_m, zero_m
    for d0 in tl.range(d_begin, d_end, BLOCK_D, num_stages=D_STAGES):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        off = rows[:, None] * D + cols[None, :]
        out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for kind in tl.static_range(3):
            if kind < 2 or HAS_INJ:
                w2t, b2 = _load_gate_weights(W2, B2, kind * D + cols, c_mask, r_idx, r_mask, R, act, EMU_BF16)
                logit, g = _gate(z, w2t, b2, EMU_BF16, PREC, FAST_SIGMOID, BLOCK_M, BLOCK_D)
                x = tl.load(_source(kind, OWN, OTHER, INJ) + off, mask=mask, other=0.0).to(tl.float32)
                out += g * x
                if WITH_STATS:
                    if kind == 0:
                        o0, o1, o2, o3 = _stats_update(g, x, logit, c_mask, o0, o1, o2, o3, EVEN_D, WITH_SAT)
                    elif kind == 1:
                        t0, t1, t2, t3 = _stats_update(g, x, logit, c_mask, t0, t1, t2, t3, EVEN_D, WITH_SAT)
                    else:
                        i0, i1, i2, i3 = _stats_update(g, x, logit, c_mask, i0, i1, i2, i3, EVEN_D, WITH_SAT)
        tl.store(OUT + off, _cast(out, act, EMU_BF16), mask=mask)
    if WITH_STATS:
        P = STATS + (pid_m * tl.num_programs(0) + chunk) * 16
        _store_stats(P, row_mask, o0, o1, o2, o3)
        _store_stats(P + 5, row_mask, t0, t1, t2, t3)
        _store_stats(P + 10, row_mask, i0, i1, i2, i3)


@triton.jit
def _saturation_grad(logit, valid, coef):
    # d/dlogit of coef * relu(|logit| - L)^2 (coef already holds 1/(M*D) and the incoming grad)
    e = tl.maximum(logit - _SAT_L, 0.0) + tl.minimum(logit + _SAT_L, 0.0)
    return tl.where(valid, (2.0 * coef) * e, 0.0)


@triton.jit
def _gated_blend_backward_dpre_kernel(
    DOUT, OWN, OTHER, INJ, W2, B2, PRE1, Z, SAT, DPRE1, DB1_PARTIAL,
    n_rows, D, R,
    HAS_INJ: tl.constexpr, HAS_SAT: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr,
    FAST_SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """d_pre1 [M, R] and a db1 partial per program."""
    pid = tl.program_id(0)
    act = DPRE1.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    r_idx = tl.arange(0, BLOCK_R)
    r_mask = r_idx < R
    hr_mask = row_mask[:, None] & r_mask[None, :]
    hr_off = rows[:, None] * R + r_idx[None, :]
    z = tl.load(Z + hr_off, mask=hr_mask, other=0.0)

    dz = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        off = rows[:, None] * D + cols[None, :]
        dout = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
        for kind in tl.static_range(3):
            if kind < 2 or HAS_INJ:
                w2t, b2 = _load_gate_weights(W2, B2, kind * D + cols, c_mask, r_idx, r_mask, R, act, EMU_BF16)
                logit, g = _gate(z, w2t, b2, EMU_BF16, PREC, FAST_SIGMOID, BLOCK_M, BLOCK_D)
                x = tl.load(_source(kind, OWN, OTHER, INJ) + off, mask=mask, other=0.0).to(tl.float32)
                dl = dout * x * g * (1.0 - g)
                if HAS_SAT:
                    dl += _saturation_grad(logit, mask, tl.load(SAT + kind))
                dz = _mm(_cast(dl, act, EMU_BF16), tl.trans(w2t), dz, EMU_BF16, PREC)
    pre = tl.load(PRE1 + hr_off, mask=hr_mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(pre)
    dpre = _cast(dz * s * (1.0 + pre * (1.0 - s)), act, EMU_BF16)
    tl.store(DPRE1 + hr_off, dpre, mask=hr_mask)
    tl.store(DB1_PARTIAL + pid * R + r_idx, tl.sum(dpre.to(tl.float32), 0), mask=r_mask)


@triton.jit
def _gated_blend_backward_kernel(
    DOUT, OWN, OTHER, INJ, W1, W2, B2, Z, DPRE1, SAT,
    DOWN, DOTHER, DINJ, DW1_PARTIAL, DW2_PARTIAL, DB2_PARTIAL,
    n_rows, D, R, width, rows_per_split,
    HAS_SAT: tl.constexpr, EMU_BF16: tl.constexpr, PREC: tl.constexpr, FAST_SIGMOID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # program (chunk, split): chunk = kind * cdiv(D, BLOCK_D) + D-chunk; the chunk index varies
    # fastest so that the programs sharing a row split run together and share dout/z/d_pre1 in L2.
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    act = DPRE1.dtype.element_ty
    n_dchunks = tl.cdiv(D, BLOCK_D)
    kind = chunk // n_dchunks
    cols = (chunk % n_dchunks) * BLOCK_D + tl.arange(0, BLOCK_D)
    if kind == 0:
        SRC = OWN
        DSRC = DOWN
    elif kind == 1:
        SRC = OTHER
        DSRC = DOTHER
    else:
        SRC = INJ
        DSRC = DINJ
    c_mask = cols < D
    r_idx = tl.arange(0, BLOCK_R)
    r_mask = r_idx < R
    gcols = kind * D + cols
    rc_mask = r_mask[:, None] & c_mask[None, :]
    w2t, b2 = _load_gate_weights(W2, B2, gcols, c_mask, r_idx, r_mask, R, act, EMU_BF16)
    w1 = _cast(tl.load(W1 + r_idx[:, None] * (3 * D) + gcols[None, :], mask=rc_mask, other=0.0), act, EMU_BF16)
    if HAS_SAT:
        coef = tl.load(SAT + kind)

    dw2 = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows = rows.to(tl.int64)
        hr_mask = row_mask[:, None] & r_mask[None, :]
        hr_off = rows[:, None] * R + r_idx[None, :]
        z = tl.load(Z + hr_off, mask=hr_mask, other=0.0)
        dpre = tl.load(DPRE1 + hr_off, mask=hr_mask, other=0.0)
        mask = row_mask[:, None] & c_mask[None, :]
        off = rows[:, None] * D + cols[None, :]
        dout = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(SRC + off, mask=mask, other=0.0)
        logit, g = _gate(z, w2t, b2, EMU_BF16, PREC, FAST_SIGMOID, BLOCK_M, BLOCK_D)
        xf = x.to(tl.float32)
        dl = dout * xf * g * (1.0 - g)
        if HAS_SAT:
            dl += _saturation_grad(logit, mask, coef)
        dsrc = _mm(dpre, w1, dout * g, EMU_BF16, PREC)
        tl.store(DSRC + off, _cast(dsrc, act, EMU_BF16), mask=mask)
        dl = _cast(dl, act, EMU_BF16)
        db2 += dl.to(tl.float32)
        dw2 = _mm(tl.trans(dl), z, dw2, EMU_BF16, PREC)
        dw1 = _mm(tl.trans(dpre), x, dw1, EMU_BF16, PREC)
    # partials are laid out [split, R, width] and [split, width, R], width = D * kinds present
    tl.store(DW2_PARTIAL + split * width * R + gcols[:, None] * R + r_idx[None, :], dw2,
             mask=c_mask[:, None] & r_mask[None, :])
    tl.store(DW1_PARTIAL + split * width * R + r_idx[:, None] * width + gcols[None, :], dw1,
             mask=rc_mask)
    tl.store(DB2_PARTIAL + split * width + gcols, tl.sum(db2, 0), mask=c_mask)


@triton.jit
def _sum_leading(PART, OUT, out_offs, out_mask, src_offs, src_mask, n_parts, part_stride,
                 PARTS: tl.constexpr):
    """OUT[out_offs] = sum over p < n_parts of PART[p * part_stride + src_offs] (0 where not
    ``src_mask``), fp32, stored in OUT's dtype: PARTS parts a load, all loads of a chunk in flight
    at once."""
    p_idx = tl.arange(0, PARTS)
    acc = tl.zeros(out_offs.shape, tl.float32)
    for p0 in range(0, n_parts, PARTS):
        p_mask = p0 + p_idx < n_parts
        part = tl.load(PART + (p0 + p_idx)[:, None].to(tl.int64) * part_stride + src_offs[None, :],
                       mask=p_mask[:, None] & src_mask[None, :], other=0.0)
        acc += tl.sum(part, 0)
    tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grads_kernel(DW1_PARTIAL, DW2_PARTIAL, DB2_PARTIAL, DB1_PARTIAL, DW1, DW2, DB2, DB1,
                         n_splits, n_db1_parts, R, width, full_width,
                         BLOCK: tl.constexpr, SPLITS: tl.constexpr, DB1_COLS: tl.constexpr,
                         DB1_PARTS: tl.constexpr):
    """The backward's weight gradients from its partial sums, in one launch:

        dW1 [R, 3D] = sum_s DW1_PARTIAL[s]  ([splits, R, width]),  dW2 [3D, R] = sum_s DW2_PARTIAL[s]
        ([splits, width, R]),  db2 [3D] = sum_s DB2_PARTIAL[s]  ([splits, width]),
        db1 [R] = sum_p DB1_PARTIAL[p]  ([parts, R]),

    each stored in its weight's dtype. width = full_width = 3D with inj, 2D without it: the
    injection's columns of dW1, rows of dW2 and entries of db2 get exact zeros. Programs, in order:
    BLOCK-element blocks of dW1, of dW2, of db2, then DB1_COLS-column blocks of db1."""
    pid = tl.program_id(0)
    n_w_blocks = tl.cdiv(R * full_width, BLOCK)
    n_b2_blocks = tl.cdiv(full_width, BLOCK)
    offs = tl.arange(0, BLOCK)
    if pid < n_w_blocks:  # dW1: output (i, j) reads the partials' (i, j) of their narrower rows
        e = pid * BLOCK + offs
        i, j = e // full_width, e % full_width
        in_range = e < R * full_width
        _sum_leading(DW1_PARTIAL, DW1, e, in_range, i * width + j, in_range & (j < width), n_splits, R * width,
                     SPLITS)
    elif pid < 2 * n_w_blocks:  # dW2: the partials' rows are the output's first width rows
        e = (pid - n_w_blocks) * BLOCK + offs
        _sum_leading(DW2_PARTIAL, DW2, e, e < R * full_width, e, e < R * width, n_splits, R * width, SPLITS)
    elif pid < 2 * n_w_blocks + n_b2_blocks:
        e = (pid - 2 * n_w_blocks) * BLOCK + offs
        _sum_leading(DB2_PARTIAL, DB2, e, e < full_width, e, e < width, n_splits, width, SPLITS)
    else:
        c = (pid - 2 * n_w_blocks - n_b2_blocks) * DB1_COLS + tl.arange(0, DB1_COLS)
        _sum_leading(DB1_PARTIAL, DB1, c, c < R, c, c < R, n_db1_parts, R, DB1_PARTS)


# --------------------------------------------------------------------------------- launchers

# Per-kernel launch settings, chosen per shape class (no autotuning: compile time matters in
# training). Benchmarks may override them through ``_config_override`` to sweep.
_config_override: dict = {}


def _launch_configs(n_rows: int, d: int, r: int, device: torch.device, act: torch.dtype,
                    weights: torch.dtype) -> dict:
    """{kernel: launch settings}: a fresh copy of the shape class's defaults (activation and weight
    dtypes ``act`` and ``weights``), ``_config_override`` applied."""
    cfg = {name: dict(c) for name, c in _default_configs(n_rows, d, r, device.type, act, weights).items()}
    for name, over in _config_override.items():
        cfg[name] = {**cfg[name], **over}
    return cfg


@functools.lru_cache(maxsize=64)  # computed once per shape: this runs twice per fwd+bwd
def _default_configs(n_rows: int, d: int, r: int, device_type: str, act: torch.dtype,
                     weights: torch.dtype) -> dict:
    block_r = max(16, next_power_of_2(r))
    block_d = max(16, min(64, next_power_of_2(d)))
    if device_type != "cuda":  # the interpreter: few, small programs
        block_m = max(16, min(32, next_power_of_2(max(n_rows, 1))))
        cfg = {
            "hidden": dict(BLOCK_M=block_m, BLOCK_K=block_d),
            "fwd": dict(BLOCK_M=block_m, BLOCK_K=block_d, BLOCK_D=block_d, FUSE_HIDDEN=True, D_STAGES=1),
            "dpre": dict(BLOCK_M=block_m, BLOCK_D=block_d),
            "bwd": dict(BLOCK_M=16, BLOCK_D=block_d, programs_per_sm=1),
        }
    else:
        # the [BLOCK_M, R] fp32 hidden accumulator bounds BLOCK_M; 128 x 128 at the hot shape
        block_m = max(16, min(128, 16384 // block_r))
        bwd_d = max(16, min(block_d, 8192 // block_r))  # two [BLOCK_D, R] fp32 accumulators
        cfg = {
            # fastest of the sweep in benchmarks/bench_gated_blend.py (D=512, R=128). The hidden
            # kernel's k-step: 32 with fp32 weights (H100, forward 308 vs 333 us at 64), 64 with
            # 2-byte weights, as the model passes them (H200, forward 222.8 vs 237.9 us at 32)
            "hidden": (dict(BLOCK_M=block_m, BLOCK_K=min(32, block_d), num_warps=4, num_stages=4)
                       if weights.itemsize > 2 else
                       dict(BLOCK_M=block_m, BLOCK_K=block_d, num_warps=4, num_stages=3)),
            # the forward: the hidden GEMM and the blend in one program per row block (k-step and
            # num_stages: the GEMM's; D_STAGES: the pipeline over the blend's D-chunks). H200, bf16
            # weights, no-grad forward: 177-187 us; the hidden kernel first, then a program per
            # (row block, D-chunk) of 128 x 32: 218-226 us; 64 rows 195-211 us; 64-wide chunks
            # 267-313 us. With stats: 333 us one-kernel, 404 us two-kernel (two H200s, 2026-11-28)
            "fwd": dict(BLOCK_M=block_m, BLOCK_K=min(32, block_d) if weights.itemsize > 2 else block_d,
                        BLOCK_D=min(32, block_d), FUSE_HIDDEN=True, D_STAGES=2, num_warps=4, num_stages=3),
            "dpre": dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8, num_stages=2),
            "bwd": dict(BLOCK_M=min(32, block_m), BLOCK_D=bwd_d, num_warps=4, num_stages=3,
                        programs_per_sm=2),
        }
    # the forward with stats=True (the model's with-gradient calls): half the rows of the forward's
    # tile (the per-row sums' registers: at 128 rows x 4 warps it spilled 144 bytes a thread).
    # Sweep on an H200, Sudoku, bf16 weights (session 16): 281 us against 306 at 128 rows (128 x 8
    # warps 316, 256 rows 342, the two-kernel forward 392-572); fp32 weights: untimed
    cfg["fwd_stats"] = dict(cfg["fwd"], BLOCK_M=min(64, cfg["fwd"]["BLOCK_M"]))
    if device_type == "cuda":
        # Tuned for 2-byte activations and R <= 128. Wider [*, R] tiles (fp32, or R up to 256)
        # need proportionally more shared memory: halve the rows and drop a pipeline stage per
        # doubling (on the H100, fp32 at R=100 and fp16 at R=256 overflowed the 227 KiB otherwise).
        width = act.itemsize * block_r
        while width > 256:
            width //= 2
            for c in cfg.values():
                c["BLOCK_M"] = max(16, c["BLOCK_M"] // 2)
                c["num_stages"] = max(1, c["num_stages"] - 1)
    for c in cfg.values():
        c["BLOCK_R"] = block_r
    return cfg


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(EMU_BF16=triton_interpreting() and dtype == torch.bfloat16,
                PREC="ieee" if dtype == torch.float32 else "tf32")


def _gate_flags(dtype: torch.dtype) -> dict:
    """Flags of the kernels that compute gates: the dot flags and FAST_SIGMOID."""
    return dict(_dot_flags(dtype), FAST_SIGMOID=fast_sigmoid_for(dtype))


def gated_blend_forward(own: torch.Tensor, other: torch.Tensor, inj: Optional[torch.Tensor],
                        w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        with_stats: bool, store_hidden: bool = True, with_saturation: bool = False):
    """own, other, inj: [M, D] contiguous; weights contiguous. Returns (out [M, D], stats [3, 4]
    fp32 ([3, 5] ``with_saturation``; an empty tensor without stats), pre1 [M, R], z = silu(pre1)
    [M, R]); without ``store_hidden`` (no backward to come) pre1 and z are empty, [0, R]."""
    n_rows, d = own.shape
    r = w1.shape[0]
    if (USE_GLUON and not with_stats and (USE_GLUON_STORE or not store_hidden) and fast_sigmoid_for(own.dtype)
            and _gluon_gated_blend.supported(own, other, inj, w1, b1, w2, b2)):
        if store_hidden:
            out, pre1, z = _gluon_gated_blend.gated_blend_forward(own, other, inj, w1, b1, w2, b2, store_hidden=True)
        else:
            out = _gluon_gated_blend.gated_blend_forward(own, other, inj, w1, b1, w2, b2)
            pre1, z = own.new_empty((0, r)), own.new_empty((0, r))
        return out, own.new_empty(0, dtype=torch.float32), pre1, z
    if with_stats and d > MAX_STATS_D:
        raise ValueError(f"gated_blend: stats count each row's gates in 16 bits, so D={d} must be at most "
                         f"{MAX_STATS_D} with stats=True; gated_blend() runs wider gates eagerly")
    cfgs = _launch_configs(n_rows, d, r, own.device, own.dtype, w1.dtype)
    cfg = cfgs["fwd_stats" if with_stats else "fwd"]
    fuse = cfg["FUSE_HIDDEN"]
    store = store_hidden or not fuse  # the two-kernel forward passes z through memory
    out = torch.empty_like(own)
    pre1 = own.new_empty((n_rows if store else 0, r))
    z = torch.empty_like(pre1)
    inj_arg = inj if inj is not None else own
    if n_rows > 0 and not fuse:
        launch(_gated_blend_hidden_kernel, (cdiv(n_rows, cfgs["hidden"]["BLOCK_M"]),),
               own, other, inj_arg, w1, b1, pre1, z, n_rows, d, r, HAS_INJ=inj is not None,
               **_dot_flags(own.dtype), **cfgs["hidden"])
    grid = (1 if fuse else cdiv(d, cfg["BLOCK_D"]), cdiv(n_rows, cfg["BLOCK_M"]))
    partial = torch.empty((grid[0] * grid[1] if with_stats else 1, 16), dtype=torch.float32,
                          device=own.device)
    if n_rows > 0:
        launch(_gated_blend_forward_kernel, grid,
               own, other, inj_arg, w1, b1, w2, b2, pre1, z, out, partial, n_rows, d, r,
               HAS_INJ=inj is not None, WITH_STATS=with_stats, WITH_SAT=with_stats and with_saturation,
               STORE_HIDDEN=store,
               EVEN_D=d % cfg["BLOCK_D"] == 0,
               **_gate_flags(own.dtype), **cfg)
    if not store_hidden and store:
        pre1, z = own.new_empty((0, r)), own.new_empty((0, r))
    if not with_stats:
        return out, own.new_empty(0, dtype=torch.float32), pre1, z
    stats = partial[:, :15].sum(0).view(3, 5)[:, :5 if with_saturation else 4] / float(n_rows * d)
    if inj is None:
        stats[2] = 0.0
    return out, stats, pre1, z


def gated_blend_backward(dout: torch.Tensor, sat: Optional[torch.Tensor], own: torch.Tensor,
                         other: torch.Tensor, inj: Optional[torch.Tensor], w1: torch.Tensor,
                         b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, pre1: torch.Tensor,
                         z: torch.Tensor):
    """Gradients of all seven inputs (d_inj is an empty tensor when ``inj`` is None). ``sat``
    [3]: the gradient arriving at the stats' saturation column, or None."""
    n_rows, d = dout.shape
    r = w1.shape[0]
    dev, act = dout.device, own.dtype
    d_own, d_other = torch.empty_like(own), torch.empty_like(other)
    d_inj = torch.empty_like(inj) if inj is not None else own.new_empty(0)
    if n_rows == 0:
        return (d_own, d_other, d_inj, torch.zeros_like(w1), torch.zeros_like(b1),
                torch.zeros_like(w2), torch.zeros_like(b2))
    cfgs = _launch_configs(n_rows, d, r, dev, act, w1.dtype)
    coef = sat.float() / float(n_rows * d) if sat is not None else None
    flags = _gate_flags(act)

    dpre1, db1_partial = _backward_dpre(cfgs["dpre"], flags, dout, coef, own, other, inj, w2, b2, pre1, z)
    return _backward_main(cfgs["bwd"], flags, dout, coef, own, other, inj, w1, b1, w2, b2, z, dpre1,
                          db1_partial, d_own, d_other, d_inj)


def _backward_dpre(cfg, flags, dout, coef, own, other, inj, w2, b2, pre1, z):
    """(d_pre1 [M, R], db1 partials [programs, R] (the Gluon kernel's: [2 * tiles, R]))."""
    if (USE_GLUON_DPRE and coef is None and flags["FAST_SIGMOID"]
            and _gluon_gated_blend.dpre_supported(dout, own, other, inj, w2, b2, pre1, z)):
        return _gluon_gated_blend.backward_dpre(dout, own, other, inj, w2, b2, pre1, z)
    n_rows, d = dout.shape
    r = pre1.shape[1]
    n_tiles = cdiv(n_rows, cfg["BLOCK_M"])
    dpre1 = torch.empty_like(pre1)
    db1_partial = torch.empty((n_tiles, r), dtype=torch.float32, device=dout.device)
    launch(_gated_blend_backward_dpre_kernel, (n_tiles,),
        dout, own, other, inj if inj is not None else own, w2, b2, pre1, z,
        coef if coef is not None else db1_partial, dpre1, db1_partial, n_rows, d, r,
        HAS_INJ=inj is not None, HAS_SAT=coef is not None, **flags, **cfg)
    return dpre1, db1_partial


def _backward_main(cfg, flags, dout, coef, own, other, inj, w1, b1, w2, b2, z, dpre1, db1_partial,
                   d_own, d_other, d_inj):
    if (USE_GLUON_MAIN and coef is None and flags["FAST_SIGMOID"]
            and _gluon_gated_blend.main_supported(dout, own, other, inj, w1, w2, b2, z, dpre1)):
        partials = _gluon_gated_blend.backward_main(dout, own, other, inj, w1, w2, b2, z, dpre1, d_own, d_other,
                                                    d_inj if inj is not None else None)
        return d_own, d_other, d_inj, *_weight_grads(w1, b1, w2, b2, db1_partial, *partials)
    n_rows, d = dout.shape
    r = w1.shape[0]
    dev = dout.device
    kinds = 3 if inj is not None else 2
    width = kinds * d
    cfg = dict(cfg)
    per_sm = cfg.pop("programs_per_sm")
    n_chunks = kinds * cdiv(d, cfg["BLOCK_D"])
    n_row_blocks = cdiv(n_rows, cfg["BLOCK_M"])
    want = max(1, round(per_sm * num_programs_for(dev.type, dev.index) / n_chunks))
    blocks_per_split = cdiv(n_row_blocks, min(n_row_blocks, want))
    rows_per_split = blocks_per_split * cfg["BLOCK_M"]
    n_splits = cdiv(n_rows, rows_per_split)
    dw1_partial = torch.empty((n_splits, r, width), dtype=torch.float32, device=dev)
    dw2_partial = torch.empty((n_splits, width, r), dtype=torch.float32, device=dev)
    db2_partial = torch.empty((n_splits, width), dtype=torch.float32, device=dev)
    launch(_gated_blend_backward_kernel, (n_chunks, n_splits),
        dout, own, other, inj if inj is not None else own, w1, w2, b2, z, dpre1,
        coef if coef is not None else db2_partial,
        d_own, d_other, d_inj if inj is not None else d_own, dw1_partial, dw2_partial, db2_partial,
        n_rows, d, r, width, rows_per_split, HAS_SAT=coef is not None, **flags, **cfg)
    return d_own, d_other, d_inj, *_weight_grads(w1, b1, w2, b2, db1_partial, dw1_partial, dw2_partial, db2_partial)


def _weight_grads_config(device_type: str) -> dict:
    """``_weight_grads_kernel``'s launch settings: on CUDA 512-element blocks (a [16, 512] fp32
    tile of split partials, 64 values a thread) and db1 in 16-column blocks, 512 parts a load; the
    interpreter: small programs. Fixed whatever the counts (more loop trips, not another compiled
    variant, for each new row count)."""
    cuda = device_type == "cuda"
    return dict(BLOCK=512 if cuda else 64, SPLITS=16, DB1_COLS=16, DB1_PARTS=512 if cuda else 16, num_warps=4)


def _weight_grads(w1, b1, w2, b2, db1_partial, dw1_partial, dw2_partial, db2_partial):
    """(dW1, db1, dW2, db2) from the backward's partial sums, in the weights' dtypes (summed in
    fp32; the injection's slices zero when the partials are only 2D wide): with
    ``FUSED_WEIGHT_SUMS`` one launch of ``_weight_grads_kernel``, else ``_weight_grads_torch``."""
    if not FUSED_WEIGHT_SUMS:
        return _weight_grads_torch(w1, b1, w2, b2, db1_partial, dw1_partial, dw2_partial, db2_partial)
    r = w1.shape[0]
    dw1, db1, dw2, db2 = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (w1, b1, w2, b2))
    full_width, width = w1.shape[1], dw1_partial.shape[2]
    n_splits, n_db1_parts = dw1_partial.shape[0], db1_partial.shape[0]
    cfg = _weight_grads_config(dw1.device.type)
    grid = (2 * cdiv(r * full_width, cfg["BLOCK"]) + cdiv(full_width, cfg["BLOCK"]) + cdiv(r, cfg["DB1_COLS"]),)
    launch(_weight_grads_kernel, grid, dw1_partial, dw2_partial, db2_partial, db1_partial, dw1, dw2, db2, db1,
           n_splits, n_db1_parts, r, width, full_width, **cfg)
    return dw1, db1, dw2, db2


def _weight_grads_torch(w1, b1, w2, b2, db1_partial, dw1_partial, dw2_partial, db2_partial):
    """``_weight_grads`` in torch ops (``FUSED_WEIGHT_SUMS`` off): the same sums, casts and zeros."""
    r, full_width = w1.shape
    pad = full_width - dw1_partial.shape[2]
    dw1, dw2, db2 = dw1_partial.sum(0), dw2_partial.sum(0), db2_partial.sum(0)
    if pad:  # inj=None: the injection's slices of W1's inputs and W2's outputs get exactly zero
        dw1 = torch.cat((dw1, dw1.new_zeros(r, pad)), dim=1)
        dw2 = torch.cat((dw2, dw2.new_zeros(pad, r)), dim=0)
        db2 = torch.cat((db2, db2.new_zeros(pad)))
    return dw1.to(w1.dtype), db1_partial.sum(0).to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)


# ------------------------------------------------------------------ torch.library registration


@torch.library.custom_op("hrm_kernels::gated_blend_fwd", mutates_args=())
def _gated_blend_fwd_op(own: torch.Tensor, other: torch.Tensor, inj: Optional[torch.Tensor],
                        w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        with_stats: bool, store_hidden: bool = True, with_saturation: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_blend_forward(own, other, inj, w1, b1, w2, b2, with_stats, store_hidden, with_saturation)


@_gated_blend_fwd_op.register_fake
def _(own, other, inj, w1, b1, w2, b2, with_stats, store_hidden=True, with_saturation=False):
    hidden = own.new_empty((own.shape[0] if store_hidden else 0, w1.shape[0]))
    stats = own.new_empty((3, 5 if with_saturation else 4) if with_stats else (0,), dtype=torch.float32)
    return torch.empty_like(own), stats, hidden, torch.empty_like(hidden)


@torch.library.custom_op("hrm_kernels::gated_blend_bwd", mutates_args=())
def _gated_blend_bwd_op(dout: torch.Tensor, sat: Optional[torch.Tensor], own: torch.Tensor,
                        other: torch.Tensor, inj: Optional[torch.Tensor], w1: torch.Tensor,
                        b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, pre1: torch.Tensor,
                        z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_blend_backward(dout, sat, own, other, inj, w1, b1, w2, b2, pre1, z)


@_gated_blend_bwd_op.register_fake
def _(dout, sat, own, other, inj, w1, b1, w2, b2, pre1, z):
    d_inj = torch.empty_like(inj) if inj is not None else own.new_empty(0)
    return (torch.empty_like(own), torch.empty_like(other), d_inj, torch.empty_like(w1),
            torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    """``inputs``: the custom op's (own, other, inj, w1, b1, w2, b2, with_stats, store_hidden,
    with_saturation)."""
    own, other, inj, w1, b1, w2, b2, with_stats = inputs[:8]
    with_saturation = len(inputs) > 9 and inputs[9]
    _, stats, pre1, z = output
    ctx.with_saturation = with_stats and with_saturation
    ctx.has_inj = inj is not None
    ctx.save_for_backward(own, other, inj, w1, b1, w2, b2, pre1, z)
    # None, not zeros, for outputs no gradient reaches: stats only logged must not switch on the
    # backward's saturation term (a zeros [3, 5] would, and costs a full pass of work)
    ctx.set_materialize_grads(False)
    # monitoring values only: no gradient path (the saturation column is the differentiable one)
    ctx.mark_non_differentiable(*([] if ctx.with_saturation else [stats]), pre1, z)


def _grads(ctx, dout, dstats, backward=gated_blend_backward):
    """The gradients of (own, other, inj, w1, b1, w2, b2) and None for with_stats from ``ctx`` as
    ``_setup_context`` fills it; ``backward``: the launcher, or its custom op under torch.compile."""
    own, other, inj, w1, b1, w2, b2, pre1, z = ctx.saved_tensors
    # only the saturation column is differentiable; the other stats are monitoring values
    sat = dstats[:, 4].contiguous() if ctx.with_saturation and dstats is not None else None
    if dout is None:  # a gradient reached the stats only
        dout = torch.zeros_like(own)
    d_own, d_other, d_inj, dw1, db1, dw2, db2 = backward(dout.contiguous(), sat, own, other, inj, w1, b1, w2, b2,
                                                         pre1, z)
    return d_own, d_other, (d_inj if ctx.has_inj else None), dw1, db1, dw2, db2, None


def _backward(ctx, dout, dstats, _dpre1, _dz):
    # None for store_hidden and with_saturation
    return *_grads(ctx, dout, dstats, torch.ops.hrm_kernels.gated_blend_bwd), None, None


class GatedBlendFunction(torch.autograd.Function):
    """Eager-mode entry: launches the kernels directly. The custom ops' dispatch (used under
    torch.compile) costs host time that, at HRM's sizes, the op's wall time shows."""

    @staticmethod
    def forward(ctx, own, other, inj, w1, b1, w2, b2, with_stats, with_saturation):
        out, stats, pre1, z = gated_blend_forward(own, other, inj, w1, b1, w2, b2, with_stats,
                                                  with_saturation=with_saturation)
        _setup_context(ctx, (own, other, inj, w1, b1, w2, b2, with_stats, True, with_saturation),
                       (out, stats, pre1, z))
        return out, stats, pre1, z

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward (the custom op has none either)
    def backward(ctx, dout, dstats, _dpre1, _dz):
        return *_grads(ctx, dout, dstats), None  # with_saturation


_gated_blend_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- reference and API


def _check_args(own, other, inj, w1, b1, w2, b2) -> tuple[int, int]:
    op = "gated_blend"
    for name, t in (("own", own), ("other", other), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_float(name, t, op)
    check_same(op, "own", own, "other", other)
    if inj is not None:
        check_float("inj", inj, op)
        check_same(op, "own", own, "inj", inj)
    if own.dim() == 0:
        raise ValueError(f"{op}: own must have a last (feature) dimension, got a scalar")
    d = own.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != 3 * d:
        raise ValueError(f"{op}: w1 has shape {tuple(w1.shape)} but must be [R, 3*D] = [R, {3 * d}] "
                         f"for activations of shape {tuple(own.shape)}")
    r = w1.shape[0]
    expected = {"b1": (r,), "w2": (3 * d, r), "b2": (3 * d,)}
    for name, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but must be {expected[name]} "
                             f"for w1 {tuple(w1.shape)} and activations {tuple(own.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_same(op, "own", own, name, t, shape=False, dtype=False)
    return d, r


def gate_logits_reference(own, other, inj, w1, b1, w2, b2) -> torch.Tensor:
    """The gate logits z = W2 silu(W1 cat + b1) + b2, [..., 3D], in the activations' dtype."""
    dtype = own.dtype
    cat = torch.cat((own, other, inj if inj is not None else torch.zeros_like(own)), dim=-1)
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(cat, w1.to(dtype), b1.to(dtype)))
    return torch.nn.functional.linear(hidden, w2.to(dtype), b2.to(dtype))


def gated_blend_reference(own, other, inj, w1, b1, w2, b2, *, stats: bool = False, saturation: bool = False):
    """Eager PyTorch math of ``gated_blend`` (weights cast to the activation dtype at use, as HRM's
    CastedLinear does); the CPU fallback and the test reference."""
    _check_saturation(stats, saturation)
    z = gate_logits_reference(own, other, inj, w1, b1, w2, b2)
    g_own, g_other, g_inj = torch.sigmoid(z).chunk(3, dim=-1)
    out = g_own * own + g_other * other
    if inj is not None:
        out = out + g_inj * inj
    if not stats:
        return out
    rows = []
    columns = len(STATS_COLUMNS) if saturation else len(STATS_COLUMNS) - 1
    sources = (own, other, inj)
    for k, (g, zk) in enumerate(zip((g_own, g_other, g_inj), z.chunk(3, dim=-1))):
        if sources[k] is None:
            rows.append(torch.zeros(columns, dtype=torch.float32, device=own.device))
            continue
        gf = g.detach().float()
        with torch.no_grad():
            monitor = torch.stack((gf.mean(), (gf < 0.1).float().mean(), (gf > 0.9).float().mean(),
                                   (gf * sources[k].detach().float()).abs().mean()))
        if saturation:
            monitor = torch.cat((monitor, torch.relu(zk.float().abs() - SATURATION_LOGIT).square().mean()[None]))
        rows.append(monitor)
    return out, torch.stack(rows)


def _check_saturation(stats: bool, saturation: bool) -> None:
    if saturation and not stats:
        raise ValueError("gated_blend: saturation=True adds a column to the stats; pass stats=True with it")


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """[..., D] -> contiguous [M, D] (a view unless the layout needs a copy)."""
    return as_rows(t, d).contiguous()


def gated_blend(own: torch.Tensor, other: torch.Tensor, inj: Optional[torch.Tensor],
                w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                *, stats: bool = False, saturation: bool = False):
    """Gated blend of three sources (see the module docstring). Returns ``out`` [..., D], or
    ``(out, stats)`` with ``stats`` [3, 4] float32 when ``stats=True`` ([3, 5], the differentiable
    saturation column added, with ``saturation=True``)."""
    d, r = _check_args(own, other, inj, w1, b1, w2, b2)
    _check_saturation(stats, saturation)
    if not use_triton(own.device) or d == 0 or r > MAX_FUSED_R or (stats and d > MAX_STATS_D):
        return gated_blend_reference(own, other, inj, w1, b1, w2, b2, stats=stats, saturation=saturation)
    args = (_rows(own, d), _rows(other, d), _rows(inj, d) if inj is not None else None,
            w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), bool(stats))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    sat = bool(saturation)
    if torch.compiler.is_compiling():  # the hidden activations reach memory only for a backward
        out, stats_t, _, _ = torch.ops.hrm_kernels.gated_blend_fwd(*args, store_hidden=needs_grad,
                                                                   with_saturation=sat)
    elif needs_grad or forward_ad._current_level >= 0:  # forward AD: the Function says it has no jvp
        out, stats_t, _, _ = GatedBlendFunction.apply(*args, sat)
    else:  # no backward to come: no autograd, and the hidden activations stay on chip
        out, stats_t, _, _ = gated_blend_forward(*args, store_hidden=False, with_saturation=sat)
    out = out.view(own.shape)
    return (out, stats_t) if stats else out
