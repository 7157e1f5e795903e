"""The one place that knows about devices, precision and torchrun.

A stage calls `setup()` once; it returns who this process is (rank, world size) and which
device it runs on. Under `torchrun` the process group is initialised (gloo on CPU, nccl on
CUDA); as a single process nothing distributed is touched. No other module writes `cuda`.

`wrap()` turns a model into what trains under torchrun, by `run.strategy`:
    ddp    DistributedDataParallel: a full replica per process, gradients all-reduced
    fsdp   FSDP2 `fully_shard` per transformer block and at the root: parameters, gradients
           and optimizer state sharded across processes (checkpoints via torch.distributed.checkpoint)
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from llmtrain.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def device_problem(pref: str) -> str | None:
    """Why `pref` (auto | cpu | cuda | cuda:N | mps) names no device of this machine, or None."""
    if pref == "auto":
        return None
    try:
        dev = torch.device(pref)
    except (RuntimeError, ValueError, TypeError):
        return "must be auto, cpu, cuda, cuda:N or mps"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "names a CUDA device, but CUDA is not available on this machine (use cpu or auto)"
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            return f"names CUDA device {dev.index}, but this machine has {n} (cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})"
        return None
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else "names mps, which is not available on this machine"
    return f"names a {dev.type} device, which llmtrain does not run on (use auto, cpu, cuda, cuda:N or mps)"


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    problem = device_problem(pref)
    if problem:
        raise ConfigError(f"device {pref!r} {problem}")
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _check_rank_has_gpu(dev: torch.device, local_rank: int, local_world: int) -> None:
    """torchrun gives each process of a node the GPU of its local rank: more processes than
    GPUs is a one-line error, not CUDA's 'invalid device ordinal' traceback from one rank."""
    if dev.type != "cuda":
        return
    n = torch.cuda.device_count()
    if local_world > n or dev.index >= n:
        raise ConfigError(f"run.device: {local_world} processes on this node need {local_world} CUDA devices (one each), "
                          f"but it has {n}: start at most {n} (torchrun --nproc_per_node {n}) or set run.device=cpu")


def setup(device: str = "auto", threads: int = 0) -> DistEnv:
    if threads > 0:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cpu":
        keep_freed_memory()
    else:
        malloc_choice()  # a misspelt LLMTRAIN_MALLOC is refused on any device
    if world > 1:
        _check_rank_has_gpu(dev, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))))
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a training step frees for the next step instead
    of handing it back to the kernel. By default glibc trims the top of its heap once more
    than twice its (adaptive) mmap threshold lies free there, and serves large blocks by mmap
    and munmap, so every step's activations land on fresh pages that the kernel must fault
    in and zero again: 49,000-59,000 page faults (about 200-240 MB) per bf16 step of
    nanoGPT's shape on a 2-core Xeon. With a fixed mmap threshold of 32 MB (glibc's largest)
    and no trimming the step reuses its pages (1-2 faults) and ran a median 1.35x the
    tokens/s in bf16 (1.19-1.48) and 1.26x in fp32 (0.88-1.34) over 3 alternating runs of
    bench/pretrain.py with and without LLMTRAIN_MALLOC=system. Memory freed stays with the
    process up to the step's peak, which the step reaches anyway. The stages call this on a
    CPU (`setup`); PyTorch's performance guide gets the same from jemalloc or tcmalloc by
    LD_PRELOAD. Nothing happens outside glibc (macOS, musl) or with LLMTRAIN_MALLOC=system;
    with jemalloc or tcmalloc preloaded the settings reach glibc's malloc, which then serves
    nothing, and change nothing.
    `release_freed_memory` hands the kept memory back (the pipeline does after each stage).
    -> whether glibc's mallopt took the settings ("no trimming": only above 2 GiB free)."""
    mallopt = _libc("mallopt", [ctypes.c_int, ctypes.c_int]) if malloc_choice() == "keep" else None
    if mallopt is None:  # musl's is a stub that returns 0: nothing taken
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def malloc_choice() -> str:
    """LLMTRAIN_MALLOC: 'keep' (the default) or 'system'; anything else is a one-line error."""
    choice = os.environ.get("LLMTRAIN_MALLOC", "") or "keep"
    if choice not in ("keep", "system"):
        raise ConfigError(f"LLMTRAIN_MALLOC={choice!r}: use 'keep' (the default: malloc keeps the memory a step "
                          f"frees) or 'system' (glibc's own settings)")
    return choice


