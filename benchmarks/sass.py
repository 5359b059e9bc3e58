"""Kernels compiled for an H100/H200 (sm_90) on a machine without a GPU, and what their code costs.

Triton compiles down to a cubin with its bundled ptxas and needs no GPU for that. This gives what a
CPU-only session can still check of a kernel change: that it compiles, that it fits the card's
shared memory and that ptxas did not serialize its wgmmas (``tests/test_compile_for_gpu.py``), and,
as a proxy for its ALU cost, the registers, the spill stack and the SASS instructions of its hottest
loop (the one with the most tensor-core instructions), per thread and iteration. Instruction counts
are not times: a latency-bound kernel hides some of them. ::

    python benchmarks/sass.py        # gated_blend's forward, d_pre1 and second-phase loops at their CUDA configurations
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100_SHARED = 232448  # bytes of shared memory one program may use on an H100 (and an H200)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for_sm90(fn, types: dict, consts: dict, num_warps: int, num_stages: int, aligned=()):
    """``fn`` (a ``@triton.jit`` function) compiled for sm_90. ``types``: Triton type strings by
    argument name (unnamed ones are ``i32``); ``consts``: the constexpr arguments. Pointer arguments
    and the integer arguments named in ``aligned`` are declared divisible by 16, as a real launch
    specializes them (PyTorch's allocations, sizes such as D=512): without that the compiler cannot
    prove its async copies aligned and does not software-pipeline the loads."""
    names = fn.arg_names
    signature = {n: types.get(n, "i32") for n in names}
    signature.update({n: "constexpr" for n in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in aligned}
    src = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_gluon_for_sm90(fn, args: dict, consts: dict, num_warps: int):
    """``fn`` (a ``@gluon.jit`` kernel) compiled for sm_90. ``args``: its non-constexpr arguments by
    name, as they would be launched (host TMA descriptors, which CPU tensors can back, or ints);
    ``consts``: the constexpr ones."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else mangle_type(args[n]) for n in names}
    src = GluonASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def module_copy(module, name: str, edits: dict):
    """``module`` loaded again from its source under ``name``, with its text edited (each key replaced by
    its value; every key must occur): a kernel variant that a compile-time constant selects, compiled
    beside the library's own in one process (a Triton kernel keeps the cache key of its first compile,
    so changing the constant on the library module would hand back the binary already built)."""
    import types

    text = open(module.__file__).read()
    for old, new in edits.items():
        if old not in text:
            raise ValueError(f"module_copy: {old!r} is not in {module.__file__}")
        text = text.replace(old, new)
    copy = types.ModuleType(name)
    copy.__file__ = module.__file__
    sys.modules[name] = copy
    exec(compile(text, module.__file__, "exec"), copy.__dict__)
    return copy


def _cuobjdump(compiled, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(compiled) -> dict:
    """Registers and spill stack per thread, bytes of shared memory per program, spill stores."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(compiled, "--dump-resource-usage"))
    sass = _cuobjdump(compiled, "-sass")
    return dict(registers=int(usage.group(1)), stack=int(usage.group(2)), shared=compiled.metadata.shared,
                spill_stores=len(re.findall(r"\bSTL\b", sass)))


def wgmma_serialized(compiled) -> str | None:
    """ptxas's note when it serialized the kernel's wgmma instructions (C7514 and its kin C751x: e.g. a
    non-wgmma instruction touches an accumulator register of a wgmma still in flight, so every wgmma
    waits for the last; the kernel runs, slower), else None. Triton's compile does not show ptxas's
    notes, so the kernel's PTX is assembled again here with ``-v``."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    notes = [line.strip() for line in (out.stdout + out.stderr).splitlines() if "serialized" in line]
    return notes[0] if notes else None


def hottest_loop(compiled) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the loop body with the most tensor-core instructions (HGMMA,
    HMMA): a backward branch's span in the SASS, per thread and iteration."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(compiled, "-sass"))]
    index = {addr: i for i, (addr, _) in enumerate(lines)}
    best = (-1, [])
    for i, (addr, text) in enumerate(lines):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            body = [t for _, t in lines[index[int(target.group(1), 16)]:i + 1]]
            mma = sum("MMA" in t for t in body)
            best = max(best, (mma, body), key=lambda b: (b[0], len(b[1])))
    ops = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0] for t in best[1])
    return len(best[1]), ops


def _cost_cells(compiled) -> str:
    """A report row's cells: registers | stack B | shared KiB | loop instructions | top opcodes."""
    res = resources(compiled)
    n, ops = hottest_loop(compiled)
    top = ", ".join(f"{op} {c}" for op, c in ops.most_common(6))
    return f"{res['registers']} | {res['stack']} | {res['shared'] / 1024:.0f} | {n} | {top}"


