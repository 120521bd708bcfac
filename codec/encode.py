"""``dcm.encode``: base + fine-tune checkpoints -> one .dcm file, tensors coded in parallel, one writer.

The steps (``jobs.py`` holds the per-tensor work, ``parallel.py`` where it runs):

1. choose how each fine-tune tensor is coded (``jobs.choose_action``) and let the
   method plan the matrices it wants (``Method.prepare``);
2. ``--alloc rd``-like methods measure every matrix (in the workers) and
   allocate centrally (``Method.measure``, ``Method.allocate``);
3. every tensor is coded by a job (in the workers), and the results are written
   in file order by this process, the single writer, streaming: blobs go to the
   payload file as they are accepted.

Budgets: a matrix's budget is its planned share plus its part of what earlier
matrices could not spend (``budget.Ledger``); jobs run ahead speculatively with
the budget known when they start and are run again in the rare case that an
earlier matrix's leftover changed it (unless its record did not need the budget:
``Method.holds_with_more_budget``).  Whatever the executor, thread count or
worker count, the file is the one a serial run writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from . import adapted, compute, coverage, jobs, methods
from ._version import __version__
from .checkpoint import Checkpoint
from .constants import ENCODING_MINOR, KIND_MINOR, VERSION_MAJOR, Kind
from .container import ContainerWriter
from .coverage import Coverage
from .errors import CoverageError, UsageError
from .index import check_index, pack_index
from .jobs import Action, Job
from .methods.budget import Ledger
from .parallel import make_executor, run_ordered
from .reader import base_digest


@dataclass
class EncodeReport:
    path: str
    file_bytes: int
    records: int
    params: int  # elements of the fine-tune's tensors
    finetune_bytes: int  # the fine-tune's own tensor bytes
    seconds: float
    # Seconds per phase ("plan", "allocate", "code", "write") and per tensor ("measure:NAME", "code:NAME",
    # time inside its job), for benchmarks; recoded: jobs run again after a budget changed.
    timings: dict = field(default_factory=dict)
    recoded: int = 0
    coverage: Coverage | None = None  # what a lossy method coded, and why not the rest

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / max(self.params, 1)


def _base_ref(info, sha: bytes) -> dict:
    return {"dtype": info.dtype, "shape": list(info.shape), "sha256": sha}


def _kinds(rec: dict) -> tuple:
    """The kinds a record uses: its own, and an adapted record's inner kind (the file's version covers both)."""
    return (rec["kind"], rec["params"]["inner"]) if rec["kind"] == Kind.ADAPTED else (rec["kind"],)


def format_minor(records, attachments) -> int:
    """The lowest minor version that defines every kind and blob encoding the file uses (spec 4)."""
    encodings = [b["encoding"] for r in records for b in r["blobs"]] + [a["blob"]["encoding"] for a in attachments]
    return max([0] + [KIND_MINOR[k] for r in records for k in _kinds(r)] + [ENCODING_MINOR[e] for e in encodings])


def _check_coverage(cov: Coverage) -> None:
    problems = cov.problems()
    if problems:
        lines = problems + [f"  {line}" for line in cov.reason_lines()]
        raise CoverageError("\n".join(lines) + "\nnothing was written; --allow-uncoded (allow_uncoded=True) "
                                                "writes such a file anyway")


def encode(base, finetune, out, *, method="lossless", ratio=None, include=None, exclude=None,
           options: dict | None = None, zstd_level: int | None = None, overwrite: bool = False,
           progress: bool = False, creator: str | None = None, threads: int | None = None,
           workers: int | None = None, executor=None, device: str | None = None,
           max_memory: int | None = None, allow_uncoded: bool = True,
           entropy: bool = True) -> EncodeReport:
    """Encode ``finetune`` against ``base`` (HF model dirs or .safetensors files) into ``out``.

    ``options`` are the method's own (e.g. delta-come: alloc, svd, calibration, recipe).
    ``include`` / ``exclude``: a glob or a list of globs.  The report's ``coverage``
    says what a lossy method coded; with ``allow_uncoded=False`` (the CLI's
    default) a lossy encode that codes no tensor, or whose file takes more than
    twice its budget, raises CoverageError and writes nothing.  ``entropy=False`` stores no
    blob rANS-coded (zstd or raw only: fixed-width codes a server reads without an entropy
    decoder, spec 8.2).
    ``zstd_level`` (1..22) applies to every blob; by default packed codes get 3 and the
    byte planes of exact records 1 (``methods.base.DEFAULT_PLANE_ZSTD_LEVEL``).
    Tensors are coded ``threads`` at a time in this process (default: one per core,
    at most 8), or by ``workers`` processes, or by ``executor`` (e.g.
    ``dcm.distributed.ray.RayExecutor``); ``max_memory`` bounds the estimated
    working sets of the tensors in flight.  None of these changes the file's bytes.
    ``device`` ("cpu", "cuda") is where the lossy methods' torch numerics run.
    """
    started = time.perf_counter()
    profile = methods.get_method(method, options, ratio=ratio, include=include, exclude=exclude,
                                 zstd_level=zstd_level)
    profile.entropy = bool(entropy)
    device = compute.check_device(device)
    for label, value in (("threads", threads), ("workers", workers)):
        if value is not None and (not isinstance(value, int) or value < (0 if label == "workers" else 1)):
            raise UsageError(f"{label} must be a positive integer, got {value!r}")
    timings: dict = {}
    inputs = {"base": base, "fine-tune": finetune, "calibration file": (options or {}).get("calibration")}
    with Checkpoint(base) as base_ckpt, Checkpoint(finetune) as ft_ckpt, \
            ContainerWriter(out, zstd_level=profile.zstd_level, overwrite=overwrite, inputs=inputs,
                            entropy=bool(entropy)) as writer:
        tensors = [ft_ckpt.info(n) for n in ft_ckpt.names()]
        actions = [jobs.choose_action(t, base_ckpt.info(t.name) if t.name in base_ckpt else None, profile)
                   for t in tensors]
        # the matrices the method codes: for an adapted tensor (another dtype, more rows than the base), its
        # inner record's matrix (adapted.InnerInfo), in fine-tune order
        planned = coverage.planned(profile, base_ckpt, ft_ckpt)
        profile.prepare(planned)
        executor = executor or make_executor(threads, workers)
        session = jobs.Session(os.path.abspath(base), os.path.abspath(finetune), profile, device, uuid.uuid4().hex)
        run = _Run(session, executor, base_ckpt, ft_ckpt, writer, progress, max_memory, timings)
        with compute.single_threaded() if planned else contextlib.nullcontext():
            executor.start(session)
            try:
                plans = run.plan(planned)
                enc = run.code(tensors, actions, plans)
            finally:
                executor.shutdown()
                jobs.close_session(session.token)
        records = enc.records
        for name in base_ckpt.names():
            if name not in ft_ckpt:
                info = base_ckpt.info(name)
                records.append({"name": name, "kind": int(Kind.REMOVED), "dtype": info.dtype,
                                "shape": list(info.shape), "params": {}, "blobs": [],
                                "base": _base_ref(info, base_ckpt.sha256(name))})
        config = profile.get_config()
        if profile.selection.include or profile.selection.exclude:
            config["selection"] = profile.selection.get_config()
        refs = [(r["name"], r["base"]["sha256"]) for r in records if "base" in r]
        # Checkpoint lists only files within MAX_ATTACHMENT_BYTES, refuses one that grew.
        attachments = [{"name": rel, "blob": writer.add_blob(ft_ckpt.read_attachment(rel))}
                       for rel in ft_ckpt.attachments()]
        index = {
            "format": [VERSION_MAJOR, format_minor(records, attachments)],
            "creator": creator or f"dcm {__version__}",
            "method": {"name": profile.name, "params": config},
            "base": {"digest": base_digest(refs)},
            "tensors": records,
            "attachments": attachments,
        }
        if ft_ckpt.metadata:
            index["checkpoint_metadata"] = dict(ft_ckpt.metadata)
        check_index(index)
        index_bytes = pack_index(index)
        cov = coverage.measure(profile, base_ckpt, ft_ckpt, index, writer.file_length(index, index_bytes))
        if not allow_uncoded:
            _check_coverage(cov)
        t0 = time.perf_counter()
        with _bar(progress, "write", writer.payload_bytes) as bar:
            file_bytes = writer.finish(index, index_bytes, progress=bar.update)
        timings["write"] = time.perf_counter() - t0
        kept = [r for r in records if r["kind"] != Kind.REMOVED]
        params = sum(math.prod(r["shape"]) for r in kept)
        total = sum(t.nbytes for t in tensors)
    return EncodeReport(str(out), file_bytes, len(records), params, total, time.perf_counter() - started,
                        timings, enc.recoded, cov)


PROGRESS_DELAY = 1.0  # seconds a phase must last before its bar shows


def _bar(progress: bool, desc: str, total: int, unit: str = "B"):
    """A progress bar on stderr (the caller checks it is a terminal), shown once a phase lasts a second."""
    try:  # a terminal that reports no size (some pseudo-terminals) would get an empty bar
        sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        sized = False
    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, disable=not progress,
                delay=PROGRESS_DELAY, dynamic_ncols=sized, ncols=None if sized else 100,
                nrows=None if sized else 24, leave=False, file=sys.stderr)


@dataclass
class _Coded:
    records: list
    recoded: int = 0


class _Run:
    """One encode's planning and coding over an executor; the writer stays here."""

    def __init__(self, session, executor, base_ckpt, ft_ckpt, writer, progress, max_memory, timings):
        self.session, self.executor = session, executor
        self.base_ckpt, self.ft_ckpt, self.writer = base_ckpt, ft_ckpt, writer
        self.progress, self.max_memory, self.timings = progress, max_memory, timings

    def _job(self, info, action, plan=None) -> Job:
        arrays = None
        if self.executor.streams_inputs:  # the workers cannot read the paths: send the tensors
            base = self.base_ckpt.read(info.name) if action is not Action.FULL else None
            arrays = (self.ft_ckpt.read(info.name), base)
        base_dtype = self.base_ckpt.info(info.name).dtype if info.name in self.base_ckpt else None
        return Job(info.name, info.dtype, tuple(info.shape), action, plan, arrays,
                   self._working_bytes(info, action), base_dtype)

    def _working_bytes(self, info, action) -> int:
        if action is Action.LOSSY:
            return self.session.method.working_bytes(info)
        if action is Action.ADAPTED:  # the cast base beside both tensors; the method's, if it codes the rows
            lossy = self.session.method.working_bytes(info) if self.session.method.codes_tensors() else 0
            return 3 * info.nbytes + lossy
        return 2 * info.nbytes  # byte planes and their compressed copies

    @staticmethod
    def _outsize_first(weights: list[int]) -> list[int]:
        """Submission order: tensors far above the median work (an LLM's embedding and head) first, so a
        worker is not left alone with one at the end; then file order."""
        if not weights:
            return []
        median = sorted(weights)[len(weights) // 2]
        return sorted(range(len(weights)), key=lambda i: (weights[i] <= 4 * median, i))

    def plan(self, planned) -> dict:
        """Each planned matrix's TensorPlan: measured in the workers when the method needs it."""
        method = self.session.method
        measures = {}
        if method.measures and planned:
            t0 = time.perf_counter()
            with _bar(self.progress, "plan", len(planned), unit="matrix") as bar:
                def accept(i, result):
                    measures[planned[i].name] = result.value
                    self.timings[f"measure:{result.name}"] = result.seconds
                    bar.set_postfix_str(result.name, refresh=False)
                    bar.update(1)
                    return False
                weights = [self._working_bytes(t, Action.LOSSY) for t in planned]
                run_ordered(self.executor, jobs.measure_tensor, len(planned),
                            lambda i, _: self._job(planned[i], Action.LOSSY), accept=accept,
                            working_bytes=weights.__getitem__, memory_limit=self.max_memory,
                            describe=lambda i: f"tensor {planned[i].name!r}", order=self._outsize_first(weights))
            self.timings["plan"] = time.perf_counter() - t0
            if self.progress:  # one step, no bar: say what the wait is for
                print(f"allocate: {len(planned)} matrices ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        plans = method.allocate(planned, measures)
        self.timings["allocate"] = time.perf_counter() - t0
        return plans

    def code(self, tensors, actions, plans) -> _Coded:
        method = self.session.method
        budgets = {n: p.budget for n, p in plans.items() if p.budget is not None}
        ledger = None
        if method.carries_leftover and budgets:
            ledger = Ledger(budgets, [t.name for t in tensors], {t.name: math.prod(t.shape) for t in tensors})
        out = _Coded([])
        submitted = set()

        def version(i):
            name = tensors[i].name
            return ledger.budget(name) if ledger is not None and name in ledger.plans else None

        def make(i, budget):
            info, plan = tensors[i], plans.get(tensors[i].name)
            if budget is not None:
                plan = replace(plan, budget=budget)
            if info.name in submitted:
                out.recoded += 1
            submitted.add(info.name)
            return self._job(info, actions[i], plan)

        t0 = time.perf_counter()
        with _bar(self.progress, "encode", sum(t.nbytes for t in tensors)) as bar:
            def accept(i, result):
                info = tensors[i]
                rec = {"name": info.name, "kind": result.kind, "dtype": info.dtype, "shape": list(info.shape),
                       "params": result.params, "blobs": [self.writer.add_stored(b) for b in result.blobs]}
                if result.base_sha256 is not None:
                    rec["base"] = _base_ref(self.base_ckpt.info(info.name), result.base_sha256)
                out.records.append(rec)
                self.timings[f"code:{info.name}"] = result.seconds
                bar.set_postfix_str(info.name, refresh=False)
                bar.update(info.nbytes)
                budget = version(i)  # the matrix's final budget (a reused result may have had less)
                if ledger is None or budget is None:
                    return False
                return ledger.settle(info.name, budget, result.cost(info.dtype, info.shape))

            def reusable(i, result, budget):
                # A record that did not need all of its budget is what a larger one gives too.
                return result.holds_with_more_budget and budget is not None and result.budget is not None \
                    and budget >= result.budget
            weights = [self._working_bytes(t, a) for t, a in zip(tensors, actions)]
            # What a result holds until it is written: a lossy record about its budget, an exact one
            # at most its tensor's size.
            sizes = [budgets.get(t.name, t.nbytes // 8) if a is Action.LOSSY else t.nbytes
                     for t, a in zip(tensors, actions)]
            run_ordered(self.executor, jobs.code_tensor, len(tensors), make, accept=accept, version=version,
                        working_bytes=weights.__getitem__, memory_limit=self.max_memory,
                        describe=lambda i: f"tensor {tensors[i].name!r}", order=self._outsize_first(weights),
                        result_bytes=sizes.__getitem__, reusable=reusable)
        self.timings["code"] = time.perf_counter() - t0
        return out
