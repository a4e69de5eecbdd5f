# SPDX-License-Identifier: Apache-2.0
"""
The inductor compiler of the compiled losses: the step recorded as a graph of aten ops by
:func:`torch.fx.experimental.proxy_tensor.make_fx` (for :meth:`loss_and_grads`, the
forward pass *and* the gradients in one graph) and compiled to fused C++ by
:func:`torch.compile`'s inductor backend (:func:`compile_graph`, also the fused step's).
Imports :mod:`.compile_strategy` only.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .compile_strategy import CompiledFunction, CompileStrategy, StepOutputs

__all__ = ["InductorStrategy", "compile_graph"]


#: names the decomposition table of :func:`compile_graph` in inductor's cache keys (bump it
#: when the table changes)
_CACHE_TAG = "pyro_elbo_lab.compile_graph: fallback_random, aten.bernoulli.default drawn as eager (4)"


@functools.cache
def _cache_tag_pass() -> object:
    """
    A post-grad pass that does nothing and whose ``uuid`` is :data:`_CACHE_TAG`: AOTAutograd's
    on-disk cache key leaves out the decomposition table (torch 2.13) and would serve a graph
    that a plain ``torch.compile`` decomposed; inductor's config, custom passes included, is
    in the key. (Made at the first compile: importing inductor costs seconds.)
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class CacheTag(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return _CACHE_TAG

    return CacheTag()


def _inductor_eager_random(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
    """
    The inductor backend with ``fallback_random=True`` and ``aten.bernoulli.default``
    decomposed as eager draws it (see :func:`compile_graph`).
    """
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    patches: dict = {"fallback_random": True}
    if config.post_grad_custom_post_pass is None:  # (a user's own pass is kept; it keys the cache itself)
        patches["post_grad_custom_post_pass"] = _cache_tag_pass()
    # inductor's own table, changed for the duration of this compile only: a table passed as
    # ``decompositions=`` would do the same, but AOTAutograd then bypasses its on-disk cache
    # (a warm compile of the benchmark graphs took 2-10 s instead of 0.5-0.8 s)
    with config.patch(patches):
        table = select_decomp_table()
    key = torch.ops.aten.bernoulli.default
    before = table.pop(key, None)
    table[key] = _bernoulli_as_eager
    try:
        return compile_fx(graph, example_inputs, config_patches=patches)
    finally:
        del table[key]
        if before is not None:
            table[key] = before


def _bernoulli_as_eager(p: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    ``torch.bernoulli(p)`` as eager's CPU kernel draws it: one uniform per element, in order,
    float64 for a float64 ``p`` and float32 otherwise (half precision included), compared with
    ``p`` in that dtype (torch's decomposition draws float32 uniforms for every dtype).
    """
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    uniform = torch.rand(p.size(), dtype=dtype, device=p.device, generator=generator)
    return (uniform < p.to(dtype)).to(p.dtype)


def compile_graph(function: Callable) -> Callable:
    """
    :func:`torch.compile` as the compiled losses and the fused step use it: the inductor
    backend, one graph (``fullgraph=True``), static shapes (``dynamic=False``), and random
    draws from the eager random stream, so that a compiled step draws what the uncompiled
    one draws for the same seed: ``fallback_random=True``, and ``aten.bernoulli.default``
    decomposed into ``rand(float64 for a float64 p, else float32) < p``, which is what eager's
    CPU kernel draws, in place
    of torch's ``rand(float32) < p``, which inductor applies even with ``fallback_random``
    (torch 2.13; PyTorch issue #188074) and which in float64 draws other Bernoulli samples
    than eager for the same seed. (Leaving the op undecomposed makes inductor fall back to
    the eager kernel, but its lowering then refuses the op when the environment sets ``CI``.)
    On CUDA eager's Bernoulli kernel and ``rand`` use the Philox stream differently: compiled
    Bernoulli draws there differ from eager's, as with plain ``torch.compile``.

    :param callable function: the function (a recorded graph) to compile.
    :returns: the compiled function; it compiles at its first call.
    :rtype: callable
    """
    return torch.compile(function, backend=_inductor_eager_random, fullgraph=True, dynamic=False)


class InductorStrategy(CompileStrategy):
    """
    Records the step with ``make_fx`` (real tensors: Python control flow is frozen as by
    :func:`torch.jit.trace`, Python reads of computed values raise) and wraps it in
    :func:`compile_graph` (``fullgraph=True``, ``dynamic=False``, random draws from the
    eager random stream), which compiles at the first call per
    grad mode. :meth:`loss_and_grads` gets its own graph that also returns the
    parameters' gradients, accumulated into ``.grad`` here as ``backward()`` would.
    """

    name = "inductor"

    def cache_key(self, args: tuple, mode: str) -> tuple:
        # the gradient graph apart from the forward one; torch.compile specialises on
        # strides too (a new stride pattern would recompile behind the cache, up to
        # dynamo's recompile limit)
        return (mode == "backward", tuple(a.stride() for a in args))

    def compile(self, traced: Callable, example: tuple, num_params: int, names: list, mode: str) -> CompiledFunction:
        from torch.fx.experimental.proxy_tensor import make_fx

        gradients = mode == "backward"
        found: dict = {}
        if gradients:

            def function(*inputs):
                loss, surrogate, values = traced(*inputs)
                params = inputs[2 : 2 + num_params]
                grads: tuple[torch.Tensor | None, ...] = (None,) * num_params
                if num_params and surrogate.requires_grad:
                    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
                found["index"] = [i for i, g in enumerate(grads) if g is not None]
                return (loss.detach(), values.detach()) + tuple(g for g in grads if g is not None)

        else:
            function = traced
        try:
            graph = make_fx(function)(*example)
        except RuntimeError as e:
            if "tracing tensor" not in str(e):
                raise
            raise ValueError(
                f"{self.owner}(compiler='inductor') cannot record the model and guide as a graph: "
                "they read a tensor's value in Python (data-dependent control flow, .item(), float(tensor)), "
                "or a torch function they call does (torch.nn.functional.one_hot, which OneHotCategorical's "
                "sample calls, checks the range of its input this way; Categorical records). "
                f"Use compiler='torchscript', which freezes such values, or {self.fallback}."
            ) from e
        if gradients:
            self._check_differentiated(graph, example[2 + num_params :])
        function = compile_graph(graph)
        # compiled_modes: the grad modes (True / False) it has been called, and so compiled, under
        # graph: the recorded (uncompiled) graph, which the fused training step
        # (:mod:`.fused`) compiles again together with the optimiser's update
        info: dict = {"grad_index": found.get("index"), "compiled_modes": set(), "graph": graph if gradients else None}
        return CompiledFunction(function, names, info)

    def _check_differentiated(self, graph: torch.fx.GraphModule, args: tuple) -> None:
        # the gradient graph differentiates with respect to the Pyro parameters only: a
        # tensor that needs a gradient but reaches the graph otherwise (a module not
        # registered with pyro.module, a closure tensor, an argument) would silently get
        # none, where the uncompiled loss fills its .grad
        for node in graph.graph.nodes:
            if node.op == "get_attr":
                value = getattr(graph, node.target, None)
                if torch.is_tensor(value) and value.requires_grad:
                    raise ValueError(
                        f"{self.owner}(compiler='inductor') differentiates with respect to Pyro parameters only, "
                        f"but the model or guide uses a tensor of shape {tuple(value.shape)} that requires grad "
                        "and is not in the parameter store. Register its module with pyro.module (or create it "
                        f"with pyro.param), or use {self.fallback}."
                    )
        for i, arg in enumerate(args):
            if arg.requires_grad:
                raise ValueError(
                    f"{self.owner}(compiler='inductor') differentiates with respect to Pyro parameters only, "
                    f"but positional argument {i} requires grad. Detach it, or use {self.fallback}."
                )

    def run(self, compiled: CompiledFunction, inputs: tuple, params: tuple, mode: str) -> StepOutputs:
        if mode == "backward":
            # no_grad: the gradients are outputs of the graph, not something to
            # differentiate (under grad mode AOTAutograd would also compile their backward)
            with torch.no_grad():
                (loss, values, *grads), seconds = self._call(compiled, inputs)
                for i, grad in zip(compiled.info["grad_index"], grads):
                    param = params[i]
                    if param.grad is None:
                        # a copy: the graph may return one tensor for two parameters, or an
                        # alias of a constant or an input, which must not be accumulated into
                        param.grad = grad.clone(memory_format=torch.contiguous_format)
                    else:  # accumulate, as backward() does
                        param.grad.add_(grad)
            return loss, None, values, seconds
        with torch.set_grad_enabled(mode == "differentiable" and torch.is_grad_enabled()):
            (loss, surrogate, values), seconds = self._call(compiled, inputs)
        return loss, surrogate, values, seconds

    def _call(self, compiled: CompiledFunction, inputs: tuple) -> tuple:
        """The outputs, and the seconds spent compiling (the first call per grad mode compiles)."""
        mode = torch.is_grad_enabled()
        compiled_modes = compiled.info["compiled_modes"]
        if mode in compiled_modes:
            return compiled.function(*inputs), 0.0
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # inductor's own use of torch.jit APIs that torch >= 2.9 marks deprecated
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning
                )
                out = compiled.function(*inputs)
        except Exception as e:
            if not type(e).__module__.startswith("torch._dynamo"):
                raise
            cause = getattr(e, "inner_exception", None) or e
            raise RuntimeError(
                f"{self.owner}(compiler='inductor') failed to compile the recorded step: "
                f"{type(cause).__name__}: {str(cause).strip()[:1000]} "
                "(on CPU inductor needs a working C++ compiler, on GPU Triton). "
                f"compiler='torchscript' or {self.fallback} run without compiling it."
            ) from e
        compiled_modes.add(mode)
        return out, time.perf_counter() - start
