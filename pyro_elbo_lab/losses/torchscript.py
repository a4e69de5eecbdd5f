# SPDX-License-Identifier: Apache-2.0
"""
The TorchScript compiler of the compiled losses: :func:`torch.jit.trace` of the step, as
Pyro's :class:`~pyro.infer.JitTrace_ELBO`; gradients by autograd through the traced graph.
Imports :mod:`.compile_strategy` only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .compile_strategy import CompiledFunction, CompileStrategy, StepOutputs

__all__ = ["TorchScriptStrategy"]


class TorchScriptStrategy(CompileStrategy):
    """
    Traces the step with :func:`torch.jit.trace` (``check_trace=False`` unless
    ``jit_options`` says otherwise) and runs it through TorchScript's executor. Compiles in
    about a second; one function serves every entry point and grad mode.
    """

    name = "torchscript"

    #: graphs up to this many nodes run through TorchScript's optimising (profiling)
    #: executor, which builds one differentiable graph (faster backward) after two
    #: profiling runs; larger ones, such as many unrolled sequential particles, run as
    #: recorded, because optimising a graph of 30 000 nodes (64 particles of eight schools)
    #: takes minutes
    optimize_max_nodes: int = 5000

    def compile(self, traced: Callable, example: tuple, num_params: int, names: list, mode: str) -> CompiledFunction:
        options = dict(self.jit_options)
        options.setdefault("check_trace", False)
        with warnings.catch_warnings():
            # torch >= 2.9 marks torch.jit as deprecated; tracing is still the fastest stable
            # way to remove Pyro's per-step Python overhead at a compile cost of about a second
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.trace.* is deprecated", category=DeprecationWarning
            )
            function = torch.jit.trace(traced, example, **options)
        optimize = sum(1 for _ in function.graph.nodes()) <= self.optimize_max_nodes
        return CompiledFunction(function, names, {"optimize": optimize})

    def run(self, compiled: CompiledFunction, inputs: tuple, params: tuple, mode: str) -> StepOutputs:
        with torch.jit.optimized_execution(compiled.info["optimize"]):
            loss, surrogate, values = compiled.function(*inputs)
        return loss, surrogate, values, 0.0