def release_freed_memory() -> None:
    """Hand the memory malloc keeps back to the kernel (glibc's malloc_trim): between the
    pipeline's stages, so a run that then waits for people (--human) does not hold the last
    stage's peak. Nothing happens outside glibc."""
    trim = _libc("malloc_trim", [ctypes.c_size_t])
    if trim is not None:
        trim(0)


def _libc(name: str, argtypes: list):
    """The C library's function `name` (returning int) on Linux, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = argtypes, ctypes.c_int
    return f


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when there is one)."""
    return all_reduce_sum(x, env) / env.world if env.distributed else x


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of a tensor over all processes (itself when there is one)."""
    if env.distributed:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise largest value of a tensor over all processes."""
    if env.distributed:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA for 'bf16'; a no-op context for 'fp32'."""
    if precision == "bf16":
        if device.type == "cpu":
            _warn_slow_cpu_bf16()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_warned_bf16 = False


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX (oneDNN's bf16 kernels; elsewhere bf16 runs a slow fallback).
    What the RL stages' `auto` precisions ask."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:  # private helpers (torch >= 2.3): without them, no claim of native bf16
        return any(bool(c()) for c in checks if c is not None)
    except Exception:
        return False


def _warn_slow_cpu_bf16() -> None:
    """bf16 matmuls on a CPU without native bf16 (no AVX512-BF16/AMX) run a fallback that
    bench/pretrain.py measured 18x slower than fp32 on AVX2: say so once."""
    global _warned_bf16
    if _warned_bf16:
        return
    _warned_bf16 = True
    native = native_bf16(torch.device("cpu"))
    if not native:
        warnings.warn("this CPU has no native bf16: matmuls run a slow fallback; run.precision=fp32 is faster here",
                      stacklevel=3)


STRATEGIES = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, env: DistEnv, strategy: str = "ddp", precision: str = "fp32",
         activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module to train. One process: the model itself. ddp: a DDP wrapper around it.
    fsdp: the model, sharded in place (so build the optimizer after this call)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"run.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = activation_checkpointing
    if not env.distributed:
        return model
    if strategy == "fsdp":
        return shard(model, env, precision)
    return wrap_ddp(model, env)


def shard(model: torch.nn.Module, env: DistEnv, precision: str = "fp32") -> torch.nn.Module:
    """FSDP2: each decoder block is one all-gather unit, the rest (embeddings, norm, heads) the
    root's. With bf16, parameters are gathered in bf16 and gradients reduced in fp32."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for m in model.modules():
        if getattr(m, "shard_unit", False):  # a decoder block (model/transformer.py sets it)
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose parameters FSDP2 has sharded (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _max_over_processes(x: float) -> float:
    """The largest value of a scalar over all processes (a collective when distributed)."""
    if not tdist.is_initialized():
        return x
    t = torch.tensor([float(x)])
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def all_finished(done: bool) -> bool:
    """Whether every process is done: lets sharded models, whose every forward is a
    collective, step generation in lockstep."""
    return _max_over_processes(0.0 if done else 1.0) == 0.0


def all_max(n: int) -> int:
    """The largest of an integer over all processes (itself when not distributed)."""
    return int(_max_over_processes(n))


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def to_local_float(x) -> float:
    """A scalar that may be a DTensor (e.g. FSDP2's gradient norm) as a float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on micro-steps that are not
    the last of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
