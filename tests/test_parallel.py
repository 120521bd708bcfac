"""Parallel encoding: the same bytes from every executor, thread count and worker count; the ledger of
leftover budget and its speculative re-coding; worker failures; the memory of --workers."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import storage, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import dcm
from dcm import cli, compute, jobs, methods
from dcm.errors import UsageError, WorkerError
from dcm.methods.budget import CARRY_MIN_SHARE, Ledger
from dcm.methods.deltacome import DeltaCoMe, RdPlan
from dcm.parallel import InlineExecutor, run_ordered

ROOT = Path(__file__).resolve().parent.parent


def lowrank(rng, m, n, decay=1.0, scale=0.01):
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return ((u * (scale * np.arange(1, k + 1) ** -decay)) @ v.T).astype(np.float32)


def pair_tensors(seed=0):
    """Matrices of several shapes (tall, wide, bf16, one with no delta at all), vectors, a new, a removed
    and a re-typed tensor: every action, and a leftover the ledger passes on."""
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (m, n), dt in [("a.weight", (96, 64), "F32"), ("b.weight", (40, 120), "F32"),
                             ("c.weight", (200, 24), "BF16"), ("d.weight", (64, 64), "F32"),
                             ("e.weight", (48, 80), "F16"), ("f.weight", (128, 96), "F32")]:
        w = (0.05 * rng.standard_normal((m, n))).astype(np.float32)
        d = lowrank(rng, m, n) if name != "d.weight" else np.zeros((m, n), np.float32)
        if dt == "F16":
            base[name], ft[name] = (dt, w.astype(np.float16)), (dt, (w + d).astype(np.float16))
        else:
            base[name], ft[name] = (dt, storage(dt, w)), (dt, storage(dt, w + d))
    for i in range(3):
        v = rng.standard_normal(64).astype(np.float32)
        base[f"n{i}.bias"], ft[f"n{i}.bias"] = ("F32", v), ("F32", v + np.float32(1e-3))
    base["gone"] = ("I64", np.arange(5, dtype=np.int64))
    base["retyped"] = ("F16", np.ones(8, np.float16))
    ft["retyped"] = ("F32", np.ones(8, np.float32))
    ft["new"] = ("F32", rng.standard_normal((4, 4)).astype(np.float32))
    return base, ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, ft = pair_tensors()
    return write_checkpoint(root / "base", base), write_checkpoint(root / "ft", ft)


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """Calibration statistics for every matrix (GPTQ runs numpy BLAS: the thread pinning must hold it)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    tensors = {}
    for name, n in [("a.weight", 64), ("b.weight", 120), ("c.weight", 24), ("d.weight", 64), ("e.weight", 80),
                    ("f.weight", 96)]:
        x = rng.standard_normal((4 * n, n))
        tensors[name] = (x.T @ x / len(x)).astype(np.float32)
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    save_file(tensors, str(path), metadata={"format": "dcm-calibration", "version": "1", "tokens": "512"})
    return str(path)


CASES = {
    "lossless": ("lossless", None, {}),
    "recipe": ("delta-come", "1/8", {"alloc": "recipe"}),
    "recipe-randomized": ("delta-come", "1/8", {"alloc": "recipe", "svd": "randomized"}),
    "rd": ("delta-come", "1/8", {"alloc": "rd"}),
    "rd-randomized": ("delta-come", "1/8", {"alloc": "rd", "svd": "randomized"}),
    "gptq": ("delta-come", "1/8", {"calibration": "STATS"}),
    "impart-qt": ("impart-qt", "1/8", {}),
    "lowrank": ("lowrank", "1/8", {}),
    "dare": ("dare", "1/8", {}),
    "bitdelta": ("bitdelta", "1/8", {}),
}


