"""The plumbing of vqvae.py, kept apart from the method: devices, processes and stop signals, collectives across
data-parallel ranks (every one a no-op in a single process), fast tensor kernels (CPU-aware chunking, tiled nearest
code, row argmax and top-k, scatter sums), configs (YAML files, dataclass fields checked and extended, modules
imported by name or path), crash-safe file writes, the code's provenance, image figures and the CIFAR-10 download,
and the one place metrics are written (metrics.jsonl and W&B).
Imports nothing of the project. Its import does one thing: it puts the cuBLAS workspace setting that --deterministic
needs in force before any CUDA work (see set_deterministic).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml


class UserError(Exception):
    """A mistake in the user's input (config, flags, files): reported as one line, exit code 2."""


# ################################################################################################################
# Devices and processes
# ################################################################################################################

def pick_device(name: str = "auto") -> torch.device:
    """The device `name` names (auto: MPS > CUDA > CPU), or UserError, naming the fix, when it is not on this
    machine: a run must stop before it writes anything, not at its first CUDA call."""
    if name == "auto":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                            f"use --device cpu")
        if device.index is not None and device.index >= n:
            raise UserError(f"--device {name}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: training runs on cpu, cuda or mps")
    return device


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the workspace settings under which cuBLAS GEMMs repeat bit for bit
# cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at the process's first GEMM, so --deterministic cannot set it when a run
# starts: a notebook, the test suite or a sweep may have run a GEMM before. It is set here, when the project is
# imported, before the project does any CUDA work (:4096:8 is cuBLAS's own size on H100/H200, ~24 MiB more elsewhere)
_CUBLAS_BEFORE_IMPORT = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
# the setting cuBLAS starts with, as far as can be told: the one before this import if CUDA was already at work
_CUBLAS_AT_START = _CUBLAS_BEFORE_IMPORT if torch.cuda.is_initialized() else os.environ["CUBLAS_WORKSPACE_CONFIG"]


def set_deterministic(on: bool):
    """Deterministic algorithms (the index/scatter ops the quantizers use, index_add_ and index_put_ among them,
    switch to their deterministic CUDA versions), cuDNN deterministic, and the cuBLAS workspace setting CUDA needs
    for repeatable GEMMs. That setting takes effect only if it was in place at the process's first GEMM (see
    above): UserError, naming the fix, when CUDA may have started without it."""
    if on:
        config, cuda_started = os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.cuda.is_initialized()
        if config is None and not cuda_started:
            config = os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
        late = cuda_started and config != _CUBLAS_AT_START  # cuBLAS may hold another setting than the current one
        if config not in CUBLAS_DETERMINISTIC or late:
            raise UserError(f"--deterministic needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC[0]} in force from "
                            f"the process's first GEMM (cuBLAS reads it once); it is {config or 'unset'}"
                            + (" and CUDA may have started without it" if late else "")
                            + f": start Python with CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC[0]}, or import "
                              f"the project before any CUDA work")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on




def denormals_flushed() -> bool:
    """Whether this thread's CPU float arithmetic flushes subnormals to zero (a probe: 1e-39 x 1 reads 0)."""
    return torch.tensor(1e-39).mul(1.0).item() == 0.0


def compile_model(model: nn.Module, device: torch.device, backend: str = "inductor") -> bool:
    """torch.compile the whole model in place, quantizer included (state_dict keys unchanged): Dynamo traces the
    quantizer's custom autograd functions and unrolls its chunk loops; the graph breaks only where a shape depends
    on data (BA's columns whose Q underflows) and at the first step's k-means, and runs those parts eagerly. Where
    compiling is unsupported (no C++ compiler or Triton, a Python Dynamo does not support) warns and returns False."""
    try:
        # compilation is lazy: a trivial function compiled and run now finds a missing backend before training
        torch.compile(lambda t: t * 2 + 1, backend=backend)(torch.ones(8, device=device))
        model.compile(backend=backend)
    except Exception as err:
        warnings.warn(f"torch.compile unavailable on {device.type} ({type(err).__name__}: {err}); running eagerly")
        return False
    return True


