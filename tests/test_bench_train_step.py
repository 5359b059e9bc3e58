"""bench_train_step's GPU-time split: the gaps between kernels inside the profiled span (idle),
overlaps merged, and the kernel time by class, annotation ranges left out."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from benchmarks.bench_train_step import (classify, gpu_time_split, idle_gaps, idle_us, kernel_diff, kernel_diff_report,
                                        ops_table, other_share)


def test_idle_is_the_uncovered_part_of_the_span():
    assert idle_us([]) == 0.0
    assert idle_us([(5.0, 9.0)]) == 0.0
    # two streams overlapping, a nested kernel, then a 3 us gap and a 1 us gap, given out of order
    intervals = [(20.0, 21.0), (0.0, 10.0), (2.0, 4.0), (8.0, 14.0), (17.0, 19.0)]
    assert idle_us(intervals) == 3.0 + 1.0


def test_idle_gaps_name_the_kernel_that_covered_up_to_each_gap_and_the_next():
    # "long" covers past "nested" and "tail", so the first gap follows "long", not the last to start
    work = [(17.0, 19.0, "c"), (0.0, 10.0, "a"), (2.0, 4.0, "nested"), (8.0, 14.0, "long"), (9.0, 12.0, "tail"),
            (20.0, 21.0, "d")]
    assert idle_gaps(work) == [(3.0, 14.0, "long", "c"), (1.0, 19.0, "c", "d")]
    assert idle_gaps([]) == [] and idle_gaps([(1.0, 2.0, "x")]) == []


def test_idle_matches_a_unit_grid_count():
    rng = random.Random(0)
    for _ in range(200):
        intervals = []
        for _ in range(rng.randint(1, 12)):
            start = rng.randint(0, 60)
            intervals.append((float(start), float(start + rng.randint(1, 9))))
        lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
        uncovered = sum(1 for t in range(int(lo), int(hi)) if not any(s <= t < e for s, e in intervals))
        assert idle_us(intervals) == uncovered


def _event(name, start, end, device=torch.autograd.DeviceType.CUDA, annotation=False):
    """A stand-in for the profiler's FunctionEvent: the fields gpu_time_split reads."""
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end))


def test_split_sums_device_work_per_call_without_annotations():
    """Two calls of a step: per call, a matmul of 4 + 2 us, an attention kernel of 3 us, a copy of
    1 us (other), a 2 us gap; an optimizer-step annotation over the copy and a CPU-side event (both
    spans, not GPU work) count nowhere, neither in the classes nor in the kernel list."""
    events = []
    for t0 in (0.0, 100.0):
        events += [_event("sm90_xmma_gemm_bf16", t0, t0 + 4), _event("sm90_xmma_gemm_bf16", t0 + 4, t0 + 6),
                   _event("_rope_attention_kernel", t0 + 6, t0 + 9),
                   _event("Memcpy DtoD (Device -> Device)", t0 + 11, t0 + 12),
                   _event("Optimizer.step#AdamATan2.step", t0 + 10, t0 + 40, annotation=True),
                   _event("cudaLaunchKernel", t0, t0 + 50, device=torch.autograd.DeviceType.CPU)]
    split, kernels = gpu_time_split(events, calls=2)
    assert split["matmul"] == pytest.approx(6e-3) and split["attention"] == pytest.approx(3e-3)
    assert split["other"] == pytest.approx(1e-3) and split["gate"] == 0.0
    assert split["span"] == pytest.approx(112 / 2 / 1e3)  # 0 to 112 us
    # gaps: 2 us in each call, and 88 us between the first call's last kernel and the second's first
    assert split["idle"] == pytest.approx((2 + 88 + 2) / 2 / 1e3)
    assert [(round(ms * 1e3, 6), n, kind) for ms, n, kind, _ in kernels] == [
        (6.0, 2, "matmul"), (3.0, 1, "attention"), (1.0, 1, "other")]


def test_gate_kernels_are_their_own_class_and_other_share_uses_the_profiled_sum():
    """The gated blend's kernels (Triton and Gluon) are ``gate``, apart from matmul and other; the
    other share divides by the classes' and idle's sum, not by ms/step."""
    assert classify("_gated_blend_forward_kernel") == "gate"
    assert classify("gated_blend_dpre_kernel") == "gate"
    assert classify("triton_poi_fused_mul_sigmoid_0") == "other"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    row = {"matmul": 6.0, "attention": 2.0, "gate": 1.0, "other": 0.5, "idle": 0.5, "ms": 8.0}
    assert other_share(row) == pytest.approx(0.05)


def test_kernel_diff_orders_by_moved_time_and_counts_missing_kernels_as_zero():
    """Kernel lists as gpu_time_split gives them (ms, launches, class, name): a kernel in both lists,
    one only in the first (gone with the switch), one only in the second (new), one unchanged."""
    base = [(5.0, 8, "attention", "cudnn_bprop"), (2.0, 10, "other", "_rope_kernel"), (1.0, 4, "other", "add3")]
    other = [(4.5, 8, "attention", "cudnn_bprop"), (3.0, 10, "matmul", "gluon_gemm_rope"),
             (1.0, 4, "other", "add3")]
    got = kernel_diff(base, other, n=10)
    assert [(d, b, o, nb, no, name) for d, b, o, nb, no, _, name in got] == [
        (3.0, 0.0, 3.0, 0, 10, "gluon_gemm_rope"), (-2.0, 2.0, 0.0, 10, 0, "_rope_kernel"),
        (-0.5, 5.0, 4.5, 8, 8, "cudnn_bprop"), (0.0, 1.0, 1.0, 4, 4, "add3")]
    assert [kind for *_, kind, _ in got] == ["matmul", "other", "attention", "other"]
    assert [d[6] for d in kernel_diff(base, other, n=2)] == ["gluon_gemm_rope", "_rope_kernel"]
    # the moved times add up to the difference of the lists' totals
    assert sum(d[0] for d in got) == pytest.approx(sum(k[0] for k in other) - sum(k[0] for k in base))