def encode(pair, out, case, stats=None, **kw) -> bytes:
    method, ratio, options = CASES[case]
    options = {k: (stats if v == "STATS" else v) for k, v in options.items()}
    dcm.encode(*pair, out, method=method, ratio=ratio, options=options, **kw)
    return Path(out).read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_threads_give_the_same_bytes(pair, stats, tmp_path, case):
    """1 thread, 2 and 3 threads, and a torch left at 4 intra-op threads by the caller: one file."""
    import torch

    before = torch.get_num_threads()
    serial = encode(pair, tmp_path / "serial.dcm", case, stats, threads=1)
    assert encode(pair, tmp_path / "t2.dcm", case, stats, threads=2) == serial
    torch.set_num_threads(4)
    try:
        assert encode(pair, tmp_path / "t3.dcm", case, stats, threads=3) == serial
        assert torch.get_num_threads() == 4  # the caller's setting comes back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["lossless", "recipe", "rd-randomized", "gptq", "bitdelta"])
def test_workers_give_the_same_bytes(pair, stats, tmp_path, case):
    serial = encode(pair, tmp_path / "serial.dcm", case, stats, threads=1)
    assert encode(pair, tmp_path / "w1.dcm", case, stats, workers=1) == serial
    assert encode(pair, tmp_path / "w2.dcm", case, stats, workers=2) == serial


def test_the_ledger_passes_a_leftover_on(pair, tmp_path):
    """d.weight has no delta: its share goes to the matrices after it, which the speculative run codes
    again; the file is the serial one.  (The recipe's shares are by size; rd never plans bytes for a
    matrix that cannot spend them.)"""
    report = dcm.encode(*pair, tmp_path / "x.dcm", method="delta-come", ratio="1/8", threads=3,
                        options={"alloc": "recipe"})
    assert report.recoded > 0
    assert (tmp_path / "x.dcm").read_bytes() == encode(pair, tmp_path / "s.dcm", "recipe", threads=1)


class _Probe(DeltaCoMe):
    """delta-come that records the thread counts its numerics see."""

    name = "test-probe"
    seen: list = []

    def encode_tensor(self, name, ft, base, dtype_name, plan=None):
        import torch
        from threadpoolctl import threadpool_info

        _Probe.seen.append((torch.get_num_threads(), max(p["num_threads"] for p in threadpool_info())))
        return super().encode_tensor(name, ft, base, dtype_name, plan)


def test_numerics_run_on_one_thread(pair, tmp_path):
    methods.register(_Probe)
    _Probe.seen = []
    try:
        dcm.encode(*pair, tmp_path / "x.dcm", method="test-probe", threads=2)
    finally:
        del methods.METHODS[_Probe.name]
    assert _Probe.seen and set(_Probe.seen) == {(1, 1)}


THREADS_SCRIPT = textwrap.dedent("""
    import sys, threading
    import torch  # before dcm: libgomp starts with one thread per core, as in a program that uses torch
    import dcm
    from threadpoolctl import threadpool_info
    from dcm.methods import svd

    seen = set()
    factor = svd._torch_svd
    def traced(torch, a):
        seen.add(max(p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openmp"))
        return factor(torch, a)
    svd._torch_svd = traced
    base, ft, out = sys.argv[1:4]
    files = []
    for threads in (1, 2, 3):
        dcm.encode(base, ft, out, method="delta-come", ratio="1/8", options={"alloc": "rd"}, threads=threads,
                   overwrite=True)
        files.append(open(out, "rb").read())
    print(len(set(files)), sorted(seen))
""")


