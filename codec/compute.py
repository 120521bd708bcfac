"""How an encode computes: one thread per tensor, and the device of its torch numerics.

A file's bytes must not depend on how many threads ran.  LAPACK and BLAS
(torch's MKL, numpy's OpenBLAS) split a reduction over their threads, so the
same SVD on 1 and on 2 threads differs in the last bits, and quantization turns
that into different codes.  So the numerics of one tensor always run on one
thread (``single_threaded``), and an encode goes faster by coding several
tensors at once (threads, worker processes, Ray tasks), each on one thread.
That also keeps an encode from oversubscribing a busy machine: a pool of N
independent threads slows down in proportion when another process takes a
core, where OpenMP's spinning barriers slow down many times over.

``device`` is where the torch numerics (SVD, GPTQ, quantization) run: the CPU
(default) or a CUDA device; it is per thread, set by the encoder around each
tensor's work.
"""

from __future__ import annotations

import contextlib
import os
import threading

from .errors import UsageError

_local = threading.local()


def device() -> str:
    """The torch device of the current thread's numerics ("cpu" unless ``on_device`` says otherwise)."""
    return getattr(_local, "device", "cpu")


def is_accelerated() -> bool:
    return device() != "cpu"


def check_device(name: str | None) -> str:
    """A device name the encoder can use ("cpu", "cuda", "cuda:N"), or a UsageError saying why not."""
    name = "cpu" if name is None else str(name)
    if name == "cpu":
        return name
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UsageError(f"device {name!r}: use cpu, cuda or cuda:N")
    try:
        import torch
    except ImportError:
        raise UsageError(f"device {name!r} needs torch (pip install 'dcm[runtime]')") from None
    if not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: torch sees no CUDA device")
    if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA devices")
    return name


@contextlib.contextmanager
def on_device(name: str | None):
    """Run this thread's numerics on ``name`` (full float32 precision: no TF32 on a GPU)."""
    previous = device()
    _local.device = name or "cpu"
    restore = None
    if _local.device != "cpu":
        import torch
        restore = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        _local.device = previous
        if restore is not None:
            import torch
            torch.set_float32_matmul_precision(restore)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_thread = threading.local()


def pin_one_thread() -> None:
    """One thread for torch, MKL, OpenMP and OpenBLAS in the calling thread, for good.

    For a worker process before its first numerics (a lossless worker never
    imports torch), and for each thread of a pool: OpenMP keeps its thread count
    per thread, and a new thread starts from the default (one per core) whatever
    another thread set.
    """
    if getattr(_thread, "pinned", False):
        return
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    _thread.pinned = True


def pin_later() -> None:
    """Mark the calling thread (a pool thread's initializer) to ``pin_one_thread`` before its first numerics:
    pinning imports torch, which a lossless encode never needs (~200 MB of memory, seconds of start-up)."""
    _thread.pin_later = True


def pin_if_asked() -> None:
    """``pin_one_thread`` in a thread ``pin_later`` marked; nothing elsewhere."""
    if getattr(_thread, "pin_later", False):
        pin_one_thread()


@contextlib.contextmanager
def single_threaded():
    """``pin_one_thread`` for the duration of the block; the previous thread counts come back after."""
    from threadpoolctl import threadpool_limits

    torch = _torch()
    previous = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(1):
            if torch is not None:
                torch.set_num_threads(1)
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(previous)


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None