def _gated_blend_forward_report() -> str:
    import torch

    gb = importlib.import_module("hrm_kernels.gated_blend")
    kernel = gb._gated_blend_forward_kernel
    rows = ["| weights | stats | launch configuration | registers | stack B | shared KiB | loop instructions "
            "| top opcodes |", "|---|---|---|---:|---:|---:|---:|---|"]
    for wdtype, wname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cfgs = gb._default_configs(62976, 512, 128, "cuda", torch.bfloat16, wdtype)
        types = {n: "*bf16" for n in kernel.arg_names}
        types.update({n: "*" + wname for n in ("W1", "B1", "W2", "B2")}, STATS="*fp32", n_rows="i32", D="i32",
                     R="i32")
        for stats, sat in ((False, False), (True, False), (True, True)):
            cfg = dict(cfgs["fwd_stats" if stats else "fwd"])
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            compiled = compile_for_sm90(kernel, types, dict(
                HAS_INJ=True, WITH_STATS=stats, WITH_SAT=sat, STORE_HIDDEN=stats, EVEN_D=True, EMU_BF16=False,
                PREC="tf32", FAST_SIGMOID=True, **cfg), warps, stages, aligned=("D", "R"))
            label = "+saturation" if sat else str(stats)
            rows.append(f"| {wname} | {label} | {cfg} warps={warps} stages={stages} | {_cost_cells(compiled)} |")
    return ("gated_blend forward, bf16 activations, D=512, R=128, sm_90 (Triton " + triton.__version__ + "), "
            "per thread; the loop: one D-chunk of the blend\n\n" + "\n".join(rows))


def _gated_blend_dpre_report() -> str:
    """The backward's d_pre1 kernel."""
    import torch

    gb = importlib.import_module("hrm_kernels.gated_blend")
    kernel = gb._gated_blend_backward_dpre_kernel
    cfg = dict(gb._default_configs(62976, 512, 128, "cuda", torch.bfloat16, torch.bfloat16)["dpre"])
    types = {n: "*bf16" for n in kernel.arg_names}
    types.update(SAT="*fp32", DB1_PARTIAL="*fp32", n_rows="i32", D="i32", R="i32")
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    compiled = compile_for_sm90(kernel, types, dict(
        HAS_INJ=True, HAS_SAT=False, EMU_BF16=False, PREC="tf32", FAST_SIGMOID=True, **cfg),
        warps, stages, aligned=("D", "R"))
    rows = ["| launch configuration | registers | stack B | shared KiB | loop instructions | top opcodes |",
            "|---|---:|---:|---:|---:|---|",
            f"| {cfg} warps={warps} stages={stages} | {_cost_cells(compiled)} |"]
    return ("gated_blend backward d_pre1 kernel, bf16, D=512, R=128, sm_90, per thread; the loop: one D-chunk of "
            "the three kinds\n\n" + "\n".join(rows))


def _gated_blend_main_report() -> str:
    """The backward's second phase at its default launch configuration and a few others."""
    import torch

    gb = importlib.import_module("hrm_kernels.gated_blend")
    kernel = gb._gated_blend_backward_kernel
    default = dict(gb._default_configs(62976, 512, 128, "cuda", torch.bfloat16, torch.bfloat16)["bwd"])
    types = {n: "*bf16" for n in kernel.arg_names}
    types.update({n: "*fp32" for n in ("SAT", "DW1_PARTIAL", "DW2_PARTIAL", "DB2_PARTIAL")}, n_rows="i32", D="i32",
                 R="i32", width="i32", rows_per_split="i32")
    shapes = [(default["BLOCK_M"], default["BLOCK_D"], default["num_warps"], default["num_stages"]),
              (32, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)]
    rows = ["| BLOCK_M x BLOCK_D, warps, stages | registers | stack B | shared KiB | loop instructions | top opcodes |",
            "|---|---:|---:|---:|---:|---|"]
    for bm, bd, warps, stages in shapes:
        compiled = compile_for_sm90(kernel, types, dict(
            HAS_SAT=False, EMU_BF16=False, PREC="tf32", FAST_SIGMOID=True, BLOCK_M=bm, BLOCK_D=bd,
            BLOCK_R=default["BLOCK_R"]), warps, stages, aligned=("D", "R", "width"))
        rows.append(f"| {bm} x {bd}, {warps}, {stages} | {_cost_cells(compiled)} |")
    return ("gated_blend backward second phase, bf16, D=512, R=128, sm_90, per thread; the loop: one row block "
            f"(default launch: {default})\n\n" + "\n".join(rows))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
    print(_gated_blend_forward_report())
    print()
    print(_gated_blend_dpre_report())
    print()
    print(_gated_blend_main_report())
