"""Adam-atan2 (the ``adam-atan2`` package's optimizer, what HRM trains with) as a fused Triton
multi-tensor kernel, with an eager PyTorch fallback for CPU parameters and float64.

Per parameter, with its own step count ``t``, ``bc1 = 1 - beta1^t`` and ``bc2 = 1 - beta2^t``::

    p *= 1 - lr * weight_decay
    m  = m + (1 - beta1) * (g - m)
    v  = v + (1 - beta2) * (g * g - v)
    p -= (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))

No epsilon: ``atan2`` is bounded and defined at ``v = 0`` (``atan2(0, 0) = 0``).

On CUDA one launch updates every parameter of a (param group, dtype, step count) bucket - in HRM
that is all 27.3M parameters in one launch. The launch reads a device table of int64 data
pointers (p, g, m, v per tensor) plus numels, and a table of chunks (tensor index, chunk index),
one program per chunk. Both tables are built on the host from Python ints, copied H2D from pinned
memory without blocking, and cached by (pointers, numels), so a step with unchanged storage
uploads nothing; the per-step scalars (lr / bc1, 1 - lr * wd, sqrt(bc2), 1 - beta) are kernel
arguments computed in Python from the step count, which lives on the host as a Python int. So
``step()`` never synchronises with the device.

Traffic: reads p, g, m, v and writes p, m, v: 7 * 4 bytes per fp32 parameter.

``atan2`` is computed from core Triton math (an odd degree-21 minimax polynomial for atan on
[0, 1] with octant reduction; max 1.3 float32 ulps from the float64 atan2 in the tests), since
libdevice does not run in Triton's CPU interpreter.

Measured (H100, torch 2.11, triton 3.6; benchmarks/bench_adam_atan2.py): one step on HRM's
27.3M fp32 parameters takes 260 us of GPU time (2.94 TB/s of the 764 MB counted), vs 292 us
for ``torch.optim.AdamW(fused=True)`` and 813 us for the same math per tensor in PyTorch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from hrm_kernels._utils import cdiv
from hrm_kernels.backend import use_triton
from hrm_kernels.precompile import launch

# One program per CHUNK elements, processed BLOCK at a time. Swept on H100 with the HRM parameter
# list (benchmarks/bench_adam_atan2.py --sweep): 1024/1024/4 warps 263 us, 8192/1024 274 us,
# 65536/2048 299 us; every configuration gives bit-identical results.
LAUNCH = {"chunk": 1024, "block": 1024, "num_warps": 4}

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _atan2(y, x):
    """float32 atan2(y, x) with C99 semantics (signed zeros, infinities, NaN) from core math.

    a = min(|y|, |x|) / max(|y|, |x|) in [0, 1]; atan(a) = a + a * s * P(s), s = a^2, with P the
    degree-9 relative-error minimax fit (Lawson's algorithm; approximation error 4e-10, below
    float32 rounding); then atan2 = pi/2 - atan(a) if |y| > |x|, pi - that if x < 0, and y's sign.
    pi/2 and pi are split in a float32 head and tail (Cody-Waite) so the subtractions stay exact.
    """
    ax = tl.abs(y)
    bx = tl.abs(x)
    mx = tl.maximum(ax, bx)
    mn = tl.minimum(ax, bx)
    both_inf = (ax == float("inf")) & (bx == float("inf"))  # atan2(+-inf, +-inf): a = 1
    a = tl.div_rn(tl.where(both_inf, 1.0, mn), tl.where((mx == 0.0) | both_inf, 1.0, mx))
    s = a * a
    q = -0.0073180850595235825 + s * 0.0011138158151879907
    q = 0.022540124133229256 + s * q
    q = -0.04469022527337074 + s * q
    q = 0.06741616129875183 + s * q
    q = -0.08811099082231522 + s * q
    q = 0.11058225482702255 + s * q
    q = -0.14279833436012268 + s * q
    q = 0.1999967098236084 + s * q
    q = -0.333333283662796 + s * q
    r = a + a * (s * q)                                       # atan(a), a in [0, 1]
    r = tl.where(ax > bx, (1.5707963705062866 - r) + -4.371139000186243e-08, r)
    x_neg = x.to(tl.int32, bitcast=True) < 0                  # sign bit: -0.0 counts as negative
    r = tl.where(x_neg, (3.1415927410125732 - r) + -8.742278000372475e-08, r)
    # copysign(r, y) on the bits (r >= 0 here): Triton's unary minus is 0 - r, which turns -0 into +0.
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, tl.where(y != y, y, r))


@triton.jit
def _atan2_kernel(Y, X, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, _atan2(y, x), mask=mask)


@triton.jit
def _adam_atan2_math(p, g, m, v, step_size, wd_alpha, one_minus_beta1, one_minus_beta2, bc2_sqrt):
    p = p * wd_alpha
    m = m + one_minus_beta1 * (g - m)
    v = v + one_minus_beta2 * (g * g - v)
    p = p - step_size * _atan2(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt))
    return p, m, v


@triton.jit
def _adam_atan2_kernel(
    PTRS, NUMELS, CHUNKS, FOUND_INF,
    step_size, wd_alpha, one_minus_beta1, one_minus_beta2, bc2_sqrt,
    DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    if HAS_FOUND_INF:  # a skipped step (non-finite loss) changes nothing
        if tl.load(FOUND_INF) != 0:
            return
    # CHUNKS[pid] = tensor index << 32 | chunk index; PTRS[4 t + k] = data pointer of p, g, m, v.
    info = tl.load(CHUNKS + tl.program_id(0))
    t = (info >> 32).to(tl.int32)
    start = (info & 0xFFFFFFFF) * CHUNK
    numel = tl.load(NUMELS + t)
    P = tl.load(PTRS + 4 * t).to(tl.pointer_type(DTYPE))
    G = tl.load(PTRS + 4 * t + 1).to(tl.pointer_type(DTYPE))
    M = tl.load(PTRS + 4 * t + 2).to(tl.pointer_type(DTYPE))
    V = tl.load(PTRS + 4 * t + 3).to(tl.pointer_type(DTYPE))
    for off in tl.range(start, tl.minimum(start + CHUNK, numel), BLOCK):
        offs = off + tl.arange(0, BLOCK)
        p_ptr = P + offs
        g_ptr = G + offs
        m_ptr = M + offs
        v_ptr = V + offs
        if ALIGNED:  # pointers from a table carry no alignment facts; the host checked 16 bytes
            p_ptr = tl.max_contiguous(tl.multiple_of(p_ptr, [16]), [BLOCK])
            g_ptr = tl.max_contiguous(tl.multiple_of(g_ptr, [16]), [BLOCK])
            m_ptr = tl.max_contiguous(tl.multiple_of(m_ptr, [16]), [BLOCK])
            v_ptr = tl.max_contiguous(tl.multiple_of(v_ptr, [16]), [BLOCK])
        if off + BLOCK <= numel:  # full block: unmasked, so loads and stores vectorise
            p, m, v = _adam_atan2_math(
                tl.load(p_ptr).to(tl.float32), tl.load(g_ptr).to(tl.float32),
                tl.load(m_ptr).to(tl.float32), tl.load(v_ptr).to(tl.float32),
                step_size, wd_alpha, one_minus_beta1, one_minus_beta2, bc2_sqrt)
            tl.store(p_ptr, p.to(DTYPE))
            tl.store(m_ptr, m.to(DTYPE))
            tl.store(v_ptr, v.to(DTYPE))
        else:
            mask = offs < numel
            p, m, v = _adam_atan2_math(
                tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32),
                tl.load(g_ptr, mask=mask, other=0.0).to(tl.float32),
                tl.load(m_ptr, mask=mask, other=0.0).to(tl.float32),
                tl.load(v_ptr, mask=mask, other=0.0).to(tl.float32),
                step_size, wd_alpha, one_minus_beta1, one_minus_beta2, bc2_sqrt)
            tl.store(p_ptr, p.to(DTYPE), mask=mask)
            tl.store(m_ptr, m.to(DTYPE), mask=mask)
            tl.store(v_ptr, v.to(DTYPE), mask=mask)


# --------------------------------------------------------------------------------- launchers


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's float32 atan2 on whole tensors (for tests): same shape, float32 result."""
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"atan2: y {tuple(y.shape)} on {y.device} and x {tuple(x.shape)} on "
                         f"{x.device} must have the same shape and device")
    y32, x32 = y.float().contiguous(), x.float().contiguous()
    out = torch.empty_like(y32)
    n, block = y32.numel(), 1024
    if n:
        launch(_atan2_kernel, (cdiv(n, block),), y32, x32, out, n, BLOCK=block, num_warps=4)
    return out


