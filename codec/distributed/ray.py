"""Encode on a Ray cluster: every tensor's job is a Ray task; this process plans, allocates and writes.

``dcm encode BASE FT -o OUT.dcm --ray [ADDRESS]`` or, from Python::

    from dcm.distributed.ray import RayExecutor
    dcm.encode(base, ft, out, method="delta-come", executor=RayExecutor("ray://head:10001"))

What travels:

- the encode's ``Session`` (paths, the method and its file-wide plan) is put in
  the object store once;
- per tensor, a ``jobs.Job`` (name, plan: a budget, under ``--alloc rd`` the
  chosen widths) and, back, the record's stored blobs (about the size the file
  will hold for it);
- under ``--alloc rd`` the planning tasks send back each matrix's per-vector
  costs and distortions (``allocate.Candidates``); the allocation reduces them
  here, centrally;
- the tensors themselves only with ``inputs="stream"`` (this process reads them
  and puts them in the object store); by default (``"shared"``) every node
  reads the checkpoints from the same paths (a shared file system), as it reads
  a calibration file.

Ray does placement (one CPU per task, its estimated memory as Ray's ``memory``
resource, a GPU with ``device="cuda"``), retries (a task whose worker died runs
again, ``max_retries``) and failure handling; dcm adds no scheduler of its own.
A task is a pure function of its inputs, so a retried one gives the same bytes,
and the single writer here never sees a partial result: when retries run out
the encode fails with a ``WorkerError`` and leaves no file.
"""

from __future__ import annotations

import os

from .. import compute
from ..errors import DcmError, UsageError, WorkerError


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'dcm[ray]'") from None
    return ray


def _run(fn, session, job):
    """The task: one job on one thread of a Ray worker."""
    compute.pin_one_thread()
    return fn(session, job)


class RayExecutor:
    """A ``dcm.encode`` executor whose jobs are Ray tasks.

    ``address`` is what ``ray.init`` takes: "HOST:PORT" or "ray://HOST:PORT" of a cluster,
    "auto" for the one ``ray start`` runs on this machine; None means ``RAY_ADDRESS`` if set,
    else a new Ray on this machine alone (a stale record of a stopped cluster is never
    tried).  An already initialized Ray is used as is.
    ``init`` holds further ``ray.init`` keyword arguments (e.g. ``num_cpus`` of a local one).
    """

    shared_memory = False

    def __init__(self, address: str | None = None, *, inputs: str = "shared", device: str | None = None,
                 max_retries: int = 3, init: dict | None = None):
        if inputs not in ("shared", "stream"):
            raise UsageError(f"Ray inputs must be 'shared' or 'stream', got {inputs!r}")
        self.ray = _ray()
        self.address, self.inputs, self.device = address, inputs, device
        self.streams_inputs = inputs == "stream"
        self.max_retries = max_retries
        self.init_kwargs = dict(init or {})
        self.concurrency = 1
        self._owns = False
        self._refs = {}

    def start(self, session) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            address = self.address or os.environ.get("RAY_ADDRESS") or "local"
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UsageError(f"cannot reach the Ray cluster {address}: {e}") from None
            self._owns = True
        resources = ray.cluster_resources()
        self.concurrency = max(1, int(resources.get("CPU", 1)))
        # The largest memory one node offers: a task asking for more would wait forever.
        self._node_memory = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")),
                                default=0)
        self._session = ray.put(session)
        gpus = 1 if (self.device or session.device) not in (None, "cpu") else 0
        self._remote = ray.remote(_run)
        self._options = {"num_cpus": 1, "num_gpus": gpus, "max_retries": self.max_retries,
                         "retry_exceptions": False}

    def submit(self, fn, job):
        options = dict(self._options)
        if job.working_bytes and self._node_memory:
            options["memory"] = int(min(job.working_bytes, 0.8 * self._node_memory))
        ref = self._remote.options(**options).remote(fn, self._session, job)
        future = ref.future()
        self._refs[future] = ref
        future.add_done_callback(lambda f: self._refs.pop(f, None))
        return future

    def translate(self, error: BaseException, what: str):
        """The job's own DcmError as is; a task Ray gave up on as a WorkerError."""
        exceptions = self.ray.exceptions
        cause = getattr(error, "cause", None)
        if isinstance(error, exceptions.RayTaskError) and isinstance(cause, DcmError):
            return cause
        if isinstance(error, exceptions.RayError):
            return WorkerError(f"Ray task coding {what} failed after {self.max_retries} retries: "
                               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None

    def shutdown(self) -> None:
        for ref in list(self._refs.values()):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort: the task may have finished meanwhile
                pass
        self._refs.clear()
        if self._owns:
            self.ray.shutdown()
            self._owns = False