def test_pool_threads_pin_openmp(pair, tmp_path):
    """A new thread starts with OpenMP's default thread count whatever the main thread set: each pool
    thread pins its own, or LAPACK inside a job runs on several threads and the bytes change."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(pair[0]), str(pair[1]), str(tmp_path / "x.dcm")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "[1]"], done.stdout


# --- the ledger and the ordered runner -------------------------------------------------------


def test_ledger_shares_a_leftover_by_size_over_later_matrices():
    ledger = Ledger({"a": 1000, "b": 1000, "c": 2000}, ["a", "x", "b", "c"], {"a": 10, "b": 10, "c": 30, "x": 1})
    assert ledger.budget("b") == 1000
    assert not ledger.settle("a", 1000, 1000 - int(CARRY_MIN_SHARE * 1000) + 1)  # slack stays
    assert ledger.settle("a", 1000, 600)  # 400 left: 1/4 to b, 3/4 to c
    assert (ledger.budget("b"), ledger.budget("c")) == (1100, 2300)
    assert not ledger.settle("c", 2300, 0)  # nothing after the last matrix


class _ShuffledExecutor(InlineExecutor):
    """Computes jobs at submission but completes their futures in a random order, some from another thread."""

    concurrency = 3
    window = None

    def __init__(self, rng):
        self.rng, self.pending, self.lock = rng, [], threading.Lock()

    def submit(self, fn, job):
        future = cf.Future()
        with self.lock:
            self.pending.append((future, fn(None, job)))
            self.rng.shuffle(self.pending)
            ready = [self.pending.pop()] if len(self.pending) > 2 or self.rng.random() < 0.3 else []
        self._complete(ready)
        threading.Timer(0.001, self._flush).start()
        return future

    def _flush(self):
        with self.lock:
            ready, self.pending = self.pending, []
        self._complete(ready)

    @staticmethod
    def _complete(ready):
        for future, result in ready:
            if future.set_running_or_notify_cancel():  # a cancelled (stale) one stays cancelled
                future.set_result(result)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=12), st.integers(0, 2**32 - 1),
       st.integers(1, 6), st.integers(0, 4000))
def test_property_speculative_runs_accept_what_a_serial_run_does(spends, seed, window, buffer):
    """Jobs spend a share of their budget; leftovers move later budgets.  Whatever order jobs start and
    finish in, and whatever the limits, the accepted (job, budget) pairs are those of a serial run."""
    names = [f"m{i}" for i in range(len(spends))]
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)

    def run(executor, **kw):
        ledger = Ledger({n: 1000 for n in names}, names, {n: 1 + i for i, n in enumerate(names)})
        accepted = []

        def accept(i, result):
            accepted.append(result)
            return ledger.settle(names[i], result[1], result[2])
        run_ordered(executor, lambda _, job: (job[0], job[1], job[1] * spends[job[0]] // 100), len(names),
                    lambda i, budget: (i, budget), accept=accept, version=lambda i: ledger.budget(names[i]),
                    working_bytes=lambda i: 1, **kw)
        return accepted

    serial = InlineExecutor()
    serial.start(None)
    assert run(_ShuffledExecutor(random.Random(seed)), order=order, window=window, buffer_limit=buffer,
               result_bytes=lambda i: 1000, memory_limit=2) == run(serial)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=10), st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_property_jobs_running_together_stay_within_the_memory_limit(weights, seed, limit):
    """On 3 threads, jobs in a shuffled start order (the largest first, as the encoder does): whenever two or
    more run at once their working bytes fit the limit, the head of the line included; all are accepted."""
    from dcm.parallel import ThreadExecutor
    running, peak, lock = [], [], threading.Lock()
    rng = random.Random(seed)
    pauses = [rng.random() * 0.004 for _ in weights]

    def job(_, i):
        with lock:
            running.append(i)
            if len(running) > 1:
                peak.append(sum(weights[j] for j in running))
        threading.Event().wait(pauses[i])
        with lock:
            running.remove(i)
        return i

    executor = ThreadExecutor(3)
    executor.start(None)
    accepted = []
    try:
        order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
        run_ordered(executor, job, len(weights), lambda i, _: i, accept=lambda i, r: accepted.append(r) and False,
                    working_bytes=weights.__getitem__, memory_limit=limit, order=order)
    finally:
        executor.shutdown()
    assert accepted == list(range(len(weights)))
    assert all(p <= limit for p in peak), (peak, limit)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(500, 1500)), min_size=1, max_size=12),
       st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_property_results_that_hold_with_more_budget_are_kept(jobs_spec, seed, window):
    """Like rd: a job whose record needs less than its budget gives the same record under any larger one
    (``reusable``), and is kept when a leftover raises its budget; one that needs more spends a share of
    what it has.  The accepted records, and the budgets the ledger settles, are those of a serial run."""
    names = [f"m{i}" for i in range(len(jobs_spec))]
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)

    def code(_, job):
        i, budget = job
        spend, need = jobs_spec[i]
        if need <= budget:
            return {"i": i, "budget": budget, "cost": need, "holds": True}
        return {"i": i, "budget": budget, "cost": budget * spend // 100, "holds": False}

    def run(executor, **kw):
        ledger = Ledger({n: 1000 for n in names}, names, {n: 1 + i for i, n in enumerate(names)})
        accepted = []

        def accept(i, result):
            budget = ledger.budget(names[i])
            accepted.append((i, result["cost"], budget))
            return ledger.settle(names[i], budget, result["cost"])
        run_ordered(executor, code, len(names), lambda i, budget: (i, budget), accept=accept,
                    version=lambda i: ledger.budget(names[i]), working_bytes=lambda i: 1,
                    reusable=lambda i, r, budget: r["holds"] and budget >= r["budget"], **kw)
        return accepted

    serial = InlineExecutor()
    serial.start(None)
    assert run(_ShuffledExecutor(random.Random(seed)), order=order, window=window) == run(serial)


def test_rd_passes_leftovers_on_without_recoding_what_holds(pair, tmp_path):
    """rd records that kept every planned vector are not coded again when a leftover raises their budget;
    the file is the serial one."""
    method = methods.get_method("delta-come", {"alloc": "rd"}, ratio="1/8")
    assert method.carries_leftover
    options = np.array([0, 2, 3, 4, 8])
    rd_plan = RdPlan(np.arange(3), np.array([8, 3, 3]), options, np.ones(5), np.zeros((3, 5)))
    plan = methods.base.TensorPlan(budget=100, data=rd_plan)
    assert method.holds_with_more_budget(plan, {"groups": [[0, 1, 8, 128], [1, 3, 3, 128]]})
    assert not method.holds_with_more_budget(plan, {"groups": [[0, 1, 8, 128], [1, 2, 3, 128]]})  # dropped
    assert not method.holds_with_more_budget(plan, {"groups": [[0, 1, 8, 128], [1, 2, 3, 128],
                                                               [2, 3, 2, 128]]})  # narrowed
    assert not methods.get_method("delta-come", ratio="1/8").holds_with_more_budget(plan, {"groups": []})
    serial = encode(pair, tmp_path / "serial.dcm", "rd", threads=1)
    assert encode(pair, tmp_path / "t3.dcm", "rd", threads=3) == serial


# --- failures ------------------------------------------------------------------------------


class _KillOnce(DeltaCoMe):
    """delta-come whose worker process dies (SIGKILL) at tensor b.weight while ``marker`` does not exist."""

    name = "test-kill-once"

    def __init__(self, *args, marker=None, **kw):
        super().__init__(*args, **kw)
        self.marker = marker

    def encode_tensor(self, name, ft, base, dtype_name, plan=None):
        if name == "b.weight" and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed once")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_tensor(name, ft, base, dtype_name, plan)


@pytest.fixture
def kill_once():
    methods.register(_KillOnce)
    yield _KillOnce.name
    del methods.METHODS[_KillOnce.name]


def test_a_killed_worker_process_fails_the_encode_cleanly(pair, tmp_path, kill_once):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(WorkerError, match="worker process died .* in flight; nothing was written"):
        dcm.encode(*pair, out_dir / "x.dcm", method=kill_once, options={"marker": str(tmp_path / "m")}, workers=2)
    assert os.listdir(out_dir) == []  # no file, no temporaries


# --- the memory of --workers --------------------------------------------------------------

# This process's peak is VmHWM (ru_maxrss would count the forked test process's pages before exec);
# the workers' is the largest ru_maxrss of the reaped children (spawned from this small process).
MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, resource, sys
    import dcm
    if __name__ == "__main__":
        base, ft, out, workers = sys.argv[1:5]
        dcm.encode(base, ft, out, workers=int(workers), method=sys.argv[5], ratio=sys.argv[6] or None,
                   options=json.loads(sys.argv[7]))
        status = open("/proc/self/status").read()
        main = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
        print(json.dumps({"main": main, "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
""")


