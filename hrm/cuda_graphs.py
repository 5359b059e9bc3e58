"""CUDA graphs of a fixed-shape, gradient-free function: one capture per input signature, then one
``replay()`` per call instead of hundreds of kernel launches from Python.

HRM's recurrent core runs most of each segment without gradients: all module calls but the last
L and H ones in training (4 of 6 by default: 16 blocks of about 10 kernels each), all of them in
the continue-target pass and in evaluation. A graph replays the same kernels, with the same
arguments, from one host call. Where the kernels are short (small batches) Python's launches are
slower than the GPU and the GPU idles between them: measured on an H200 (benchmarks/RESULTS.md),
a gated training step at 32 sequences took 31.7 ms instead of 80.3 ms; at 768 sequences the GPU
already runs ahead of the host and the graphs change nothing.

``GraphCache.run(key, fn, inputs)``:
- first call for a ``key``: ``fn`` runs twice on a side stream (Triton compiles and autotunes,
  cuBLAS picks its algorithms), then once under capture into static buffers;
- every call: the inputs are copied into the static input buffers, the graph replays, and the
  outputs are cloned (a later replay overwrites the static outputs, and autograd may have saved
  the returned tensors for the backward).

``fn`` must be a pure function of its tensor inputs and of tensors whose storage stays put (module
parameters updated in place by the optimizer, buffers): the graph reads those addresses at replay.
The key must therefore name everything that changes what ``fn`` launches (shapes, dtypes, kernel
backend) and the parameters' storage (``storage_key``). No host synchronisation, no RNG and no
autocast inside (autocast caches its weight casts outside the graph). Module-level switches that
change the kernels (``FUSED_NO_GRAD`` of ``hrm.layers.SwiGLUMLP``, ``Attention`` and ``Block`` are in HRM's key; others such as
``hrm_kernels.linear_swiglu.USE_TMA`` are not) need ``graphs.clear()`` when flipped after a capture.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

import torch


def storage_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """What a captured graph reads of these tensors (address, dtype, shape): a graph must be
    captured again once they move or change (``module.to(...)``, parameters replaced)."""
    return tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)


class GraphCache:
    """CUDA graphs keyed by the caller, at most ``max_graphs`` (the oldest goes first). Not copied
    by ``copy.deepcopy`` nor pickled: a copy of a module starts with an empty cache (its graphs
    would read the original's parameters). One stream at a time: the static buffers are shared."""

    def __init__(self, max_graphs: int = 16):
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple, tuple]] = {}
        self._pool = None
        self.max_graphs = max_graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo) -> "GraphCache":
        return GraphCache(self.max_graphs)

    def __reduce__(self):
        return GraphCache, (self.max_graphs,)

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, key: Hashable, fn: Callable[..., Sequence[torch.Tensor]],
            inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` (a tuple of tensors) through the graph captured for ``key``."""
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = self._capture(fn, inputs)
        graph, static_inputs, static_outputs = entry
        with torch.no_grad():
            for static, value in zip(static_inputs, inputs):
                static.copy_(value)
            graph.replay()
            return tuple(out.clone() for out in static_outputs)

    def _capture(self, fn, inputs):
        # Outside inference mode (an evaluation may come first): the static buffers must stay
        # writable by later calls made under plain no_grad.
        with torch.inference_mode(False), torch.no_grad():
            static_inputs = tuple(x.detach().clone() for x in inputs)
            side = torch.cuda.Stream(device=static_inputs[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:  # one memory pool for all graphs: safe because every replay's
                # outputs are cloned at once, so no graph's static outputs are read after another's
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_outputs = tuple(fn(*static_inputs))
        return graph, static_inputs, static_outputs