class _LaunchTables:
    """Device-side pointer and chunk tables, cached by (pointers, numels) and by numels.

    A cached table is valid by construction: its key is exactly the addresses and sizes it holds.
    Gradients freed by ``zero_grad(set_to_none=True)`` usually come back at the same addresses
    from the caching allocator; when they do not, the small pointer table is rebuilt (no sync).
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self.pointers: OrderedDict = OrderedDict()  # (device, ptrs, numels, chunk) -> launch args
        self.chunks: OrderedDict = OrderedDict()  # (device, numels, chunk) -> chunk table

    @staticmethod
    def _upload(values, device: torch.device) -> torch.Tensor:
        host = torch.as_tensor(values, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def _remember(self, cache: OrderedDict, key, value):
        cache[key] = value
        while len(cache) > self.max_entries:
            cache.popitem(last=False)
        return value

    @staticmethod
    def _chunk_list(numels: tuple, chunk: int) -> torch.Tensor:
        """tensor index << 32 | chunk index, one entry per chunk, tensors in order."""
        counts = torch.tensor([cdiv(n, chunk) for n in numels], dtype=torch.int64)
        tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return (tensor_index << 32) | (torch.arange(int(counts.sum())) - first)

    def get(self, device: torch.device, ptrs: tuple, numels: tuple, chunk: int) -> tuple:
        """(pointer table [4 T], numel table [T], chunk table [C], C) on ``device``."""
        key = (device, ptrs, numels, chunk)
        entry = self.pointers.get(key)
        if entry is not None:
            return entry
        chunk_key = (device, numels, chunk)
        chunk_table = self.chunks.get(chunk_key)
        if chunk_table is None:
            chunk_table = self._remember(self.chunks, chunk_key,
                                         self._upload(self._chunk_list(numels, chunk), device))
        table = self._upload(ptrs + numels, device)
        n = len(numels)
        return self._remember(self.pointers, key, (table[:4 * n], table[4 * n:], chunk_table,
                                                   chunk_table.numel()))


def _launch_fused(tables: _LaunchTables, device: torch.device, dtype: torch.dtype, ptrs: tuple,
                  numels: tuple, aligned: bool, step_size: float, wd_alpha: float, beta1: float,
                  beta2: float, bc2_sqrt: float, found_inf: Optional[torch.Tensor] = None) -> None:
    ptr_table, numel_table, chunk_table, n_chunks = tables.get(device, ptrs, numels, LAUNCH["chunk"])
    if n_chunks == 0:  # only empty tensors
        return
    launch(_adam_atan2_kernel, (n_chunks,),
        ptr_table, numel_table, chunk_table, found_inf if found_inf is not None else numel_table,
        float(step_size), float(wd_alpha), float(1.0 - beta1), float(1.0 - beta2), float(bc2_sqrt),
        DTYPE=_TRITON_DTYPES[dtype], CHUNK=LAUNCH["chunk"], BLOCK=LAUNCH["block"], ALIGNED=aligned,
        HAS_FOUND_INF=found_inf is not None, num_warps=LAUNCH["num_warps"],
    )


def adam_atan2_fused(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, *,
                     step_size: float, wd_alpha: float, beta1: float, beta2: float, bc2_sqrt: float,
                     tables: Optional[_LaunchTables] = None) -> None:
    """One Triton launch updating every (p, g, m, v) in place. All tensors: contiguous, one
    device, one dtype (float32, bfloat16 or float16; math in float32)."""
    if not params:
        return
    ptrs = tuple(t.data_ptr() for quad in zip(params, grads, exp_avgs, exp_avg_sqs) for t in quad)
    numels = tuple(p.numel() for p in params)
    aligned = all(ptr % 16 == 0 for ptr in ptrs)
    _launch_fused(tables if tables is not None else _LaunchTables(max_entries=1), params[0].device,
                  params[0].dtype, ptrs, numels, aligned, step_size, wd_alpha, beta1, beta2, bc2_sqrt)


def adam_atan2_eager(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, *,
                     step_size: float, wd_alpha: float, beta1: float, beta2: float, bc2_sqrt: float,
                     foreach: bool = True) -> None:
    """The same update with PyTorch ops, in place; float32 math (float64 for float64 tensors).
    ``foreach=True`` uses ``torch._foreach_*`` where all tensors are float32/float64 of one device
    and dtype; ``foreach=False`` is the plain per-tensor loop (the benchmark's baseline)."""
    if not params:
        return
    same = len({(t.device, t.dtype) for t in (*params, *grads, *exp_avgs, *exp_avg_sqs)}) == 1
    if foreach and same and params[0].dtype in (torch.float32, torch.float64):
        torch._foreach_mul_(params, wd_alpha)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bc2_sqrt)
        for p, m, d in zip(params, exp_avgs, denoms):
            p.add_(torch.atan2(m, d), alpha=-step_size)
        return
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        pf, gf, mf, vf = (t if t.dtype == compute else t.to(compute) for t in (p, g, m, v))
        pf.mul_(wd_alpha)
        mf.lerp_(gf, 1.0 - beta1)
        vf.lerp_(gf * gf, 1.0 - beta2)
        pf.add_(torch.atan2(mf, vf.sqrt().div_(bc2_sqrt)), alpha=-step_size)
        for dst, src in ((p, pf), (m, mf), (v, vf)):
            if dst is not src:
                dst.copy_(src)