def _peak_rss(tmp_path, base, ft, workers, method="lossless", ratio="", options=None):
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(base), str(ft), str(tmp_path / "x.dcm"), str(workers),
                          method, ratio, json.dumps(options or {})], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    (tmp_path / "x.dcm").unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method, ratio, options", [("lossless", "", None), ("delta-come", "1/16", {"alloc": "recipe"}),
                                                    ("delta-come", "1/16", {"alloc": "rd"})])
def test_workers_hold_one_tensor_each(tmp_path, method, ratio, options):
    """RSS in a subprocess: --workers 2 over eight 16 MiB matrices against the same over 64 KiB ones.

    A worker holds one tensor's working set (lossless: its byte planes and their compressed copies;
    delta-come: the estimate ``working_bytes`` the encoder admits jobs by, and under ``rd`` the SVDs
    it measured, kept for encoding: ``SvdCache``); this process holds the results in flight (2 per
    worker, written as soon as they are next in file order)."""
    def make(root, rows):
        rng = np.random.default_rng(0)
        base = {f"layers.{i}.weight": ("F32", rng.standard_normal((rows, 1024)).astype(np.float32))
                for i in range(8)}
        ft = {n: (dt, a + np.float32(1e-3) * rng.standard_normal(a.shape).astype(np.float32))
              for n, (dt, a) in base.items()}
        return write_checkpoint(root / "base", base), write_checkpoint(root / "ft", ft)

    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    small = _peak_rss(tmp_path / "small", *make(tmp_path / "small", 16), 2, method, ratio, options)
    big = _peak_rss(tmp_path / "big", *make(tmp_path / "big", 4096), 2, method, ratio, options)
    tensor = 4096 * 1024 * 4
    from dcm.checkpoint import TensorInfo
    working = methods.get_method(method, options, ratio=ratio or None).working_bytes(
        TensorInfo("x", "F32", (4096, 1024), tensor)) if method != "lossless" else 2 * tensor
    if (options or {}).get("alloc") == "rd":  # a worker may have measured all eight: U, S and V of each
        from dcm.methods.deltacome import SVD_CACHE_BYTES
        working += min(SVD_CACHE_BYTES, 8 * 4 * (4096 * 1024 + 1024 + 1024 * 1024))
    assert big["worker"] - small["worker"] <= working + tensor // 2, (big, small, working)
    assert big["main"] - small["main"] <= 5 * tensor, (big, small)


