# SPDX-License-Identifier: Apache-2.0
"""
The inductor compiler of the compiled losses: the step recorded as a graph of aten ops by
:func:`torch.fx.experimental.proxy_tensor.make_fx` (for :meth:`loss_and_grads`, the
forward pass *and* the gradients in one graph) and compiled to fused C++ by
:func:`torch.compile`'s inductor backend. Imports :mod:`.compile_strategy` only.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from .compile_strategy import CompiledFunction, CompileStrategy, StepOutputs

__all__ = ["InductorStrategy"]


class InductorStrategy(CompileStrategy):
    """
    Records the step with ``make_fx`` (real tensors: Python control flow is frozen as by
    :func:`torch.jit.trace`, Python reads of computed values raise) and wraps it in
    :func:`torch.compile` (``fullgraph=True``, ``dynamic=False``, ``fallback_random=True``
    so random draws use the eager random stream), which compiles at the first call per
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
                "they read a tensor's value in Python (data-dependent control flow, .item(), float(tensor)). "
                f"Use compiler='torchscript', which freezes such values, or {self.fallback}."
            ) from e
        if gradients:
            self._check_differentiated(graph, example[2 + num_params :])
        function = torch.compile(graph, fullgraph=True, dynamic=False, options={"fallback_random": True})
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