def device_description(device: torch.device) -> str:
    """The device and, for a GPU, its name: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'cpu'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of --precision (auto: bf16 on CUDA, else none)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LatestOnHost:
    """The latest value of a device scalar that has reached the host, read without making the host wait.

    Each call hands in this step's value t (a 0-d tensor). On a single GPU, outside deterministic mode, a call
    starts a copy of t to pinned host memory and records an event behind it, unless a copy is still in flight, and
    returns the newest value whose copy has finished: a step or so old, the first call's own (which waits). Elsewhere
    it returns float(t): on the CPU reading costs no sync; several ranks must decide alike; under
    torch.use_deterministic_algorithms a run, and its resume, must not depend on timing; and in a compiled model the
    read is a graph break, where copies and events would not keep their order.
    """
    LAGGED_DEVICES = ("cuda",)
    Event = torch.cuda.Event

    def __init__(self):
        self._pending = None  # (host copy, event) in flight
        self._value: Optional[float] = None

    def __call__(self, t: torch.Tensor) -> float:
        if (torch.compiler.is_compiling() or t.device.type not in self.LAGGED_DEVICES or world_size() > 1
                or torch.are_deterministic_algorithms_enabled()):
            return float(t)
        if self._pending is not None and self._pending[1].query():
            self._value, self._pending = float(self._pending[0]), None
        if self._pending is None:
            host = torch.empty((), dtype=t.dtype, pin_memory=t.is_cuda).copy_(t, non_blocking=True)
            event = self.Event()
            event.record()
            self._pending = (host, event)
            if self._value is None:  # the first call
                event.synchronize()
                self._value, self._pending = float(host), None
        return self._value


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints, and exits 130/143."""

    def __init__(self):
        self.requested, self.signum, self._old = False, None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; under torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)
    the process group is started here: gloo for CPU tensors, and NCCL for CUDA tensors where CUDA is present."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and dist.is_nccl_available()
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp_device(name: str, rank: int) -> torch.device:
    """One device per process: cuda:LOCAL_RANK when CUDA is asked for (or auto and present), else the CPU. Every
    process checks that the machine has a GPU for each of its processes, so all stop alike before writing."""
    name = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        pick_device("cuda")  # CUDA present at all
        gpus, procs = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        if procs > gpus:
            raise UserError(f"torchrun started {procs} processes on this machine, which has {gpus} GPU(s): use "
                            f"--nproc_per_node={gpus} or fewer (one process per GPU), or --device cpu to run the "
                            f"processes on the CPU (gloo)")
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    if name != "cpu":
        raise UserError(f"multi-process training runs on CUDA or the CPU, not on {name}")
    return torch.device("cpu")


def ddp_wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """find_unused_parameters: some parameters may get no gradient in a step (DDP then finds them each step; those
    unused on every rank keep grad None)."""
    ddp = nn.parallel.DistributedDataParallel
    # CPU conv backward gives 1x1 weights' grads other (equivalent) strides than DDP's buckets: one copy, no harm
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # buffers are not synced each forward: every rank derives the same codebook from statistics summed over ranks
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"  # the older name
    return ddp(model, device_ids=[device] if device.type == "cuda" else None, **{no_sync: False},
               gradient_as_bucket_view=True, find_unused_parameters=find_unused_parameters)


# ################################################################################################################
# Collectives (the rows of every rank: sums, gathers, random draws that agree)
# ################################################################################################################

def dist_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over data-parallel ranks in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


_rank_local_depth = 0


@contextlib.contextmanager
def rank_local():
    """Quantizers reduce nothing across ranks inside this block: for a forward that only some ranks run
    (rank 0's reconstruction image), which would otherwise wait forever on the others."""
    global _rank_local_depth
    _rank_local_depth += 1
    try:
        yield
    finally:
        _rank_local_depth -= 1