# ------------------------------------------------------------------------------------ optimizer


def _check_hyperparameters(lr, betas, weight_decay, where: str = "AdamATan2") -> None:
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"{where}: lr must be a Python float, got a tensor (a tensor on the GPU "
                        "would force a host sync every step); pass float(lr)")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{where}: invalid learning rate {lr!r}: it must be a finite number >= 0 "
                         "(0 is allowed, e.g. when a schedule sets group['lr'] every step)")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}") from None
    for i, beta in enumerate((beta1, beta2)):
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"{where}: invalid beta{i + 1} {beta!r} (betas[{i}]): it must be in "
                             "[0, 1)")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0.0):
        raise ValueError(f"{where}: invalid weight_decay {weight_decay!r}: it must be a finite "
                         "number >= 0")


class AdamATan2(torch.optim.Optimizer):
    """Drop-in for ``adam_atan2.AdamATan2``: Adam with ``atan2`` in place of ``m / (sqrt(v) + eps)``
    and decoupled weight decay; see the module docstring for the update.

    ``AdamATan2(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)``; ``lr=0`` is allowed.
    Per-parameter state: ``step`` (a Python int, the parameter's own step count), ``exp_avg`` and
    ``exp_avg_sq`` (same shape and dtype as the parameter). CUDA parameters in float32, bfloat16
    or float16 are updated by the fused Triton kernel (float32 math); CPU parameters, float64
    parameters and the ``eager`` backend use PyTorch ops. ``load_state_dict`` also accepts the
    original package's state, whose ``step`` is a float32 tensor on the device (read once, at
    load time).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 weight_decay: float = 1e-2):
        _check_hyperparameters(lr, betas, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self._tables = _LaunchTables()

    def __setstate__(self, state: dict) -> None:
        # Optimizer.__getstate__ keeps defaults, state and param_groups only: a copy (deepcopy,
        # pickle) needs its own launch tables.
        super().__setstate__(state)
        self._tables = _LaunchTables()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["betas"], group["weight_decay"],
                               where=f"AdamATan2 param group {len(self.param_groups) - 1}")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = int(step.item())
            elif isinstance(step, float):
                state["step"] = int(step)

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: Optional[torch.Tensor] = None):
        """One update of every parameter that has a gradient (others, and their state, are left
        alone). Returns ``closure()``'s loss when a closure is given.

        ``found_inf``: an optional scalar tensor (e.g. ``~torch.isfinite(loss)``); when it is
        nonzero the parameters and moments are left unchanged. The fused kernel reads it on the
        device, so skipping needs no host synchronisation; the eager fallback reads it on the host.
        The step counts advance either way (a skipped step is meant to end training)."""
        if found_inf is not None and not (isinstance(found_inf, torch.Tensor) and found_inf.numel() == 1):
            raise TypeError(f"AdamATan2.step: found_inf must be a one-element tensor (e.g. ~torch.isfinite(loss)), "
                            f"got {type(found_inf).__name__}"
                            + (f" of shape {tuple(found_inf.shape)}" if isinstance(found_inf, torch.Tensor) else ""))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            lr, betas, weight_decay = group["lr"], group["betas"], group["weight_decay"]
            _check_hyperparameters(lr, betas, weight_decay, where=f"AdamATan2 param group {index}")
            with_grad = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("AdamATan2 does not support sparse gradients (parameter of "
                                       f"shape {tuple(p.shape)} in param group {index}); use a "
                                       "dense gradient, e.g. nn.Embedding(sparse=False)")
                with_grad.append((p, g))
            self._update_group(with_grad, float(lr), float(betas[0]), float(betas[1]),
                               float(weight_decay), found_inf)
        return loss

    def _update_group(self, with_grad: list, lr: float, beta1: float, beta2: float,
                      weight_decay: float, found_inf: Optional[torch.Tensor] = None) -> None:
        # Bucket by what one launch can share: device, dtype, step count (bias corrections).
        # This loop runs every step on the host: kept to plain attribute and dict accesses.
        buckets: dict = {}
        state_of = self.state
        for p, g in with_grad:
            state = state_of[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state["step"] = state["step"] + 1
            key = (p.device, p.dtype, step)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = []
            bucket.append((p, g, state["exp_avg"], state["exp_avg_sq"]))
        skip_on_host = None  # the eager fallback reads found_inf on the host, at most once
        flag = None if found_inf is None else found_inf.reshape(1).to(torch.float32)  # the kernel's view
        for (device, dtype, step), quads in buckets.items():
            scalars = dict(step_size=lr / (1.0 - beta1 ** step), wd_alpha=1.0 - lr * weight_decay,
                           beta1=beta1, beta2=beta2, bc2_sqrt=math.sqrt(1.0 - beta2 ** step))
            if dtype in _TRITON_DTYPES and use_triton(device):
                quads = self._launch_bucket(device, dtype, quads, scalars,
                                            None if flag is None else flag.to(device))
            if quads:
                if found_inf is not None and skip_on_host is None:
                    skip_on_host = bool(found_inf)
                if not skip_on_host:
                    adam_atan2_eager(*map(list, zip(*quads)), **scalars)

    def _launch_bucket(self, device: torch.device, dtype: torch.dtype, quads: list, scalars: dict,
                       found_inf: Optional[torch.Tensor]) -> list:
        """One fused launch for the bucket's contiguous (p, g, m, v); returns the others (e.g. a
        transposed parameter), which the eager path handles in any layout. ``found_inf``: a
        float32 [1] tensor on ``device``, or None."""
        ptrs, numels, others, bits = [], [], [], 0
        for quad in quads:
            p, g, m, v = quad
            if (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                    and g.dtype == dtype and m.dtype == dtype and v.dtype == dtype):
                pp, gp, mp, vp = p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr()
                ptrs += (pp, gp, mp, vp)
                bits |= pp | gp | mp | vp
                numels.append(p.numel())
            else:
                others.append(quad)
        if numels:
            args = (self._tables, device, dtype, tuple(ptrs), tuple(numels), bits % 16 == 0)
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    _launch_fused(*args, **scalars, found_inf=found_inf)
            else:
                _launch_fused(*args, **scalars, found_inf=found_inf)
        return others
