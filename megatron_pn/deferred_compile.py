"""megatron-core imported without compiling anything: torch.compile deferred to the first call.

megatron-core decorates its fused kernels with torch.compile when its modules are imported
(`megatron.core.jit.jit_fuser`). Decorating imports TorchDynamo and TorchInductor: about 2.5 s of
CPU at every process start (a tiny CPU run's start-up went from 5.3 to 2.9 s), before any of
those functions is called, and most runs never call them (CPU runs, unfused configs). While
megatron.core is first imported, torch.compile is replaced by `compile_on_first_call`, which
compiles with the same options when the function is first called. torch.compile itself only
compiles at the first call, so what runs does not change, only when the compiler is imported.

`install()` (from megatron_pn/__init__.py) adds a finder for the `megatron.core` package only:
importing megatron_pn still imports neither torch nor megatron-core.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import inspect
import sys

PACKAGE = "megatron.core"


def compile_on_first_call(compile_now):
    """A torch.compile that returns, for a plain function, a wrapper compiling it (with
    `compile_now` and the same options) at its first call; anything else compiles as before."""

    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)
        return call
    return compile_later


@contextlib.contextmanager
def deferred_compile():
    """torch.compile compiles at each function's first call for the duration of the block."""
    import torch

    compile_now = torch.compile
    torch.compile = compile_on_first_call(compile_now)
    try:
        yield
    finally:
        torch.compile = compile_now


class _DeferWhileImporting(importlib.abc.MetaPathFinder):
    """Finds megatron.core as usual and runs its package import (all the submodules it
    imports) inside `deferred_compile`; gone from sys.meta_path after that one import."""

    def find_spec(self, name, path, target=None):
        if name != PACKAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_deferred(module):
            with deferred_compile():
                exec_module(module)
        spec.loader.exec_module = exec_deferred
        return spec


def install() -> None:
    if PACKAGE not in sys.modules and not any(isinstance(f, _DeferWhileImporting)
                                              for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferWhileImporting())