# --- Ray (scripts/setup.sh installs the dcm[ray] extra) ------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """An in-process Ray of 2 CPUs; this module's classes travel by value (workers cannot import tests/)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("case", ["lossless", "recipe", "rd", "gptq"])
@pytest.mark.parametrize("inputs", ["shared", "stream"])
def test_ray_gives_the_same_bytes(local_ray, pair, stats, tmp_path, case, inputs):
    from dcm.distributed.ray import RayExecutor

    serial = encode(pair, tmp_path / "serial.dcm", case, stats, threads=1)
    assert encode(pair, tmp_path / "ray.dcm", case, stats, executor=RayExecutor(inputs=inputs)) == serial


def test_ray_retries_a_killed_worker(local_ray, pair, tmp_path, kill_once):
    """Ray runs the task of the killed worker again: the file is the one no kill gives."""
    from dcm.distributed.ray import RayExecutor

    marker = tmp_path / "m"
    dcm.encode(*pair, tmp_path / "ray.dcm", method=kill_once, options={"marker": str(marker)},
               executor=RayExecutor())
    assert marker.exists()  # a worker did die
    dcm.encode(*pair, tmp_path / "serial.dcm", method=kill_once, options={"marker": str(marker)}, threads=1)
    assert (tmp_path / "ray.dcm").read_bytes() == (tmp_path / "serial.dcm").read_bytes()


