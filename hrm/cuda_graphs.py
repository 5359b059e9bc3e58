"""CUDA graphs of a fixed-shape, gradient-free function: one capture per input signature, then one
``replay()`` per call instead of hundreds of kernel launches from Python.

HRM's recurrent core runs most of each segment without gradients: all module calls but the last
L and H ones in training (4 of 6 by default: 16 blocks of about 10 kernels each), all of them in
the continue-target pass and in evaluation. A graph replays the same kernels, with the same
arguments, from one host call. Where the kernels are short (small batches) Python's launches are
slower than the GPU and the GPU idles between them: measured on an H200 (benchmarks/RESULTS.md),
a gated training step at 32 sequences took 31.7 ms instead of 80.3 ms; at 768 sequences the GPU
already runs ahead of the host and the graphs change nothing.

``GraphCache.run(key, fn, inputs, donated=0)``:
- first call for a ``key``: ``fn`` runs twice on a side stream (Triton compiles and autotunes,
  cuBLAS picks its algorithms), then once under capture into static buffers;
- every call: the inputs are copied into the static input buffers, the graph replays, and the
  outputs are cloned (a later replay overwrites the static outputs, and autograd may have saved
  the returned tensors for the backward). A caller may instead write an input straight into its
  buffer (``static_inputs(key)``), and at the capture donate inputs nothing else holds, which then
  become the buffers (HRM's evaluation resets its carry into them: ``HRMInner._no_grad_segment``).

``fn`` must be a pure function of its tensor inputs and of tensors whose storage stays put (module
parameters updated in place by the optimizer, buffers): the graph reads those addresses at replay.
The key must therefore name everything that changes what ``fn`` launches (shapes, dtypes, kernel
backend) and the parameters' storage (``storage_key``). No host synchronisation, no RNG and no
autocast inside (autocast caches its weight casts outside the graph). Module-level switches that
change the kernels are in HRM's key where the model owns them (``hrm.model.HRMInner._graph_key``:
the ``FUSED_*`` (``ReasoningModule.FUSED_INPUT`` among them), ``ROPE_QKV``, ``HALF_TABLES``,
``ROPE_IN_QKV`` (and ``ROPE_IN_QKV_SHORT``, ``ROPE_IN_QKV_GRAD``), ``DEFERRED_NORM``, ``HOIST_WEIGHT_CASTS``, ``SHARE_WEIGHT_LAYOUTS`` and ``PENDING_NORMS`` switches, the backward switches
``swiglu_linear.FUSED_BACKWARD`` / ``USE_GLUON`` and ``linear_swiglu.USE_TMA`` / ``USE_GLUON`` /
``GLUON_KEEPS_GATE_UP``, ``gated_blend.USE_GLUON`` / ``USE_GLUON_DPRE`` / ``USE_GLUON_MAIN`` / ``USE_GLUON_STORE``,
``rope_attention.USE_GLUON`` / ``USE_GLUON_BACKWARD`` / ``USE_GLUON_LONG`` / ``USE_GLUON_LONG_GRAD`` /
``MAX_FUSED_SEQ``); other
kernel-module ones such as ``hrm_kernels.linear_swiglu.TMA_STORES_GATE_UP`` are not and need
``graphs.clear()`` when flipped after a capture.

``GradGraphCache.run(key, fn, inputs, params)`` does the same for a function with gradients (HRM's
training segment: the calls without gradients, the last L and H calls with them, and the continue
target's pass after them, ``HRMInner._grad_calls``): its forward and its backward (``torch.autograd.grad``
of the outputs with respect to the inputs that require grad and ``params``) are captured as two
graphs sharing one private memory pool, in which the forward leaves the activations the backward
reads. A call replays the forward; autograd's backward replays the backward and hands out copies
of the gradients (the inputs' ones uncopied where the caller asks: ``copy_input_grads``). Only one
call per graph may await its backward: another forward before it (two forwards, then two
backwards) launches eagerly instead, so no saved activation is overwritten.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Hashable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module


def storage_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """What a captured graph reads of these tensors (address, dtype, shape): a graph must be
    captured again once they move or change (``module.to(...)``, parameters replaced)."""
    return tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)


# Listing a module's parameters walks its module tree (~0.3 ms for HRM, twice per training step,
# while the GPU waits for the graph's launch). Where they live (module, table, name) is kept per
# module and listed again after any parameter, buffer or submodule is registered anywhere
# (assignment included; nn.Module's global registration hooks count those events); the tensors
# themselves are read from the modules' tables at each call, so values replaced in place of the
# old ones (``_apply``: ``.to()``, ``.double()``, ``to_empty()``) are seen. Owners are held by weak
# reference: the cache keeps no module alive.
_registrations = 0
_slot_lists: "weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple, tuple]]" = weakref.WeakKeyDictionary()


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


_module.register_module_parameter_registration_hook(_count_registration)
_module.register_module_buffer_registration_hook(_count_registration)
_module.register_module_module_registration_hook(_count_registration)


def _slots(module: nn.Module) -> tuple[tuple, tuple]:
    """(weak owner, name) of ``module``'s parameters and of its buffers, in ``named_modules`` order."""
    cached = _slot_lists.get(module)
    if cached is None or cached[0] != _registrations:
        modules = list(module.modules())
        cached = (_registrations,
                  tuple((weakref.ref(m), n) for m in modules for n, t in m._parameters.items() if t is not None),
                  tuple((weakref.ref(m), n) for m in modules for n, t in m._buffers.items() if t is not None))
        _slot_lists[module] = cached
    return cached[1], cached[2]