def world_size() -> int:
    if _rank_local_depth or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def gather_rows(e: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order: the global batch (training shards are equal in size)."""
    if world_size() == 1:
        return e
    parts = [torch.empty_like(e) for _ in range(world_size())]
    dist.all_gather(parts, e.contiguous())
    return torch.cat(parts)


def random_rows(e: torch.Tensor, n: int) -> torch.Tensor:
    """n rows drawn uniformly (with replacement) from the global batch, the same rows on every rank and the same
    draw one process holding the whole batch would make. Only the n picked rows cross ranks, not the batch."""
    if world_size() == 1:
        return e[torch.randint(len(e), (n,), device=e.device)]
    rows = torch.randint(len(e) * world_size(), (n,), device=e.device)  # same RNG state on every rank
    mine = rows // len(e) == dist.get_rank()  # (n,); a where, not a masked write, whose length would need a sync
    return dist_sum_(torch.where(mine[:, None], e[rows % len(e)], 0.0))


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value everywhere, so random decisions (k-means) agree across ranks."""
    if world_size() > 1:
        t = t.contiguous()
        dist.broadcast(t, 0)
    return t


def dist_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """log sum over ranks of exp(lse), per column, shifted by the column max so nothing underflows."""
    if world_size() == 1:
        return lse
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return dist_sum_((lse - m).exp()).log() + m


def log_total_rows(n: int, device) -> float | torch.Tensor:
    """log of the number of rows on all ranks, this rank holding n (a rank's slice of a ragged batch may be empty)."""
    if world_size() == 1:
        return math.log(n)
    return dist_sum_(torch.full((), float(n), device=device)).log()  # a fill: torch.tensor would copy and wait


# ################################################################################################################
# Fast kernels (CPU-aware chunking, tiled nearest code, row argmax and top-k, scatter sums)
# ################################################################################################################


def scatter_sum(idx: torch.Tensor, e: torch.Tensor, K: int) -> torch.Tensor:
    """sums[k] = sum of rows e[n] with idx[n] == k, (K, D), in O(N D) with no (N, K) one-hot.

    On CPU: a stable sort then a segment sum, which is deterministic (index_put_'s accumulate uses atomic adds
    whose order varies run to run, and index_add_ is serial and several times slower). Elsewhere: index_add_.
    """
    if e.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: no data-dependent segment lengths
        return torch.zeros(K, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, idx, e)
    order = idx.argsort(stable=True)
    return torch.segment_reduce(e[order], "sum", lengths=torch.bincount(idx, minlength=K), axis=0)


CPU_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per (rows, K) block
GPU_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 per (rows, K) block


def chunk_rows(chunk: int, K: int, device: torch.device) -> int:
    """Rows per (rows, K) block: `chunk`, capped by a memory budget per block. On CPU CPU_CHUNK_ELEMENTS: glibc
    serves blocks of 32 MiB and more by fresh mmaps whose page faults cost as much as the arithmetic (and such blocks
    miss the caches); smaller ones are reused. Elsewhere GPU_CHUNK_ELEMENTS: the caching allocator has no such cost
    and bigger blocks mean fewer launches, but a BA step holds a few blocks at once (4,096 rows at K = 65,536 would be
    1 GiB each)."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, min(chunk, budget // K))


def with_ones(e):
    return torch.cat([e, torch.ones_like(e[:, :1])], 1)  # (N, D+1)


CPU_TILE = 1024  # nearest-code search on CPU: (1024 rows, 1024 codes) score tiles, 4 MiB, stay in cache


def nearest_code(e: torch.Tensor, C: torch.Tensor, chunk: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmin_k ||e_n - c_k||^2 for each row of e (the first such k), never holding more than (chunk, K) scores.
    With `bias` (K,): argmax_k 2 e.c_k - ||c_k||^2 + bias_k, i.e. argmin_k ||e_n - c_k||^2 - bias_k.

    On CPU the search is tiled over codes as well, keeping a running best per row: a whole (rows, K) block
    either leaves the cache (K large, rows many) or makes a GEMM too thin to run fast (K large, rows few);
    at K = 65,536 tiling halves the time.
    """
    N, K = len(e), len(C)
    # elsewhere one GEMM and one argmax per block of rows, as many rows as the memory budget allows
    rows, tile = (min(chunk, CPU_TILE), CPU_TILE) if e.device.type == "cpu" else (chunk_rows(chunk, K, e.device), K)
    # [e, 1] W^T = 2 e.c - ||c||^2 = ||e||^2 - ||e - c||^2: the nearest code has the largest score, one GEMM
    W = with_ones(2.0 * C)
    W[:, -1] = -(C * C).sum(1) if bias is None else bias - (C * C).sum(1)  # bias (K,): a MAP prior term
    e1 = with_ones(e)
    idx = torch.empty(N, dtype=torch.long, device=e.device)
    for s in range(0, N, rows):
        best, arg = row_argmax(e1[s:s + rows] @ W[:tile].t())
        for k in range(tile, K, tile):
            score, i = row_argmax(e1[s:s + rows] @ W[k:k + tile].t())
            better = score > best  # strict: on a tie the earlier tile, so the first index, wins
            best, arg = torch.where(better, score, best), torch.where(better, i + k, arg)
        idx[s:s + rows] = arg
    return idx


ARGMAX_BLOCK = 64


def row_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of the first max) of each row of x (R, K), as x.max(1).

    On CPU torch's arg-reductions are not vectorised (about 15x slower than amax), so: the max of each block of
    ARGMAX_BLOCK columns (vectorised), the first block holding the row max, then argmax within that block only.
    """
    R, K = x.shape
    if x.device.type != "cpu" or K % ARGMAX_BLOCK or K == ARGMAX_BLOCK:
        return x.max(1)
    blocks = x.reshape(R, K // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best, j = blocks.amax(2).max(1)
    inner = blocks[torch.arange(R, device=x.device), j].argmax(1)
    return best, j * ARGMAX_BLOCK + inner


TOPK_BLOCK = 64  # row_topk's block of columns


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=1) (values and indices, largest first) of x (R, K). On CPU torch's topk over a long row costs
    ~10 times an amax, so: the max of each block of TOPK_BLOCK columns (vectorised), the k blocks with the largest
    maxima (they hold the k largest entries: any other block's entries are at most its max, which is at most the
    k-th largest block max, which is at most the k-th largest entry), then topk over those k blocks' entries."""
    R, K = x.shape
    if x.device.type != "cpu" or K % TOPK_BLOCK or K // TOPK_BLOCK <= k:
        return x.topk(k, dim=1)
    blocks = x.view(R, K // TOPK_BLOCK, TOPK_BLOCK)
    best = blocks.amax(2).topk(k, dim=1).indices  # (R, k)
    cand = blocks.gather(1, best[:, :, None].expand(R, k, TOPK_BLOCK)).view(R, k * TOPK_BLOCK)
    values, j = cand.topk(k, dim=1)
    return values, best.gather(1, j // TOPK_BLOCK) * TOPK_BLOCK + j % TOPK_BLOCK


# ################################################################################################################
# Configs and modules (YAML files, dataclass fields checked and extended, imports by name or path)
# ################################################################################################################

def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def check_field_types(obj) -> None:
    """Each field of the dataclass instance `obj` against its annotation (None, bool, int, float, str, Literal, and
    unions of them), as read from YAML or flags: a UserError names the field and what it takes. An int where a float
    is asked for becomes that float, and so does a string YAML 1.1 left unparsed (1e-4, without a dot)."""
    hints = typing.get_type_hints(type(obj))
    for name, hint in hints.items():
        value = getattr(obj, name)
        allowed = [a for a in typing.get_args(hint)] if typing.get_origin(hint) in (typing.Union,) else [hint]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise UserError(f"{name} must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
            continue
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
                setattr(obj, name, value)
            except ValueError:
                pass
        ok = any((a is type(None) and value is None)
                 or (a is float and isinstance(value, (int, float)) and not isinstance(value, bool))
                 or (a is int and isinstance(value, int) and not isinstance(value, bool))
                 or (a in (str, bool) and isinstance(value, a)) for a in allowed)
        if not ok:
            want = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise UserError(f"{name} must be {want}, got {value!r}")
        if float in allowed and isinstance(value, int):
            setattr(obj, name, float(value))


def extend_dataclass(cls: type, new: dict[str, dataclasses.Field], hints: dict) -> None:
    """The dataclass `cls` rebuilt in place with the `new` fields after its own (their types in `hints`), so every
    module that imported the class sees them."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__match_args__"):  # dataclass() keeps what exists
        if name in cls.__dict__:
            delattr(cls, name)
    cls.__annotations__.update({name: hints[name] for name in new})
    for name, f in {**known, **new}.items():  # dataclass() reads each field's declaration from the class
        setattr(cls, name, f)
    dataclasses.dataclass(cls)


_IMPORTED: set[str] = set()  # the entries of `imports` done in this process


def import_modules(imports: str) -> None:
    """Import each module of a comma-separated list, a module name or a .py file relative to the working
    directory, so the quantizers and options it registers are known (once per entry and process)."""
    if not isinstance(imports, str):
        raise UserError(f"imports must be a comma-separated str of modules, got {imports!r}")
    for item in [s.strip() for s in imports.split(",") if s.strip() and s.strip() not in _IMPORTED]:
        if item.endswith(".py"):
            _import_file(Path(item))
        else:
            sys.path.insert(0, str(Path.cwd()))  # a module name, found from the working directory first
            try:
                importlib.import_module(item)
            except ModuleNotFoundError as err:
                if err.name not in (item, item.split(".")[0]):  # a module the user's module imports
                    raise
                raise UserError(f"imports: no module {item} (nor {item}.py in {Path.cwd()})") from None
            finally:
                sys.path.remove(str(Path.cwd()))
        _IMPORTED.add(item)


def _import_file(path: Path):
    """The .py file as the module named by its stem (where dataclasses and pickle look it up)."""
    if not path.is_file():
        raise UserError(f"imports: no file {path} (relative to {Path.cwd()})")
    loaded = sys.modules.get(path.stem)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", None) or "").resolve() != path.resolve():
            raise UserError(f"imports: {path}: a module named {path.stem} is imported already; rename the file")
        return
    spec = importlib.util.spec_from_file_location(path.stem, path)
    sys.modules[path.stem] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise


# ################################################################################################################
# Files (a crash never leaves a partial file), provenance, figures, the download
# ################################################################################################################

def atomic_write(path: Path, write) -> Path:
    """Write via a temporary file in the same folder, fsync, then rename: a crash, or a second process writing the
    same file, never leaves a partial one. The file gets the permissions open() would give it (mkstemp's are 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced
    return path


def git_state(folder: Path) -> dict:
    """{"commit": HEAD of the git checkout holding `folder`, "dirty": whether its tracked files differ from HEAD};
    {"commit": "unknown", "dirty": None} outside a checkout or without git."""
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        head = status = None
    if head is None or head.returncode != 0:
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance(repo: Path, device: torch.device, amp_dtype: Optional[torch.dtype], processes: int) -> dict:
    """What a run's records came from (provenance.json): the commit of the code in `repo` and whether its tracked
    files differed from it ("unknown" outside a git checkout), torch, the device, the nets' precision, the processes,
    and whether CPU arithmetic flushed subnormals to zero."""
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return {**git_state(repo), "torch": torch.__version__, "device": device_description(device),
            "precision": precision, "processes": processes, "denormals_flushed": denormals_flushed()}


def download_cifar10(data_dir: Path) -> Path:
    """torchvision's download into data_dir. On failure, every folder it created is removed again (a failed run
    leaves nothing behind) and the message says what was looked for."""
    import torchvision
    created = [p for p in [data_dir, *data_dir.parents] if not p.exists()]
    present = set(data_dir.iterdir()) if data_dir.is_dir() else set()
    try:
        torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
    except Exception as err:  # no network, proxy, disk: all end the same way for the user
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)  # the outermost folder this call created
        else:  # data_dir existed: only what the download added goes
            for path in set(data_dir.iterdir()) - present:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise UserError(f"no CIFAR-10 batches in {data_dir} and downloading them failed ({type(err).__name__}); "
                        f"point --data_dir at a folder holding cifar-10-batches-py, or use --dataset cifar10-sample"
                        ) from None
    return data_dir / "cifar-10-batches-py"


def save_image_rows(rows: list[tuple[torch.Tensor, str]], path: Path, title: str = ""):
    """A PNG of image rows, each (images (n, 3, H, W) in [-1, 1], its label), one image per column."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    n = max(len(images) for images, _ in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n + 0.9, 1.5 * len(rows)), squeeze=False)
    for row, (images, label) in enumerate(rows):
        for ax, img in zip(axes[row], images):
            ax.imshow((img * 0.5 + 0.5).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ################################################################################################################
# Logging and W&B
# ################################################################################################################


class Logger:
    """The one place metrics are written: metrics.jsonl (every record) and W&B when enabled."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb: Optional[dict] = None):
        """wandb: None (off), or the run's W&B {"project", "name", "config"}."""
        self.path, self.enabled, self.wandb_run = run_dir / "metrics.jsonl", enabled, None
        if enabled and wandb is not None:
            self.wandb_run = _init_wandb(run_dir, **wandb)

    def log(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def truncate_after(self, step: int):
        """Drop records written after `step` (a resumed run replays them), and a line cut short by a kill."""
        if self.enabled and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if _record_step(ln) <= step]
            atomic_write(self.path, lambda fh: fh.write("".join(ln + "\n" for ln in keep).encode()))

    def finish(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # the partial last line of a killed run
        return math.inf


def _init_wandb(run_dir: Path, project: str, name: str, config: dict):
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; logging to metrics.jsonl only (--no_wandb silences this)")
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
        mode = "offline"
        print("W&B: not logged in, logging offline into the run folder (`wandb login`, then `wandb sync`)")
    try:
        return wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode, resume="allow",
                          id=_wandb_id(run_dir))
    except Exception as err:  # W&B trouble must never cost a run
        print(f"W&B unavailable ({type(err).__name__}: {err}); logging to metrics.jsonl only")
        return None


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        path.write_text(f"{run_dir.name[:40]}-{os.urandom(4).hex()}")
    return path.read_text().strip()