def test_ray_gives_up_cleanly(local_ray, pair, tmp_path, kill_once):
    """A worker that dies on every try: WorkerError once Ray's retries run out, and no file."""
    from dcm.distributed.ray import RayExecutor

    class _KillAlways(_KillOnce):
        def encode_tensor(self, name, ft, base, dtype_name, plan=None):
            if name == "b.weight":
                os.kill(os.getpid(), signal.SIGKILL)
            return super().encode_tensor(name, ft, base, dtype_name, plan)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    methods.register(type("_K", (_KillAlways,), {"name": "test-kill-always"}))
    try:
        with pytest.raises(WorkerError, match="Ray task coding tensor 'b.weight' failed"):
            dcm.encode(*pair, out_dir / "x.dcm", method="test-kill-always", options={"marker": str(tmp_path / "m")},
                       executor=RayExecutor(max_retries=1))
    finally:
        del methods.METHODS["test-kill-always"]
    assert os.listdir(out_dir) == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_cluster_of_two_nodes(pair, tmp_path):
    """`ray start --head` and a second node on 127.0.0.1 (subprocesses), `dcm encode --ray ADDRESS` through
    the CLI: both nodes join, and the file is the serial one."""
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray") if (bin_dir / "ray").exists() else "ray"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    nodes = []
    try:
        nodes.append(subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                       "--include-dashboard=false", *common], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: _alive_nodes(address, env) >= 1, "the head node")
        nodes.append(subprocess.Popen([ray_cli, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                       *common], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: _alive_nodes(address, env) >= 2, "the second node")
        out = tmp_path / "ray.dcm"
        done = subprocess.run([sys.executable, "-m", "dcm", "encode", str(pair[0]), str(pair[1]), "-o", str(out),
                               "--method", "delta-come", "--ratio", "1/8", "--alloc", "rd", f"--ray={address}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == encode(pair, tmp_path / "serial.dcm", "rd", threads=1)
    finally:
        for node in reversed(nodes):  # the process groups these subprocesses lead, and nothing else
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)


def _alive_nodes(address, env) -> int:
    code = f"import ray; ray.init(address={address!r}, log_to_driver=False); " \
           "print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def _wait_for(check, what, tries=30):
    import time

    for _ in range(tries):
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"{what} did not come up")


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "invalid count"),
    (["--workers", "-1"], "invalid count"),
    (["--device", "tpu"], "device 'tpu': use cpu, cuda or cuda:N"),
    (["--max-memory", "lots"], "invalid size"),
    (["--workers", "2", "--ray"], "--ray runs every tensor as a Ray task: drop --workers and --threads"),
])
def test_cli_refuses_bad_speed_options(pair, tmp_path, capsys, flags, message):
    code = cli.main(["encode", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "x.dcm"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.dcm").exists()


def test_cli_threads_and_workers_reach_the_encoder(pair, tmp_path, capsys):
    for i, flags in enumerate((["--threads", "2"], ["--workers", "2", "--max-memory", "1GiB"])):
        assert cli.main(["encode", str(pair[0]), str(pair[1]), "-o", str(tmp_path / f"{i}.dcm"), "--method",
                         "delta-come", "--ratio", "1/8", *flags]) == 0
    assert (tmp_path / "0.dcm").read_bytes() == (tmp_path / "1.dcm").read_bytes()


def test_a_tight_memory_limit_still_runs_one_job(pair, tmp_path):
    serial = encode(pair, tmp_path / "a.dcm", "rd", threads=1)
    assert encode(pair, tmp_path / "b.dcm", "rd", threads=3, max_memory=1) == serial


def test_device_cpu_is_the_default_and_cuda_is_checked():
    assert compute.check_device(None) == "cpu" == compute.check_device("cpu")
    with pytest.raises(UsageError, match="use cpu, cuda or cuda:N"):
        compute.check_device("gpu")
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        with pytest.raises(UsageError):
            compute.check_device("cuda")


def test_jobs_choose_actions():
    from dcm.checkpoint import TensorInfo

    lossless, lossy = methods.get_method("lossless"), methods.get_method("delta-come")
    m = TensorInfo("w", "F32", (4, 4), 64)
    assert jobs.choose_action(m, None, lossy) is jobs.Action.FULL
    # another float dtype, or more rows than the base: an adapted record (spec 10.13); other shapes: replaced
    assert jobs.choose_action(m, TensorInfo("w", "F16", (4, 4), 32), lossy) is jobs.Action.ADAPTED
    assert jobs.choose_action(m, TensorInfo("w", "F32", (3, 4), 48), lossless) is jobs.Action.ADAPTED
    assert jobs.choose_action(m, TensorInfo("w", "F32", (4, 3), 48), lossy) is jobs.Action.REPLACED
    assert jobs.choose_action(m, TensorInfo("w", "I32", (4, 4), 64), lossy) is jobs.Action.REPLACED
    assert jobs.choose_action(m, m, lossy) is jobs.Action.LOSSY
    assert jobs.choose_action(m, m, lossless) is jobs.Action.DENSE


# --- progress: every phase, on a terminal only ------------------------------------------------


class _Terminal:
    """A stderr that says it is a terminal and keeps what was written."""

    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_of_every_phase_on_a_terminal_only(pair, tmp_path, monkeypatch, capsys, tty):
    """Planning, allocation, coding and writing each show progress on a terminal (here with no delay:
    the bars wait a second before they show), and nothing goes to a stderr that is not one."""
    import importlib

    monkeypatch.setattr(importlib.import_module("dcm.encode"), "PROGRESS_DELAY", 0)
    term = _Terminal()
    if tty:
        monkeypatch.setattr(sys, "stderr", term)
    code = cli.main(["encode", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "x.dcm"), "--method",
                     "delta-come", "--ratio", "1/8", "--alloc", "rd", "--threads", "2"])
    assert code == 0
    shown = "".join(term.text)
    if tty:
        for phase in ("plan:", "allocate: 6 matrices", "encode:", "write:"):
            assert phase in shown, phase
    else:
        assert capsys.readouterr().err == ""


def test_progress_on_a_real_terminal(tmp_path):
    """Through a pseudo-terminal: a planning phase of a few seconds shows its bar; -q shows nothing."""
    import pty

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1536, 1536)).astype(np.float32)
    base = write_checkpoint(tmp_path / "base", {"m.weight": ("F32", w), "k.weight": ("F32", w.T.copy())})
    ft = write_checkpoint(tmp_path / "ft", {"m.weight": ("F32", w + lowrank(rng, 1536, 1536)),
                                            "k.weight": ("F32", w.T + lowrank(rng, 1536, 1536))})

    def run(*flags):
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "dcm", "encode", str(base), str(ft), "-o",
                                 str(tmp_path / "x.dcm"), "--overwrite", "--method", "delta-come", "--alloc", "rd",
                                 "--threads", "1", *flags], stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        assert proc.wait(timeout=300) == 0
        return b"".join(chunks).decode(errors="replace")

    shown = run()
    assert "plan:" in shown and "matrix" in shown and "allocate: 2 matrices" in shown
    assert run("-q") == ""