def parameter_slots(module: nn.Module) -> tuple[tuple[nn.Module, str], ...]:
    """(owner, name) of each of ``module``'s parameters (a parameter shared by two modules twice)."""
    return tuple((ref(), n) for ref, n in _slots(module)[0])


def module_tensors(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """``module``'s parameters, then its buffers, as they are now (what a graph reads)."""
    params, buffers = _slots(module)
    return (tuple(ref()._parameters[n] for ref, n in params) + tuple(ref()._buffers[n] for ref, n in buffers))


class _Cache:
    """Graphs keyed by the caller, at most ``max_graphs`` (the oldest goes first). Not copied by
    ``copy.deepcopy`` nor pickled: a copy of a module starts with an empty cache (its graphs would
    read the original's parameters). One stream at a time: the static buffers are shared."""

    def __init__(self, max_graphs: int = 16):
        self._graphs: dict = {}
        self.max_graphs = max_graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo):
        return type(self)(self.max_graphs)

    def __reduce__(self):
        return type(self), (self.max_graphs,)

    def clear(self) -> None:
        self._graphs.clear()

    def _entry(self, key: Hashable, capture: Callable[[], object]):
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = capture()
        return entry


def _warm_up(fn: Callable[[], object]) -> None:
    """Run ``fn`` twice on a side stream (Triton compiles, cuBLAS picks its algorithms)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)


class GraphCache(_Cache):
    """CUDA graphs of gradient-free functions (module docstring)."""

    def __init__(self, max_graphs: int = 16):
        super().__init__(max_graphs)
        self._pool = None

    def run(self, key: Hashable, fn: Callable[..., Sequence[torch.Tensor]],
            inputs: Sequence[torch.Tensor], donated: int = 0) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` (a tuple of tensors) through the graph captured for ``key``. An input that
        is already its static buffer (written there through ``static_inputs``) is not copied. The
        first ``donated`` inputs are the caller's to give away (nothing else holds them, and they are
        not inference tensors): at the capture they become the static buffers themselves, no copies
        made, so the capture holds one set of these tensors fewer at its memory peak."""
        graph, static_inputs, static_outputs = self._entry(key, lambda: self._capture(fn, inputs, donated))
        with torch.no_grad():
            for static, value in zip(static_inputs, inputs):
                if value is not static:
                    static.copy_(value)
            graph.replay()
            return tuple(out.clone() for out in static_outputs)

    def static_inputs(self, key: Hashable) -> Optional[tuple[torch.Tensor, ...]]:
        """The static input buffers of ``key``'s graph (None before its capture). A caller may
        write its next inputs into them (and pass them to ``run``) instead of having ``run`` copy
        them there; they are read only while the graph replays."""
        entry = self._graphs.get(key)
        return None if entry is None else entry[1]

    def _capture(self, fn, inputs, donated: int = 0):
        # Outside inference mode (an evaluation may come first): the static buffers must stay
        # writable by later calls made under plain no_grad.
        with torch.inference_mode(False), torch.no_grad():
            for x in inputs[:donated]:
                if x.is_inference():
                    raise ValueError("GraphCache.run: a donated input is an inference tensor, which later "
                                     "calls outside inference mode could not write; allocate it under "
                                     "torch.inference_mode(False) or donate nothing")
            static_inputs = tuple(inputs[:donated]) + tuple(x.detach().clone() for x in inputs[donated:])
            _warm_up(lambda: fn(*static_inputs))
            if self._pool is None:  # one memory pool for all graphs: safe because every replay's
                # outputs are cloned at once, so no graph's static outputs are read after another's
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_outputs = tuple(fn(*static_inputs))
        return graph, static_inputs, static_outputs


