"""The one place where megatron-core is adapted to run on CPU (gloo) when no GPU is present.

megatron-core assumes CUDA: it allocates on `torch.cuda.current_device()` or `device='cuda'`,
keeps its model-parallel RNG in CUDA generators, uses CUDA streams/events, and checks
`param.type() == 'torch.cuda.FloatTensor'` in grad clipping and the optimizers. On a CPU-only
machine we redirect exactly those calls (found by probing megatron-core 0.16.1 with torch on
CPU over gloo: GPTModel, DDP and the schedules trained at TP x PP x DP up to 2 x 2 x 2 with this
redirect, DP=2 matching DP=1's loss to the last digit):

* a `TorchFunctionMode` rewrites `device='cuda'`-style arguments to CPU, makes `Tensor.cuda()`
  a no-op and answers `Tensor.type()` with the CUDA type name megatron-core checks for;
* `torch.cuda.current_device()` answers 'cpu'; streams, events and synchronize become no-ops;
* the model-parallel RNG tracker keeps CPU generator states instead of CUDA ones;
* DeepSpeed (the second engine) is told to use its CPU accelerator.

With a GPU nothing here is active: `activate()` returns 'cuda' and changes nothing. No other
module of the project touches `torch.cuda` internals on megatron-core's behalf.

`fusion_settings` is the one place that decides which of megatron-core's fused kernels a device
runs (`transformer_engine_available` the one place that probes for Transformer Engine), and
`grouped_gemm` whether a projected network's per-expert GEMMs run as one grouped call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
from importlib import metadata

import torch
from packaging.version import Version
from torch.overrides import TorchFunctionMode

from pn_base.errors import UserError

# megatron-core versions whose CUDA-only call sites this module was tested against.
SUPPORTED_MEGATRON_CORE = (Version("0.16.1"), Version("0.17"))  # [min, max)

_active_mode: TorchFunctionMode | None = None


class UnsupportedMegatronCore(UserError):
    """An installed megatron-core outside the tested range."""


def check_megatron_core_version(version: str | None = None) -> str:
    """Fail with a clear message outside the tested megatron-core range."""
    version = version or metadata.version("megatron-core")
    low, high = SUPPORTED_MEGATRON_CORE
    if not (low <= Version(version) < high):
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is not supported: megatron-pn is tested with "
            f">={low},<{high}. Install the pinned version: pip install 'megatron-core>={low},<{high}'"
        )
    return version


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int means cuda:<int>


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core branches on 'torch.cuda.FloatTensor' & co; report the CUDA twin.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs CUDA
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: everything is synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.empty_cache = lambda: None
    # On CPU the default CPU generator plays the role of the CUDA generator.
    cuda.manual_seed = torch.manual_seed
    cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()


def transformer_engine_available() -> bool:
    """Transformer Engine is an optional GPU accelerator: never required, detected here."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def torch_compile_usable() -> bool:
    """torch.compile on GPU needs triton, which builds its launcher with a C compiler at first
    use: a bare machine without one would fail in the first fused kernel."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return compiler is not None and importlib.util.find_spec("triton") is not None


def fusion_settings(device_type: str, bf16: bool, activation_fusable: bool) -> dict:
    """TransformerConfig flags of the fused kernels this device runs, off where inexact.

    Without Transformer Engine or apex, megatron-core's fusions are `torch.compile`d
    (`jit_fuser`): worth it on GPU (given triton and a C compiler), only compile time on CPU,
    where the plain torch ops run.
    * SwiGLU / bias-GELU and bias-dropout-add: the same arithmetic in one kernel;
    * cross-entropy: the fused one returns the logits' gradient in bf16, so only for bf16 runs
      (whose logits are bf16 already); it saves the fp32 copy of the logits;
    * RoPE: megatron-core's fused kernel is Transformer Engine's;
    * masked softmax, persistent layer norm and gradient-accumulation fusion need apex or TE
      kernels (and SDPA fuses the softmax): off.
    """
    gpu = device_type == "cuda"
    te = gpu and transformer_engine_available()
    compiled = gpu and torch_compile_usable()
    return {
        "bias_activation_fusion": compiled and activation_fusable,
        "bias_dropout_fusion": compiled,
        "cross_entropy_loss_fusion": bf16 and (te or compiled),
        "cross_entropy_fusion_impl": "te" if te else "native",
        "apply_rope_fusion": te,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
    }


GROUPED_GEMM = ("auto", "grouped", "loop")  # train.pn_grouped_gemm


def grouped_gemm(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a PN linear applies its experts' matrices to their blocks of rows in one
    `torch._grouped_mm` call (train.pn_grouped_gemm) instead of one GEMM per expert: `grouped`
    and `loop` force a path (where torch has the call); `auto` groups on a GPU of compute
    capability 9.0 or more (Hopper: CUTLASS grouped kernels) in bf16. On CPU torch's grouped
    call is right in fp32 and bf16 and one MLP's forward+backward took 12-22% less than the
    loop, but a training step was no faster (2-core CPU, benchmarks/RESULTS.md, PN overhead
    2026-12-03): the loop stays, torch's private op is not worth it there. Its backward needs
    row-major gradients (`pn.layers.grouped_linear` makes them so)."""
    if mode == "loop" or not hasattr(torch, "_grouped_mm"):
        return False
    if mode == "grouped":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and _capability(device) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def grouped_gemm_fits(in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """torch._grouped_mm's layout rule (its CPU kernel checks the CUDA kernel's): the rows of
    the input, the weights and the output start on 16-byte boundaries."""
    size = torch.empty((), dtype=dtype).element_size()
    return in_features * size % 16 == 0 and out_features * size % 16 == 0


def data_workers(configured: int | None, device_type: str) -> int:
    """data.num_workers, or the device's default. On GPU, workers read ahead so the main thread
    only launches kernels. On CPU none: workers compete with compute for the cores, and taking a
    micro-batch from a worker (shared-memory tensors) took ~10x as long as reading it from the
    indexed dataset (benchmarks/input_pipeline.py, 2-core CPU)."""
    if configured is not None:
        return configured
    return 2 if device_type == "cuda" else 0


def activate() -> str:
    """Prepare megatron-core for this machine; returns the device type ('cuda' or 'cpu').

    Idempotent. On CPU the function mode stays pushed for the life of the process.
    """
    global _active_mode
    check_megatron_core_version()
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU backend (before its import)
    if _active_mode is None:
        _patch_torch_cuda()
        _patch_megatron_rng()
        _active_mode = _CudaToCpu()
        _active_mode.__enter__()
    return "cpu"


def release_cached_memory() -> None:
    """Give the memory torch's allocator caches back to the device (between the steps of a
    long-lived worker, so that the next step, or another process, finds it); nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor (routing indices) to `device` without making the host wait:
    from pinned memory, asynchronously, on CUDA; a plain copy on CPU."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def prepare_optimizer_state(optimizer) -> None:
    """Make a distributed optimizer on torch's Adam (no Apex or Transformer Engine, as on CPU)
    savable and loadable before its first step. megatron-core 0.16 keeps torch Adam's step in
    each parameter's state there (Apex and TE keep it in the param groups) and trips on it:
    DistributedOptimizer.state_dict asserts one step among the states (a fresh optimizer has
    none: no save at step 0, no load template), the parameter-state load copies every state
    key from the checkpoint's tensors, which hold no step (it travels in the param groups), and
    the step it sets is one tensor shared by every parameter, which Adam increments in place
    once per parameter.
    So: zero moments and step 0 in a fresh optimizer (what its own init_state_fn gives, plus
    the step: Adam's first update then is a fresh one's; a load overwrites them), and, when
    the parameter states are copied, each parameter its own copy of the loaded step, left out
    of the copy."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, distrib_optimizer.DistributedOptimizer):
            _give_adam_state(inner.optimizer)
            _keep_step_on_state_load(inner)


def _give_adam_state(adam) -> None:
    for group in adam.param_groups:
        for param in group["params"]:
            state = adam.state[param]
            if not state:
                state["exp_avg"] = torch.zeros_like(param.data)
                state["exp_avg_sq"] = torch.zeros_like(param.data)
                state["step"] = torch.tensor(0.0)


def _keep_step_on_state_load(inner) -> None:
    copy_states = type(inner)._set_main_param_and_optimizer_states

    def with_step(model_param, tensors):
        group, order = inner.model_param_group_index_map[model_param]
        main_param = inner.optimizer.param_groups[group]["params"][order]
        state = inner.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}  # copied onto itself: unchanged
        copy_states(inner, model_param, tensors)

    inner._set_main_param_and_optimizer_states = with_step