# --- the allocation's top-up at LLM scale --------------------------------------------------------


def _reference_moves(candidates, chosen, moves):
    """The top-up's moves as first written: every option a Python tuple, sorted."""
    options = []
    for ci, (c, w) in enumerate(zip(candidates, chosen)):
        if not len(c.dist):
            continue
        now = np.searchsorted(c.widths, w)
        for j in range(1, len(c.widths)):
            gain = c.dist[np.arange(len(w)), now] - c.dist[:, j]
            extra = c.cost[j] - c.cost[now]
            ok = (j > now) & (gain > 0)
            for i in np.flatnonzero(ok):
                options.append((gain[i] / max(extra[i], 1e-9), ci, int(i), int(c.widths[j]), int(w[i])))
    options.sort(reverse=True)
    return [o[1:] for o in options[:moves]]


@pytest.mark.parametrize("seed, moves", [(0, 4096), (1, 50), (2, 7), (3, 1)])
def test_top_up_moves_are_the_sorted_ones(seed, moves):
    from dcm.methods import allocate

    rng = np.random.default_rng(seed)
    candidates, chosen = [], []
    for m in range(5):
        k = int(rng.integers(0, 300))
        widths = np.array([0, 2, 3, 4, 8])
        dist = np.sort(rng.random((k, 5)), axis=1)[:, ::-1] * rng.choice([1.0, 2.0], size=(k, 1))
        dist[: k // 3, 2] = dist[: k // 3, 1]  # ties and zero gains
        cost = np.array([0.0, 10.0, 15.0, 15.0, 40.0]) * (1 + m)
        candidates.append(allocate.Candidates(f"m{m}", "F32", (64, 64), widths, cost, dist))
        chosen.append(rng.choice(widths, size=k))
    assert allocate._best_moves(candidates, chosen, moves) == _reference_moves(candidates, chosen, moves)
