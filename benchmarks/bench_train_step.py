"""One gated-HRM training step on one GPU: forward over one ACT segment (with the
continue-target pass), backward, both optimizers; bf16, default ``hrm_v1`` sizes.

Providers: ``eager`` (eager kernels), ``eager+compile`` (what the reference runs), ``fused``
(hrm_kernels' Triton kernels), ``fused+compile``. The eager providers do the reference's work:
their continue-target pass computes every position (``q_target_first_position=0``) unless
``--switches`` names that switch. Reports ms/step (median of timed steps after warm-up, each
started on an idle GPU and waited for), ms/step back to back (the median of as many steps queued
without waiting, timed by events between them: a step's host-bound start overlaps the previous
step's GPU work, as in ``train/pretrain.py``, which keeps about a step ahead; an evaluation batch
ends with a host check, as ``evaluate``'s does, so there both figures wait), the host's ms in a
waited-for step (launching its work and any wait for the GPU inside it: all of an evaluation
batch, which ends with that check), tokens/s (from the
first), time to the first finished step (compilation included), peak memory, and where the GPU
time goes (matrix multiplies, attention, the fused gate MLP + blend, everything else,
and idle: the time between a step's first and last kernel in which none runs; from the profiler),
and "other"'s share of that profiled time.

    python benchmarks/bench_train_step.py [--shape sudoku arc] [--gated 0 1] [--mode train eval] [--providers ...]
        [--cuda-graphs 1 0] [--precompile] [--kernels 20] [--switches default rope_qkv=0 block_no_grad=1]
        [--kernel-diff 15]

``--mode eval`` times one evaluation batch instead: ACT segments without gradients until every
row halts (16 segments in eval mode), as ``train/pretrain.py``'s ``evaluate`` runs them.

``--switches`` times every provider under each listed setting of the model's fusion switches
(``SWITCHES``; ``default`` leaves them as they are), in one process: the A/B that decides a default.
``--kernel-diff N`` then prints, for each setting after the first, the N kernels whose GPU time per
step moved the most against the first setting's run of the same shape, mode and provider: where a
switch's gain went, or where it was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, require_cuda  # noqa: E402

SHAPES = {  # per-GPU batch, sequence length, vocab, puzzle identifiers (reference datasets)
    "sudoku": dict(batch_size=768, seq_len=81, vocab_size=11, num_puzzle_identifiers=1001),
    "arc": dict(batch_size=96, seq_len=900, vocab_size=12, num_puzzle_identifiers=960 * 1000 + 1),
}
PROVIDERS = ("eager", "eager+compile", "fused", "fused+compile")
# The model's fusion switches: name -> (module, class or None for a module attribute, attribute).
SWITCHES = {
    "rope_attention": ("hrm.layers", "Attention", "FUSED_NO_GRAD"),  # RoPE + attention, no-grad
    "rope_attention_grad": ("hrm.layers", "Attention", "FUSED_GRAD"),  # ... and its fused backward
    "rope_half_tables": ("hrm.layers", "Attention", "HALF_TABLES"),  # the RoPE kernels read the tables' first halves
    "rope_qkv": ("hrm.layers", "Attention", "ROPE_QKV"),  # RoPE with a one-pass dqkv backward
    "linear_swiglu": ("hrm.layers", "SwiGLUMLP", "FUSED_NO_GRAD"),  # gate_up + SwiGLU, no-grad
    "block_no_grad": ("hrm.layers", "Block", "FUSED_NO_GRAD"),  # o/down_proj + add+RMSNorm, no-grad
    "deferred_norm": ("hrm.layers", "Block", "DEFERRED_NORM"),  # no-grad blocks' norms inside their Gluon matmuls
    "residual_grad": ("hrm.layers", "Block", "FUSED_GRAD_RESIDUAL"),  # residual gradient added in the input projection's dx matmul
    "grad_graphs": ("hrm.model", "HRMInner", "GRAPH_GRAD_CALLS"),  # CUDA graphs of the with-grad calls
    "prefix_in_grad_graph": ("hrm.model", "HRMInner", "PREFIX_IN_GRAD_GRAPH"),  # the no-grad calls inside the with-grad graph
    "q_target_in_grad_graph": ("hrm.model", "HRMInner", "Q_TARGET_IN_GRAD_GRAPH"),  # continue target replayed in the with-grad graph
    "pending_norms": ("hrm.model", "HRMInner", "PENDING_NORMS"),  # ungated: module outputs' norms closed by the next input sum
    "hoist_casts": ("hrm.model", "HRMInner", "HOIST_WEIGHT_CASTS"),  # one weight cast per no-grad recurrence
    "shared_layouts": ("hrm.model", "HRMInner", "SHARE_WEIGHT_LAYOUTS"),  # one gate_up reorder per weight per segment
    "prescaled_embeddings": ("hrm.model", "HRMInner", "PRESCALED_EMBEDDINGS"),  # embedding scale on the table, not the rows
    "uncopied_input_grads": ("hrm.model", "HRMInner", "UNCOPIED_INPUT_GRADS"),  # the segment graph's input-embedding gradient handed on uncopied
    "embeddings_in_graph": ("hrm.model", "HRMInner", "EMBEDDINGS_IN_GRAPH"),  # evaluation's graph embeds the ids itself (no x copy)
    "q_target_first_position": ("hrm.model", "HRMInner", "Q_TARGET_FIRST_POSITION"),  # continue target: last H block at position 0
    "fast_sigmoid": ("hrm_kernels._math", None, "FAST_SIGMOID"),  # one-instruction sigmoid in gates and SwiGLU
    "swiglu_linear_bwd": ("hrm_kernels.swiglu_linear", None, "FUSED_BACKWARD"),  # SwiGLU backward in down_proj's dx matmul
    "gluon_swiglu": ("hrm_kernels.linear_swiglu", None, "USE_GLUON"),  # no-grad gate_up + SwiGLU: warp-specialised Gluon GEMM
    "gluon_swiglu_bwd": ("hrm_kernels.swiglu_linear", None, "USE_GLUON"),  # SwiGLU backward in the Gluon dact GEMM
    "gluon_swiglu_grad": ("hrm_kernels.linear_swiglu", None, "GLUON_KEEPS_GATE_UP"),  # with-grad gate_up + SwiGLU: one Gluon GEMM keeping gate_up
    "rope_in_qkv": ("hrm.layers", "Attention", "ROPE_IN_QKV"),  # no-grad long sequences: RoPE in the qkv GEMM's epilogue
    "rope_in_qkv_short": ("hrm.layers", "Attention", "ROPE_IN_QKV_SHORT"),  # ... and short ones (Sudoku)
    "rope_in_qkv_grad": ("hrm.layers", "Attention", "ROPE_IN_QKV_GRAD"),  # ... and with a gradient past 128 tokens (ARC)
    "gluon_gated_blend": ("hrm_kernels.gated_blend", None, "USE_GLUON"),  # no-grad gate MLP + blend: one Gluon kernel
    "gluon_gated_blend_dpre": ("hrm_kernels.gated_blend", None, "USE_GLUON_DPRE"),  # the backward's d_pre1 phase in Gluon
    "gluon_gated_blend_main": ("hrm_kernels.gated_blend", None, "USE_GLUON_MAIN"),  # ... and its second phase
    "gluon_gated_blend_store": ("hrm_kernels.gated_blend", None, "USE_GLUON_STORE"),  # with-grad forward without stats in Gluon
    "gluon_rope_attention": ("hrm_kernels.rope_attention", None, "USE_GLUON"),  # short-sequence RoPE + attention forward: one Gluon kernel
    "gluon_rope_attention_bwd": ("hrm_kernels.rope_attention", None, "USE_GLUON_BACKWARD"),  # ... and its backward
    "gluon_attention_long": ("hrm_kernels.rope_attention", None, "USE_GLUON_LONG"),  # no-grad attention past 128 tokens
    "gluon_attention_long_grad": ("hrm_kernels.rope_attention", None, "USE_GLUON_LONG_GRAD"),  # ... with a gradient, cuDNN backward
    "gluon_attention_three": ("hrm_kernels._gluon_attention", None, "THREE_CONSUMERS"),  # ... three consumer warpgroups (192-query items)
    "add3": ("hrm.model", "ReasoningModule", "FUSED_INPUT"),  # ungated module input own + (other + inj) in one pass
}
REFERENCE_WORK = "q_target_first_position=0,prescaled_embeddings=0"  # what the eager providers run unless told otherwise


def parse_switches(setting: str) -> list[tuple[object, str, bool]]:
    """``setting``: ``default`` or ``name=0|1[,name=0|1...]`` over ``SWITCHES``, as (owner, attribute,
    value) triples; a wrong item stops with the valid names before anything is changed."""
    parsed = []
    for item in ([] if setting == "default" else setting.split(",")):
        name, _, value = item.partition("=")
        if name not in SWITCHES or value not in ("0", "1"):
            raise SystemExit(f"--switches: {item!r} is not name=0|1 with name one of {', '.join(SWITCHES)}")
        module, cls, attr = SWITCHES[name]
        owner = importlib.import_module(module)
        parsed.append((getattr(owner, cls) if cls else owner, attr, value == "1"))
    return parsed


@contextlib.contextmanager
def switches(setting: str):
    """The switches of ``setting`` (see ``parse_switches``) set inside the block, restored on exit."""
    changes = [(owner, attr, getattr(owner, attr), value) for owner, attr, value in parse_switches(setting)]
    try:
        for owner, attr, _, value in changes:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, old, _ in reversed(changes):
            setattr(owner, attr, old)


def build(shape: str, gated: bool, provider: str, cuda_graphs: bool = True):
    from hrm import ACTLossHead, HRM, CastedSparseEmbeddingSignSGD
    from hrm_kernels import AdamATan2

    kernels = "eager" if provider.startswith("eager") else "triton"
    cfg = dict(SHAPES[shape], use_gating=gated, kernels=kernels, attn_backend="sdpa", cuda_graphs=cuda_graphs)
    with torch.device("cuda"):
        head = ACTLossHead(HRM(cfg), loss_type="stablemax_cross_entropy")
    head.train()
    step_model = torch.compile(head) if provider.endswith("compile") else head
    opt = AdamATan2(head.parameters(), lr=0, betas=(0.9, 0.95), weight_decay=0.1)
    emb_opt = CastedSparseEmbeddingSignSGD(head.model.inner.puzzle_emb, lr=0, weight_decay=0.1)
    return head, step_model, opt, emb_opt


def make_batch(shape: str, seed: int):
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, n = s["batch_size"], s["seq_len"]
    return {"inputs": torch.randint(1, s["vocab_size"], (b, n), device="cuda", generator=g, dtype=torch.int32),
            "labels": torch.randint(1, s["vocab_size"], (b, n), device="cuda", generator=g, dtype=torch.int32),
            "puzzle_identifiers": torch.randint(1, s["num_puzzle_identifiers"], (b,), device="cuda",
                                                generator=g, dtype=torch.int32)}


def classify(name: str) -> str:
    """``matmul``, ``attention``, ``gate`` (the fused gate MLP + blend kernels of ``gated_blend``: two
    small matmuls with the activation, sigmoid and blend as their epilogue, reported apart so that
    "other" is the same work with or without them) or ``other``."""
    n = name.lower()
    if n.startswith("triton_"):  # Inductor's fused kernels (their names list every op they fuse)
        return "other"
    if "gated_blend" in n:
        return "gate"
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "cudnn")):
        return "attention"
    # Our matmul kernels with a fused epilogue count as matmuls (their epilogue time included).
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "wgmma", "_linear_swiglu")):
        return "matmul"
    return "other"


def idle_us(intervals: list[tuple[float, float]]) -> float:
    """Time inside [first start, last end] of ``intervals`` (kernel (start, end) times, any order,
    overlapping allowed) that no interval covers: how long the GPU waited for work."""
    return sum((gap for gap, _, _, _ in idle_gaps([(s, e, "") for s, e in intervals])), 0.0)


def idle_gaps(work: list[tuple[float, float, str]]) -> list[tuple[float, float, str, str]]:
    """The uncovered stretches inside [first start, last end] of ``work`` ((start, end, name) of each
    kernel, any order, overlapping allowed), in time order: [(gap, its start, the name of the kernel
    that covered up to it, the name of the kernel after it)]: where and between what the GPU waited."""
    gaps, covered_to, last = [], None, ""
    for start, end, name in sorted(work):
        if covered_to is not None and start > covered_to:
            gaps.append((start - covered_to, covered_to, last, name))
        if covered_to is None or end > covered_to:
            covered_to, last = end, name
    return gaps


def device_work(events) -> list:
    """The profiler's device events that run work (kernels, copies, memsets): not the GPU-side
    annotation ranges (an optimizer step's label), which span kernels rather than run any."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def gpu_time_split(events, calls: int) -> tuple[dict, list]:
    """GPU milliseconds per call of the profiled function: by class (``matmul``, ``attention``,
    ``gate``, ``other``: ``classify``), ``idle`` (``idle_us`` over the span of all ``calls``, host time
    between them included) and ``span`` (first start to last end), and the work's list [(ms, launches, class, name)], largest first. From
    the profiler's device events (kernels, copies, memsets); GPU-side annotation ranges (an
    optimizer step's label) span kernels rather than run any, so they count nowhere."""
    work = device_work(events)
    by_name: dict[str, list] = {}
    for e in work:
        entry = by_name.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.end - e.time_range.start
        entry[1] += 1
    split = {"matmul": 0.0, "attention": 0.0, "gate": 0.0, "other": 0.0}
    kernels = []
    for name, (us, launches) in by_name.items():
        ms, kind = us / calls / 1e3, classify(name)
        split[kind] += ms
        kernels.append((ms, launches // calls, kind, name))
    intervals = [(e.time_range.start, e.time_range.end) for e in work]
    split["idle"] = idle_us(intervals) / calls / 1e3
    # first kernel's start to last kernel's end: with the classes and idle, shows how far the
    # profiler's per-kernel times run over the unprofiled ms/step
    split["span"] = (max(e for _, e in intervals) - min(s for s, _ in intervals)) / calls / 1e3 if intervals else 0.0
    return split, sorted(kernels, reverse=True)


def _measure(step, state, steps: int, prepare=None, ops: int = 0) -> dict:
    """Time ``state = step(state)``: the first call (compilation included, and ``prepare()`` before
    it), then the median of ``steps`` timed calls after warm-up, each waited for, and the median of
    ``steps`` calls queued back to back (``ms_pipelined``), the host's time in a waited-for call
    (``host_ms``: launching its work, and any wait for the GPU inside it), then the profiler's GPU-time split
    over 3 calls (and with ``ops``, one more call's ``ops_table``). Peak memory: from the first call
    on (after ``prepare``, whose copies are freed)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prepare is not None:
        prepare()
        torch.cuda.synchronize()
    # peak memory from here: the dry run's throwaway copies are gone (what it leaves allocated counts)
    torch.cuda.reset_peak_memory_stats()
    state = step(state)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(3):
        state = step(state)
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t_host = time.perf_counter()
        state = step(state)
        host.append((time.perf_counter() - t_host) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    # back to back: steps queued behind one untimed step, an event between each two, no wait until
    # the last (the trainer keeps about a step ahead: it reads step t - 1's metrics after queuing
    # step t). Each step's time is then its GPU time plus any wait for the host's launches.
    state = step(state)
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for mark in marks[1:]:
        state = step(state)
        mark.record()
    torch.cuda.synchronize()
    queued = sorted(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            state = step(state)
        torch.cuda.synchronize()
    events = prof.events()
    split, kernels = gpu_time_split(events, calls=3)
    work = [(e.time_range.start, e.time_range.end, e.name) for e in device_work(events)]
    origin = min((start for start, _, _ in work), default=0.0)  # gap positions from the first kernel's start
    gaps = [(gap, at - origin, before, after) for gap, at, before, after in idle_gaps(work)]
    result = {"ms": sorted(times)[len(times) // 2], "ms_pipelined": queued[len(queued) // 2],
              "host_ms": sorted(host)[len(host) // 2], "first_step_s": first,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **split, "kernels": kernels, "gaps": gaps}
    if ops:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            step(state)
            torch.cuda.synchronize()
        result["ops_table"] = ops_table(prof, ops)
    return result


def ops_table(prof, rows: int) -> str:
    """The profiler's ops with the most GPU time of their own, grouped by input shapes."""
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=rows,
                                                              max_name_column_width=60, max_shapes_column_width=80)


def _train_step(step_model, opt, emb_opt, batch: dict, gbs: int):
    def train_step(carry):
        for group in opt.param_groups:
            group["lr"] = 1e-4
        emb_opt.param_groups[0]["lr"] = 1e-2
        carry, loss, metrics, _, _ = step_model(carry=carry, batch=batch, return_keys=())
        (loss / gbs).backward()
        opt.step()
        emb_opt.step()
        opt.zero_grad(set_to_none=True)
        emb_opt.zero_grad(set_to_none=True)
        return carry

    return train_step


def _compile_kernels_ahead(head, opt, emb_opt, batch: dict, gbs: int, report: dict) -> None:
    """The trainer's ``precompile_kernels`` dry run: a training step and an evaluation segment on
    copies, inside ``hrm_kernels.compile_ahead`` (their Triton kernels compile, on a thread pool)."""
    import copy

    from hrm_kernels import compile_ahead

    h, o, e = copy.deepcopy((head, opt, emb_opt))
    h.train()
    with compile_ahead() as done:
        _train_step(h, o, e, batch, gbs)(h.initial_carry(batch))
        h.eval()
        with torch.inference_mode():
            h(carry=h.initial_carry(batch), batch=batch, return_keys=())
    del h, o, e
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # its cuBLAS workspace handed back, as the
        torch.cuda.synchronize()  # trainer's release_cublas_workspaces does
        torch._C._cuda_clearCublasWorkspaces()
    report.update(precompiled_kernels=done.kernels, precompile_s=done.seconds)


def run(shape: str, gated: bool, provider: str, mode: str = "train", steps: int = 10,
        precompile: bool = False, cuda_graphs: bool = True, setting: str = "default", ops: int = 0) -> dict:
    """``mode="train"``: one optimizer step (one ACT segment with the continue-target pass,
    backward, both optimizers). ``mode="eval"``: one evaluation batch, i.e. segments without
    gradients until every row halts (``halt_max_steps`` = 16 in eval mode), as ``evaluate`` runs.
    ``precompile``: fused providers run the trainer's ``precompile_kernels`` dry run first, inside
    the first step's time. ``cuda_graphs``: the model's ``cuda_graphs`` setting (providers without
    torch.compile replay the no-gradient recurrence as CUDA graphs; compiled ones never do).
    ``setting``: the fusion switches (``parse_switches``), after the eager providers' ``REFERENCE_WORK``
    items it does not name (labelled "reference work" where it names none of them).
    ``ops``: also the ``ops`` PyTorch ops with the most GPU time of their own, by input shapes
    (``ops_table``; a replayed CUDA graph's kernels belong to no op: use ``cuda_graphs=False``)."""
    named = {item.partition("=")[0] for item in ([] if setting == "default" else setting.split(","))}
    reference = [item for item in REFERENCE_WORK.split(",") if item.partition("=")[0] not in named]
    # the label only where no reference item is overridden; the items not named apply either way
    reference_work = provider.startswith("eager") and len(reference) == len(REFERENCE_WORK.split(","))
    if provider.startswith("eager") and reference:
        setting = ",".join(reference + ([] if setting == "default" else [setting]))
    with switches(setting):
        result = _run(shape, gated, provider, mode, steps, precompile, cuda_graphs, ops)
    if reference_work and mode == "train":
        result["provider"] += " (reference work)"
    return result


def _run(shape, gated, provider, mode, steps, precompile, cuda_graphs, ops=0) -> dict:
    torch.manual_seed(0)
    head, step_model, opt, emb_opt = build(shape, gated, provider, cuda_graphs)
    batch = make_batch(shape, 0)
    gbs = SHAPES[shape]["batch_size"]
    train_step = _train_step(step_model, opt, emb_opt, batch, gbs)
    report: dict = {}
    prepare = None
    if precompile and provider.startswith("fused"):
        prepare = lambda: _compile_kernels_ahead(head, opt, emb_opt, batch, gbs, report)  # noqa: E731

    def eval_batch(_):  # as train/pretrain.py's evaluate: halt_max_steps segments, one host check
        with torch.inference_mode():
            carry = head.initial_carry(batch)
            segments = head.model.config.halt_max_steps
            for segment in range(segments):  # (metrics from the last segment only)
                carry, _, _, _, all_finish = step_model(carry=carry, batch=batch, return_keys=(),
                                                        metrics=segment == segments - 1)
            assert bool(all_finish)

    if mode == "eval":
        head.eval()
        result = _measure(eval_batch, None, steps=max(3, steps // 3), prepare=prepare, ops=ops)
    else:
        result = _measure(train_step, head.initial_carry(batch), steps, prepare=prepare, ops=ops)
    tokens = gbs * SHAPES[shape]["seq_len"]
    name = provider + (" (precompile)" if prepare is not None else "")
    name += " (no graphs)" if not cuda_graphs and not provider.endswith("compile") else ""
    return {"shape": shape, "gated": gated, "provider": name, "mode": mode,
            "tokens_per_s": tokens / result["ms"] * 1e3, **result, **report}


def other_share(r: dict) -> float:
    """"Other"'s share of the profiled step (matmul + attention + gate + other + idle): the
    profiler's per-kernel times add up to more than the unprofiled ms/step, so the classes are
    compared with their own sum."""
    total = sum(r[k] for k in ("matmul", "attention", "gate", "other", "idle"))
    return r["other"] / total if total else 0.0


def kernel_diff(base: list, other: list, n: int) -> list:
    """The ``n`` kernels whose GPU ms per call differ most between two ``gpu_time_split`` kernel lists
    (a kernel missing from one list counts 0 there): [(other ms - base ms, base ms, other ms, base
    launches, other launches, class, name)], largest absolute difference first, name breaking ties."""
    rows = {name: [0.0, 0.0, 0, 0, kind] for _, _, kind, name in (*base, *other)}
    for i, kernels in enumerate((base, other)):
        for ms, launches, _, name in kernels:
            rows[name][i] += ms
            rows[name][2 + i] += launches
    diffs = [(o - b, b, o, nb, no, kind, name) for name, (b, o, nb, no, kind) in rows.items()]
    return sorted(diffs, key=lambda d: (-abs(d[0]), d[6]))[:n]


def kernel_diff_report(rows: list[dict], n: int) -> str:
    """``kernel_diff`` of every run made under a switch setting against the first setting's run of the
    same shape, gated, mode and provider (``rows`` as ``main`` collects them: ``setting`` and
    ``provider`` before the setting's suffix in each)."""
    first: dict = {}
    lines = []
    for r in rows:
        key = (r["shape"], r["gated"], r["mode"], r["base_provider"])
        if key not in first:
            first[key] = r
            continue
        base = first[key]
        lines.append(f"\nkernel time moved, {r['shape']} gated={r['gated']} {r['mode']} {r['base_provider']}: "
                     f"[{r['setting']}] against [{base['setting']}] (GPU ms per step; launches):")
        for delta, b, o, nb, no, kind, name in kernel_diff(base["kernels"], r["kernels"], n):
            lines.append(f"{delta:+8.2f} {b:8.2f} -> {o:8.2f} {nb:5d} -> {no:5d}x {kind:9s} {name[:100]}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [f"### Training step ({environment()})", "",
             "| shape | gated | mode | provider | ms/step | ms/step back to back | host ms/step | tokens/s | first step s | peak GiB | GPU ms: matmul / attention / gate / other / idle | other share |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['gated']} | {r['mode']} | {r['provider']} | {r['ms']:.1f} | "
                     f"{r['ms_pipelined']:.1f} | {r['host_ms']:.1f} | {r['tokens_per_s']:.3g} | "
                     f"{r['first_step_s']:.1f} | {r['peak_gib']:.1f} | "
                     f"{r['matmul']:.1f} / {r['attention']:.1f} / {r['gate']:.1f} / {r['other']:.1f} / {r['idle']:.1f} | "
                     f"{other_share(r):.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", nargs="*", default=["sudoku"], choices=list(SHAPES))
    parser.add_argument("--gated", nargs="*", type=int, default=[1])
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--mode", nargs="*", default=["train"], choices=["train", "eval"],
                        help="train: one optimizer step; eval: one evaluation batch (16 segments, no gradients)")
    parser.add_argument("--precompile", action="store_true",
                        help="fused providers: compile their Triton kernels ahead, on a thread pool (the trainer's "
                             "precompile_kernels), inside the first step's time")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="also print each run's N largest kernels by GPU time (profiler)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also print each run's N PyTorch ops with the most GPU time of their own, by input "
                             "shapes (profiler; with --cuda-graphs 0, since replayed graphs hide their ops)")
    parser.add_argument("--gaps", type=int, default=0, metavar="N",
                        help="also print each run's N longest stretches in which the GPU waited for work, over "
                             "the 3 profiled calls, with the kernels on either side (profiler)")
    parser.add_argument("--cuda-graphs", nargs="*", type=int, default=[1],
                        help="the model's cuda_graphs setting(s) for the providers without torch.compile")
    parser.add_argument("--switches", nargs="*", default=["default"],
                        help=f"fusion switch settings to compare: default, or name=0|1[,name=0|1] with names "
                             f"{', '.join(SWITCHES)}")
    parser.add_argument("--kernel-diff", type=int, default=0, metavar="N",
                        help="with several --switches settings: print the N kernels whose GPU time moved the most "
                             "against the first setting's run (profiler)")
    args = parser.parse_args(argv)
    for setting in args.switches:  # every setting checked before the first run
        parse_switches(setting)
    rows = []
    for shape in args.shape:
        for gated in args.gated:
            for mode, provider, graphs, setting in itertools.product(args.mode, args.providers, args.cuda_graphs,
                                                                     args.switches):
                if provider.endswith("compile") and graphs != args.cuda_graphs[0]:
                    continue  # compiled providers never replay graphs: once is enough
                r = run(shape, bool(gated), provider, mode, precompile=args.precompile, cuda_graphs=bool(graphs),
                        setting=setting, ops=args.ops)
                r.update(setting=setting, base_provider=r["provider"])
                if setting != "default":
                    r["provider"] += f" [{setting}]"
                hidden = ("kernels", "gaps", "setting", "base_provider", "ops_table")
                print({k: v for k, v in r.items() if k not in hidden}, flush=True)
                rows.append(r)
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    table = markdown(rows)
    for r in rows if args.kernels else ():
        print(f"\nlargest kernels, {r['shape']} gated={r['gated']} {r['mode']} {r['provider']} (GPU ms per call):")
        for ms, count, kind, name in r["kernels"][:args.kernels]:
            print(f"{ms:8.2f} {count:5d}x {kind:9s} {name[:110]}")
    for r in rows if args.gaps else ():
        print(f"\nlongest GPU idle stretches, {r['shape']} gated={r['gated']} {r['mode']} {r['provider']} "
              f"(3 calls; {len(r['gaps'])} stretches, {r['idle'] * 3:.2f} ms in all):")
        for gap, at, before, after in sorted(r["gaps"], reverse=True)[:args.gaps]:
            print(f"{gap:8.1f} us at {at / 1e3:8.2f} ms: {before[:60]} -> {after[:60]}")
    for r in rows if args.ops else ():
        print(f"\nops by GPU time, {r['shape']} gated={r['gated']} {r['mode']} {r['provider']} (one call):\n"
              f"{r['ops_table']}")
    if args.kernel_diff:
        print(kernel_diff_report(rows, args.kernel_diff))
    print(table)
    return table


if __name__ == "__main__":
    require_cuda(__file__)
    main()
