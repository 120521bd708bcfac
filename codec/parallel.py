"""Where an encode's per-tensor jobs run, and in what order their results come back.

Executors (the encoder asks nothing else of them; Ray's is in ``dcm.distributed.ray``):

- ``InlineExecutor``: in the calling thread, one tensor at a time;
- ``ThreadExecutor``: N threads of this process (``--threads``): the numerics
  release the GIL (LAPACK, BLAS, zstd, hashing, file reads);
- ``ProcessExecutor``: N worker processes (``--workers``), started with
  ``spawn`` (no fork of a process that holds threads); each gets the encode's
  ``Session`` once and reads the checkpoints itself.

Every executor runs a job's numerics on one thread, so the bytes are the same
on all of them.  ``run_ordered`` keeps a window of jobs in flight and hands the
results back in job order, to the single writer.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable

from . import compute, jobs
from .errors import WorkerError

_SESSION = None  # a worker process's copy of the encode's Session


class InlineExecutor:
    """Runs each job when it is submitted, in the calling thread."""

    concurrency = 1
    window = 1  # nothing runs ahead: no job is ever coded twice
    shared_memory = True  # jobs see the caller's objects (a method's caches)
    streams_inputs = False

    def start(self, session) -> None:
        self.session = session

    def submit(self, fn, job) -> cf.Future:
        future = cf.Future()
        try:
            future.set_result(fn(self.session, job))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            future.set_exception(e)
        return future

    def shutdown(self) -> None:
        pass


class ThreadExecutor(InlineExecutor):
    """``threads`` threads of this process."""

    window = None

    def __init__(self, threads: int):
        self.concurrency = threads
        self._pool = None

    def start(self, session) -> None:
        self.session = session
        # Each thread pins itself before its first numerics: OpenMP's thread count is per thread
        # (compute.pin_one_thread).
        self._pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="dcm-encode",
                                           initializer=compute.pin_later)

    def submit(self, fn, job) -> cf.Future:
        return self._pool.submit(fn, self.session, job)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class ProcessExecutor:
    """``workers`` worker processes, each coding one tensor at a time on one thread."""

    shared_memory = False
    streams_inputs = False

    def __init__(self, workers: int):
        self.concurrency = workers
        self._pool = None

    def start(self, session) -> None:
        self._pool = cf.ProcessPoolExecutor(self.concurrency, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(session,))

    def submit(self, fn, job) -> cf.Future:
        return self._pool.submit(_call, fn, job)

    @staticmethod
    def translate(error: BaseException, what: str):
        if isinstance(error, cf.process.BrokenProcessPool):
            return WorkerError(f"a worker process died (killed, or out of memory?) with {what} in flight; "
                               f"nothing was written")
        return None

    def shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # An error or an interrupt: stop the workers now rather than after their current tensor.
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(session) -> None:
    global _SESSION
    _SESSION = session
    jobs.PIN_BEFORE_NUMERICS = True


def _call(fn, job):
    return fn(_SESSION, job)


def make_executor(threads: int | None = None, workers: int | None = None):
    """The executor for ``threads`` (in this process) or ``workers`` (processes); None: the default."""
    if workers:
        return ProcessExecutor(workers)
    threads = default_threads() if threads is None else threads
    return InlineExecutor() if threads <= 1 else ThreadExecutor(threads)


def default_threads() -> int:
    """One thread per usable core, at most 8 (each codes a tensor: memory grows with them)."""
    return max(1, min(compute.usable_cores(), 8))


# --- running jobs in order -------------------------------------------------------------


RESULT_BUFFER_BYTES = 2**30  # results done but not yet written (they wait for an earlier tensor)


def _holds(future, reusable, i, v) -> bool:
    """Whether a job's result may still be the one of version ``v``: running (judged when done), or done
    and ``reusable``.  A failed job is left for its turn, where its error surfaces."""
    if not future.done():
        return True
    if future.cancelled():
        return False
    if future.exception() is not None:
        return True
    return reusable(i, future.result(), v)


def run_ordered(executor, fn, count: int, make: Callable, *, accept: Callable, working_bytes: Callable,
                version: Callable | None = None, memory_limit: int | None = None, window: int | None = None,
                describe: Callable = str, order: list | None = None, result_bytes: Callable | None = None,
                buffer_limit: int = RESULT_BUFFER_BYTES, reusable: Callable | None = None) -> None:
    """Run ``fn`` on jobs 0..count-1 and call ``accept(index, result)`` in job order.

    ``version(index)`` says which version of a job must run now (e.g. the budget
    the encoder's ledger gives it once every earlier result is accepted) and
    ``make(index, version)`` builds it.  A result computed from another version
    is thrown away and its job runs again: jobs may run speculatively ahead, and
    the accepted results are those of a serial run.  ``accept`` returns True when
    what it accepted changes the versions of later jobs (stale runs are then
    resubmitted at once).  ``reusable(index, result, version)`` says when a result
    computed from another version is the one this version gives too (e.g. a record
    that did not need all of its budget): it is kept, and jobs whose version
    changed while they ran are judged once they are done instead of started again.

    Jobs start in ``order`` (default: job order; e.g. the largest first, so that
    no worker is left alone with one at the end) while at most ``window`` are
    outstanding (running, or done and not yet accepted), the ``working_bytes`` of
    those running stay within ``memory_limit``, and the ``result_bytes`` of those
    outstanding within ``buffer_limit``; the job next in line to be accepted
    starts whatever the window and the buffer say, so nothing waits on itself,
    and once the jobs running beside it leave room under ``memory_limit`` (a
    job alone always runs).
    """
    version = version or (lambda i: None)
    result_bytes = result_bytes or (lambda i: 0)
    window = window or getattr(executor, "window", None) or 4 * executor.concurrency + 16
    order = list(range(count)) if order is None else list(order)
    outstanding: dict[int, tuple[cf.Future, object]] = {}
    position = 0  # next in ``order`` to consider

    def failed(error, i):
        translate = getattr(executor, "translate", None)
        return translate(error, describe(i)) if translate is not None else None

    def submit(i):
        v = version(i)
        try:
            future = executor.submit(fn, make(i, v))
        except Exception as e:  # a pool broken by an earlier job's death refuses new work
            error = failed(e, min(outstanding, default=i))
            if error is None:
                raise
            raise error from e
        outstanding[i] = (future, v)

    def fits(i) -> bool:
        running = [j for j, (f, _) in outstanding.items() if not f.done()]
        return not running or memory_limit is None or \
            sum(working_bytes(j) for j in running) + working_bytes(i) <= memory_limit

    def admits(i) -> bool:
        if not outstanding:
            return True
        if len(outstanding) >= window:
            return False
        if sum(result_bytes(j) for j in outstanding) + result_bytes(i) > buffer_limit:
            return False
        return fits(i)

    try:
        for accepted in range(count):
            while True:
                while position < count and (order[position] in outstanding or order[position] < accepted):
                    position += 1  # already started as the head of the line
                while position < count and admits(order[position]):
                    submit(order[position])
                    position += 1
                    while position < count and order[position] in outstanding:
                        position += 1
                if accepted not in outstanding:
                    if not fits(accepted):  # the memory limit holds for the head too, once it runs alone
                        cf.wait([f for f, _ in outstanding.values() if not f.done()], return_when=cf.FIRST_COMPLETED)
                        continue
                    submit(accepted)  # the head of the line starts whatever the window and buffer say
                head, v = outstanding[accepted]
                if not head.done():
                    cf.wait([f for f, _ in outstanding.values() if not f.done()], return_when=cf.FIRST_COMPLETED)
                    continue
                try:
                    result = head.result()  # a job's error ends the run here
                except Exception as e:
                    error = failed(e, accepted)
                    if error is None:
                        raise
                    raise error from e
                if version(accepted) != v and not (reusable and reusable(accepted, result, version(accepted))):
                    submit(accepted)  # computed from a stale version, and it would differ: run it again
                    continue
                break
            del outstanding[accepted]
            if accept(accepted, result):
                for i, (future, v) in list(outstanding.items()):
                    if version(i) == v or (reusable and _holds(future, reusable, i, version(i))):
                        continue
                    future.cancel()
                    submit(i)
    finally:
        for future, _ in outstanding.values():
            future.cancel()
