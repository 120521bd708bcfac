"""One tensor's work in an encode, as a plain function of picklable arguments.

This is what a thread, a worker process (``--workers``) or a Ray task
(``dcm.distributed.ray``) runs:

- ``code_tensor(session, job)``: one fine-tune tensor -> its record's kind,
  params and stored (compressed, checksummed) blobs, and the base tensor's
  sha256.  ``choose_action`` says how the tensor is coded against its base;
- ``measure_tensor(session, name)``: a method's per-matrix summary for planning
  (delta-come ``rd``: per-vector bytes and errors).

Each is a pure function of the two checkpoints' bytes, the method and the
tensor's plan, computed on one thread (``compute.single_threaded``), so which
process ran it, and what ran beside it, never changes a byte of the file.
Inputs are read by the worker from the checkpoint paths (shared storage), or
come with the job as arrays (``Job.arrays``: streamed through Ray's object store).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import adapted, blobs, compute, dtypes
from .checkpoint import STREAM_CHUNK, Checkpoint, TensorStream
from .constants import Kind
from .coverage import uncoded_reason
from .methods.base import Method, TensorPlan
from .methods.budget import record_cost
from .reader import tensor_sha256
from .records import DenseDelta, Full


# True in a worker process: the first job that computes pins this process to one thread (pool threads
# of this process are marked by compute.pin_later; the inline executor runs inside the encoder's
# compute.single_threaded()).
PIN_BEFORE_NUMERICS = False


class Action(enum.Enum):
    """How a fine-tune tensor is coded against its base."""

    FULL = "full"  # the base has no tensor of that name: stored whole
    REPLACED = "replaced"  # the base's tensor has another dtype or shape: stored whole, base recorded
    DENSE = "dense-delta"  # exact delta, streamed in chunks
    LOSSY = "lossy"  # the method's hook, on both tensors whole
    ADAPTED = "adapted"  # another float dtype or more rows than the base: an adapted record (spec 10.13)


def choose_action(ft_info, base_info, method: Method) -> Action:
    """The action for a fine-tune tensor (``base_info`` None: not in the base)."""
    if adapted.applies(ft_info, base_info):  # its inner record is the method's, or an exact dense-delta
        return Action.ADAPTED
    # coverage.uncoded_reason is the one place that decides whether the method codes a tensor.
    if uncoded_reason(method, ft_info.name, ft_info, base_info) is None:
        return Action.LOSSY
    if base_info is None:
        return Action.FULL
    if (base_info.dtype, tuple(base_info.shape)) != (ft_info.dtype, tuple(ft_info.shape)):
        return Action.REPLACED
    return Action.DENSE


@dataclass
class Session:
    """What every job of one encode shares; sent once to each worker process or Ray node."""

    base: str  # checkpoint paths, as the workers see them
    finetune: str
    method: Method
    device: str = "cpu"
    token: str = ""  # tells one encode's cached open checkpoints from another's


@dataclass
class Job:
    name: str
    dtype: str  # the fine-tune tensor's
    shape: tuple
    action: Action
    plan: TensorPlan | None = None
    arrays: tuple | None = None  # (fine-tune, base) storage arrays when streamed; else read from the paths
    working_bytes: int = 0  # estimated peak memory of the job (a scheduler may place it by this)
    base_dtype: str | None = None  # the base tensor's (an adapted record casts it to ``dtype``)

    @property
    def budget(self) -> int | None:
        return None if self.plan is None else self.plan.budget


@dataclass
class StoredBlob:
    """A blob as the file stores it: what ``ContainerWriter.add_stored`` appends."""

    encoding: int
    data: bytes
    raw_length: int
    crc32: int


@dataclass
class TensorResult:
    name: str
    kind: int
    params: dict
    blobs: list[StoredBlob]
    base_sha256: bytes | None
    budget: int | None  # the budget it was coded with (the encoder checks it against its ledger)
    holds_with_more_budget: bool = False  # a larger budget gives the same record (Method.holds_with_more_budget)
    seconds: float = 0.0  # time spent in the job, for progress and benchmarks
    worker: str = field(default="")

    @property
    def stored_bytes(self) -> int:
        return sum(len(b.data) for b in self.blobs)

    def cost(self, dtype_name: str, shape) -> int:
        """Bytes the record puts in the file, as the methods' budgets count them."""
        return record_cost(self.name, self.kind, dtype_name, shape, self.params,
                           [b.raw_length for b in self.blobs], [len(b.data) for b in self.blobs])


# --- open checkpoints, per process and thread ------------------------------------------

_open = threading.local()
_all_open: dict[str, list] = {}  # session token -> every pair opened for it, to close at the end
_lock = threading.Lock()


def _checkpoints(session: Session) -> tuple[Checkpoint, Checkpoint]:
    """(base, fine-tune) opened once per thread and encode: a worker reuses its file descriptors
    across jobs, and no two threads share one Checkpoint's bookkeeping."""
    cached = getattr(_open, "pair", None)
    if cached is not None and cached[0] == session.token:
        return cached[1], cached[2]
    pair = (Checkpoint(session.base), Checkpoint(session.finetune))
    _open.pair = (session.token, *pair)
    with _lock:
        _all_open.setdefault(session.token, []).append(pair)
    return pair


