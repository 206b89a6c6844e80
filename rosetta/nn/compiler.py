"""The process-wide torch.compile settings every compiled path of Rosetta's needs (decode steps, image batches)."""

from __future__ import annotations

import functools
import logging

import torch


@functools.cache
def prepare_compiler() -> None:
    """Once per process: quiet inductor's C++ toolchain probe, which warns "No CUDA runtime is found" on CPU
    machines, and let dynamo keep a graph per model and shape. Each model (its dtype, its int8 layers' handles,
    its frozen weights) and each baked-in batch size takes cache entries of its own; past dynamo's default of 8 a
    second model would fall back to eager without a word."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(lambda r: "No CUDA runtime" not in r.getMessage())
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