def test_kernel_diff_report_compares_each_setting_with_the_first_run_of_its_group():
    """Runs of two providers under three settings (as main collects them): each later setting is
    compared with its own provider's first run, never with the other provider's."""
    def row(provider, setting, ms):
        return {"shape": "arc", "gated": False, "mode": "train", "base_provider": provider, "setting": setting,
                "kernels": [(ms, 1, "other", "k")]}

    rows = [row("fused", "default", 1.0), row("eager", "default", 7.0), row("fused", "x=1", 1.5),
            row("eager", "x=1", 6.0), row("fused", "default", 1.25)]
    report = kernel_diff_report(rows, n=5)
    blocks = [b for b in report.split("\n\n") if b.strip()]
    assert len(blocks) == 3
    assert "fused: [x=1] against [default]" in blocks[0] and "+0.50" in blocks[0]
    assert "eager: [x=1] against [default]" in blocks[1] and "-1.00" in blocks[1]
    assert "fused: [default] against [default]" in blocks[2] and "+0.25" in blocks[2]
    assert kernel_diff_report(rows[:2], n=5) == ""


def test_ops_table_lists_the_profiled_ops_by_input_shape():
    """``--ops``: the profiler's ops, grouped by input shapes (CPU times here; the sort key is the
    device time, which a CPU-only profile has as zeros)."""
    from torch.profiler import ProfilerActivity, profile

    a, b = torch.randn(37, 123), torch.randn(123, 5)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        a @ b
        a[:, :5].contiguous()
    table = ops_table(prof, 20)
    assert "aten::mm" in table and "[[37, 123], [123, 5]]" in table
    assert "aten::contiguous" in table or "aten::clone" in table


def test_tune_gluon_gemm_names_its_defaults_and_stops_cleanly_without_hopper():
    """The sweep's first candidate of each epilogue is the library's default (None), every other is a
    4-tuple of powers of two (the TMA block shapes must be); without a Hopper GPU it stops naming why."""
    from benchmarks import tune_gluon_gemm
    from hrm_kernels import _gluon_gemm, _gluon_swiglu_backward

    for epilogue, configs in tune_gluon_gemm.CANDIDATES.items():
        default = tune_gluon_gemm.get_config(epilogue)
        assert len(default) == 4 and configs[0] is None
        tune_gluon_gemm.set_config(epilogue, (64, 32, 16, 2))  # each key reaches the tiles the kernel is given
        try:
            if _gluon_gemm._HAVE_GLUON:  # the launchers' TMA descriptors (host objects: CPU tensors do)
                x, w = torch.empty(40, 64, dtype=torch.bfloat16), torch.empty(64, 64, dtype=torch.bfloat16)
                if epilogue == "swiglu_backward":
                    boxes = [list(d.block_shape) for d in _gluon_swiglu_backward.descriptors(
                        x, w, torch.empty(40, 128, dtype=torch.bfloat16), torch.empty(40, 128, dtype=torch.bfloat16))]
                    assert boxes[:3] == [[64, 16], [16, 32], [64, 32]], boxes
                else:
                    out = torch.empty(40, 64 // _gluon_gemm.WEIGHT_ROWS_PER_COLUMN[epilogue], dtype=torch.bfloat16)
                    boxes = [list(d.block_shape) for d in _gluon_gemm.descriptors(x, w, out, epilogue)]
                    assert boxes[:2] == [[64, 16], [32, 16]], boxes
        finally:
            tune_gluon_gemm.set_config(epilogue, default)
        assert tune_gluon_gemm.get_config(epilogue) == default
        for cfg in configs[1:]:
            assert len(cfg) == 4 and all(v > 0 and v & (v - 1) == 0 for v in cfg[:3]), cfg
    if not (torch.cuda.is_available() and _gluon_gemm.available(torch.device("cuda"))):
        with pytest.raises(SystemExit, match="Hopper"):
            tune_gluon_gemm.main([])


def test_markdown_reports_both_step_times_of_each_run():
    """A row carries the median of steps waited for one by one, the back-to-back median and the host's
    time in a step, in that order."""
    from benchmarks.bench_train_step import markdown

    row = {"shape": "arc", "gated": False, "mode": "train", "provider": "fused", "ms": 116.34, "ms_pipelined": 114.96,
           "host_ms": 8.04, "tokens_per_s": 7.4e5, "first_step_s": 3.2, "peak_gib": 15.1, "matmul": 66.0, "attention": 39.0,
           "gate": 0.0, "other": 9.0, "idle": 1.0}
    table = markdown([row]).splitlines()
    header = [c.strip() for c in table[2].split("|")]
    cells = [c.strip() for c in table[4].split("|")]
    assert cells[header.index("ms/step")] == "116.3"
    assert cells[header.index("ms/step back to back")] == "115.0"
    assert cells[header.index("host ms/step")] == "8.0"