@contextlib.contextmanager
def _parameters_as(slots: Sequence[tuple[nn.Module, str]], tensors: Sequence[torch.Tensor]):
    """The modules read ``tensors`` in place of their parameters inside the block."""
    originals = [m._parameters[n] for m, n in slots]
    try:
        for (m, n), t in zip(slots, tensors):
            m._parameters[n] = t
        yield
    finally:
        for (m, n), t in zip(slots, originals):
            m._parameters[n] = t


class _GradGraph:
    """One captured forward/backward pair and its static buffers.

    The graphs differentiate with respect to views of the parameters made on the capture stream,
    not the parameters themselves: autograd would otherwise synchronise with the stream of each
    parameter's gradient accumulator, which DDP creates (and keeps) on the default stream, and a
    capture must not touch that stream. The views share the parameters' storage, so replays read
    the current values; the replay's autograd node hands the gradients to the parameters that
    ``fn`` uses (``used``; the others get none, as eagerly, so DDP's unused-parameter search works)."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                 slots: Sequence[tuple[nn.Module, str]]):
        self.static_inputs = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
        params = [m._parameters[n] for m, n in slots]

        def call():
            views = [p.view_as(p) for p in params]
            with _parameters_as(slots, views):
                outputs = tuple(fn(*self.static_inputs))
            return outputs, [t for t in self.static_inputs + tuple(views) if t.requires_grad]

        def forward_backward():
            outputs, wrt = call()
            outputs = [o for o in outputs if o.requires_grad]
            torch.autograd.grad(outputs, wrt, [torch.zeros_like(o) for o in outputs], allow_unused=True)

        _warm_up(forward_backward)
        pool = torch.cuda.graph_pool_handle()  # private: the backward reads what the forward left
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool):
            outputs, wrt = call()
        self.output_needs_grad = tuple(o.requires_grad for o in outputs)
        self.static_grad_outputs = tuple(torch.zeros_like(o) if o.requires_grad else None for o in outputs)
        with torch.cuda.graph(self.backward_graph, pool=pool):
            # without retain_graph: the backward frees (and reuses) the activations it has read, so
            # each forward replay supports exactly one backward replay
            grads = torch.autograd.grad([o for o in outputs if o.requires_grad], wrt,
                                        [g for g in self.static_grad_outputs if g is not None], allow_unused=True)
        grads = iter(grads)
        grad_of = [next(grads) if t.requires_grad else None for t in tuple(inputs) + tuple(params)]
        self.used = tuple(g is not None for g in grad_of[len(inputs):])
        self.static_grads = tuple(grad_of[:len(inputs)]) + tuple(g for g in grad_of[len(inputs):] if g is not None)
        self.static_outputs = tuple(o.detach() for o in outputs)
        self.replays = 0  # forward replays so far
        self.awaiting: Optional[int] = None  # the replay whose backward may still come


class _Release:
    """Held by a replay's autograd context: once that call's graph is gone (its backward ran, or
    its outputs were dropped), the entry may replay its forward again."""

    def __init__(self, entry: _GradGraph, replay: int):
        self.entry, self.replay = entry, replay

    def __del__(self):
        if self.entry.awaiting == self.replay:
            self.entry.awaiting = None


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _GradGraph, n_inputs: int, copy_input_grads: bool, *tensors: torch.Tensor):
        ctx.copy_input_grads = copy_input_grads
        for static, value in zip(entry.static_inputs, tensors[:n_inputs]):
            static.copy_(value)
        entry.forward_graph.replay()
        entry.replays += 1
        entry.awaiting = ctx.replay = entry.replays
        ctx.entry, ctx.release = entry, _Release(entry, entry.replays)
        outputs = tuple(o.clone() for o in entry.static_outputs)  # the next replay overwrites them
        ctx.mark_non_differentiable(*(o for o, g in zip(outputs, entry.output_needs_grad) if not g))
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        entry = ctx.entry
        if entry.awaiting != ctx.replay:
            raise RuntimeError("a CUDA-graphed call was differentiated twice (backward with retain_graph=True): its "
                               "graph keeps the activations for one backward; run it with cuda_graphs=False")
        for static, grad in zip(entry.static_grad_outputs, grad_outputs):
            if static is not None:
                static.copy_(grad)
        entry.backward_graph.replay()
        entry.awaiting = None
        # copies: autograd may keep a returned gradient as .grad, which the next replay would overwrite
        # (the inputs' without ``copy_input_grads``: see GradGraphCache.run)
        n_inputs = len(entry.static_inputs)
        grads = [g if g is None or (i < n_inputs and not ctx.copy_input_grads) else g.clone()
                 for i, g in enumerate(entry.static_grads)]
        return (None, None, None, *grads)


class GradGraphCache(_Cache):
    """CUDA graphs of fixed-shape functions with gradients (module docstring): one forward and one
    backward graph per key, each key with its own memory pool (the activations stay in it). One key
    by default: a training run has one batch shape, and a pool the size of a step's activations
    should not outlive it (a new shape drops the old graphs and their memory)."""

    def __init__(self, max_graphs: int = 1):
        super().__init__(max_graphs)

    def run(self, key: Hashable, fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
            modules: Sequence[nn.Module], copy_input_grads: bool = True) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` (a tuple of tensors, differentiable in the inputs that require grad and in
        the parameters of ``modules``, all that ``fn`` reads) through the graphs of ``key``, which
        must name everything that changes what they launch, the inputs' and parameters'
        ``requires_grad`` flags included. Unlike the launched kernels, a replay's backward reads the
        parameters as they are when it runs (no version-counter check against in-place changes
        made between forward and backward), and each call supports one backward.
        ``copy_input_grads=False``: the inputs' gradients are handed to autograd as the graph's own
        buffers, not copies (one pass over each less), which the next replay of this key, forward
        or backward, may overwrite (the two graphs share one memory pool):
        only for inputs that are intermediate results of the caller's (not leaves, never passed to
        ``torch.autograd.grad`` or hooked), whose gradients the backward consumes at once."""
        slots = tuple(slot for module in modules for slot in parameter_slots(module))
        params = [m._parameters[n] for m, n in slots]
        if not any(t.requires_grad for t in (*inputs, *params)):  # nothing to differentiate
            return tuple(fn(*inputs))
        entry = self._entry(key, lambda: _GradGraph(fn, inputs, slots))
        if entry.awaiting is not None:  # an earlier call's backward may still read the activations
            return tuple(fn(*inputs))
        return _Replay.apply(entry, len(inputs), copy_input_grads, *inputs,
                             *(p for p, used in zip(params, entry.used) if used))