def close_session(token: str) -> None:
    """Close the checkpoints every thread of this process opened for one encode."""
    with _lock:
        pairs = _all_open.pop(token, [])
    for pair in pairs:
        for ckpt in pair:
            ckpt.close()
    cached = getattr(_open, "pair", None)
    if cached is not None and cached[0] == token:
        _open.pair = None


# --- the jobs -------------------------------------------------------------------------


def code_tensor(session: Session, job: Job) -> TensorResult:
    """Code one fine-tune tensor: its record's kind, params, stored blobs and its base's sha256."""
    started = time.perf_counter()
    with compute.on_device(session.device):
        kind, params, raws, sha = _code(session, job)
    method, stored = session.method, []
    # Byte planes (exact records) and packed codes compress best with different zstd settings.
    level = method.plane_zstd_level if kind in (Kind.DENSE_DELTA, Kind.FULL) else method.zstd_level
    for raw in raws:
        encoding, data = blobs.encode(raw, level, method.entropy)
        stored.append(StoredBlob(int(encoding), data, memoryview(raw).nbytes, blobs.crc32(data)))
    del raws
    holds = job.action is Action.LOSSY and job.plan is not None and method.holds_with_more_budget(job.plan, params)
    return TensorResult(job.name, int(kind), params, stored, sha, job.budget, holds,
                        time.perf_counter() - started, threading.current_thread().name)


def _code(session: Session, job: Job):
    """(kind, params, raw blobs, base sha256 or None) of one tensor, by its action."""
    if job.arrays is not None:
        ft, base = job.arrays
    else:
        base_ckpt, ft_ckpt = _checkpoints(session)
        ft = TensorStream(ft_ckpt, job.name)
        base = None if job.action is Action.FULL else TensorStream(base_ckpt, job.name, sha256=True)
    if job.action is Action.FULL:
        return (Kind.FULL, *Full.encode(ft), None)
    if job.action is Action.REPLACED:
        return (Kind.FULL, *Full.encode(ft), _sha256(base))
    if job.action is Action.DENSE:
        params, raws = DenseDelta.encode(ft, base)
        return Kind.DENSE_DELTA, params, raws, _sha256(base)
    if job.action is Action.ADAPTED:
        ft, base = _whole(ft), _whole(base)
        if PIN_BEFORE_NUMERICS:
            compute.pin_one_thread()
        compute.pin_if_asked()
        kind, params, raws = adapted.encode(session.method, job.name, ft, base, job.dtype, job.base_dtype, job.plan)
        return kind, params, raws, tensor_sha256(base)
    return _lossy(session, job, _whole(ft), _whole(base))


def _lossy(session: Session, job: Job, ft: np.ndarray, base: np.ndarray):
    """A tensor the method wants: its hook takes both tensors whole."""
    if PIN_BEFORE_NUMERICS:
        compute.pin_one_thread()
    compute.pin_if_asked()  # a pool thread of this process
    sha = tensor_sha256(base)
    lossy = session.method.encode_tensor(job.name, ft, base, job.dtype, job.plan)
    if lossy is not None:
        return (*lossy, sha)
    return (Kind.DENSE_DELTA, *DenseDelta.encode(ft, base), sha)


@dataclass
class Measured:
    name: str
    value: object  # what Method.measure returned
    seconds: float


def measure_tensor(session: Session, job: Job) -> Measured:
    """The method's planning summary of one matrix (``Method.measure``)."""
    started = time.perf_counter()
    if PIN_BEFORE_NUMERICS:
        compute.pin_one_thread()
    compute.pin_if_asked()  # a pool thread of this process
    with compute.on_device(session.device):
        if job.arrays is not None:
            ft, base = job.arrays
        else:
            base_ckpt, ft_ckpt = _checkpoints(session)
            ft, base = ft_ckpt.read(job.name), base_ckpt.read(job.name)
        if job.base_dtype not in (None, job.dtype) or ft.shape != base.shape:  # an adapted tensor's inner matrix
            ft, base, _ = adapted.split(ft, base, job.dtype, job.base_dtype)
        value = session.method.measure(job.name, ft, base, job.dtype)
    return Measured(job.name, value, time.perf_counter() - started)


def _whole(tensor):
    """A stream read whole into an array (hashing on the way, if it hashes), or the array itself."""
    if isinstance(tensor, np.ndarray):
        return tensor
    info = tensor.ckpt.info(tensor.name)
    array = tensor(slice(0, tensor.numel))
    return array.view(dtypes.dtype(info.dtype).storage).reshape(info.shape)


def _sha256(base) -> bytes:
    """sha256 of the base tensor (a stream not read yet is read through, in chunks)."""
    if isinstance(base, np.ndarray):
        return tensor_sha256(base)
    for start in range(base._pos, base.numel, STREAM_CHUNK):
        base(slice(start, min(start + STREAM_CHUNK, base.numel)))
    return base.digest()
