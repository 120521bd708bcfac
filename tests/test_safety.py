"""No data loss, no silent surprises (issue 14): output safety, signals, clear errors and messages.

Each test is named after the issue's item it covers.  The CLI runs through
``dcm.cli.main`` in-process, or as a child process where a signal, a resource
limit or a concurrent writer is involved: the child pauses at a known point
(after its first blob or tensor is written) until the test lets it go on, so
no test depends on timing.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dcm
import numpy as np
import pytest
from conftest import storage, write_checkpoint
from dcm.cli import build_parser, main
from dcm.errors import DcmError

DCM_TMP = ".dcm-tmp-"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pair_tensors(seed: int = 0, n: int = 64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, n)).astype(np.float32)
    k = rng.standard_normal((n, n)).astype(np.float32)
    emb = rng.standard_normal((2 * n, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    base = {"a.query.weight": ("F32", q), "a.key.weight": ("F32", k), "emb.weight": ("F32", emb),
            "a.bias": ("F32", bias)}
    ft = {name: (dt, a + np.float32(0.01) * rng.standard_normal(a.shape).astype(np.float32))
          for name, (dt, a) in base.items()}
    return base, ft


@pytest.fixture
def pair(tmp_path):
    base, ft = pair_tensors()
    base_dir = write_checkpoint(tmp_path / "base", base, attachments={"config.json": b'{"a": 1}\n'})
    ft_dir = write_checkpoint(tmp_path / "ft", ft, attachments={"config.json": b'{"a": 2}\n'})
    return base_dir, ft_dir


@pytest.fixture
def encoded(tmp_path, pair):
    base_dir, ft_dir = pair
    out = tmp_path / "x.dcm"
    dcm.encode(base_dir, ft_dir, out)
    return out, base_dir, ft_dir


def hidden(folder: Path) -> list[str]:
    """Temporaries (and anything else hidden) left in a folder."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its bytes: to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# --- a child process that pauses mid-write ------------------------------------------------

CHILD = r"""
import os, sys, time
import dcm.cli, dcm.container, dcm.checkpoint
ready, go, where = sys.argv[1], sys.argv[2], sys.argv[3]
cls, attr = {"encode": (dcm.container.ContainerWriter, "add_blob"),
             "decode": (dcm.checkpoint.CheckpointWriter, "write")}[where]
original, calls = getattr(cls, attr), []

def paused(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    if not calls:  # after the first blob or tensor: temporaries exist, the output does not yet
        calls.append(1)
        open(ready, "w").close()
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.01)
    return result

setattr(cls, attr, paused)
sys.exit(dcm.cli.main(sys.argv[4:]))
"""


class Child:
    """``dcm ARGV`` in a child process, paused after its first write until ``go()``."""

    def __init__(self, tmp_path: Path, where: str, *argv, preexec_fn=None, name: str = "child"):
        self.ready, self.flag = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.ready), str(self.flag), where, *map(str, argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)

    def wait_paused(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"child exited {self.proc.returncode} before pausing: "
                                     f"{self.proc.communicate()}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError("child did not pause")
            time.sleep(0.01)

    def go(self) -> None:
        self.flag.touch()

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, out, err


# --- 1. decode --overwrite replaces only what dcm wrote ---------------------------------------


def test_item1_decode_overwrite_never_replaces_inputs_or_foreign_directories(encoded, tmp_path, capsys,
                                                                           monkeypatch):
    out, base_dir, ft_dir = encoded
    base_before = snapshot(base_dir)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n")
    (project / "notes.txt").write_text("keep\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work\n")
    refusals = [
        (base_dir, "it is the base"),  # the base itself (reported: replaced by the decoded fine-tune)
        (tmp_path, "contains"),  # a directory holding the inputs
        (outside, "did not write"),  # an unrelated directory
    ]
    for target, reason in refusals:
        code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", target, "--overwrite")
        assert code == 2, (target, err)
        assert str(target) in err and reason in err, err
    assert (outside / "thesis.tex").read_text() == "years of work\n"
    assert snapshot(base_dir) == base_before

    monkeypatch.chdir(project)  # `-o .` inside a project
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", ".", "--overwrite")
    assert code == 2 and "current directory" in err
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", "..", "--overwrite")
    assert code == 2 and ("current directory" in err or "contains" in err)
    assert sorted(os.listdir(project)) == ["notes.txt", "train.py"]

    # What --overwrite may replace: a directory dcm wrote, unchanged, and a regular file.
    decoded = tmp_path / "decoded"
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", decoded)[0] == 0
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", decoded, "--overwrite")[0] == 0
    (decoded / "my-eval.json").write_text("{}")  # the user's own file in it: no longer only dcm's
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", decoded, "--overwrite")
    assert code == 2 and "my-eval.json" in err and (decoded / "my-eval.json").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", a_file, "--overwrite")[0] == 0
    assert (a_file / "model.safetensors").is_file()


def test_item1_decode_into_a_new_directory_inside_an_input_is_allowed(encoded, capsys):
    out, base_dir, _ = encoded
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", base_dir / "decoded")[0] == 0
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", base_dir / "decoded", "--overwrite")
    assert code == 2 and "inside" in err  # but never replaced there


# --- 2. encode never writes over an input ------------------------------------------------------


def test_item2_encode_output_never_resolves_to_an_input(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    before = {d: snapshot(d) for d in (base_dir, ft_dir)}
    link = tmp_path / "link.dcm"
    link.symlink_to(base_dir / "model.safetensors")
    hard = tmp_path / "hard.dcm"
    os.link(ft_dir / "model.safetensors", hard)
    for target in (base_dir / "model.safetensors", ft_dir / "model.safetensors",
                   tmp_path / "ft" / ".." / "base" / "model.safetensors",  # `..`
                   link,  # a symbolic link to the base's weights
                   hard,  # a hard link to the fine-tune's weights
                   ft_dir / "config.json"):  # an existing file inside an input directory
        code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", target, "--overwrite")
        assert code == 2, (target, err)
        assert str(target) in err and "refusing" in err, err
    assert {d: snapshot(d) for d in (base_dir, ft_dir)} == before
    assert link.is_symlink() and hard.read_bytes() == (ft_dir / "model.safetensors").read_bytes()
    # A new file inside an input directory is fine (it is not part of the checkpoint).
    assert run(capsys, "-q", "encode", base_dir, ft_dir, "-o", base_dir / "delta.dcm")[0] == 0


def test_item2_decode_never_writes_over_its_dcm_file(encoded, tmp_path, capsys):
    out, base_dir, ft_dir = encoded
    before = out.read_bytes()
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", out, "--overwrite")
    assert code == 2 and "refusing" in err and out.read_bytes() == before


# --- 3. concurrent writers ------------------------------------------------------------------------


def test_item3_second_writer_never_replaces_the_first(pair, tmp_path):
    base_dir, ft_dir = pair
    out = tmp_path / "x.dcm"
    slow = Child(tmp_path, "encode", "-q", "encode", base_dir, ft_dir, "-o", out)
    slow.wait_paused()  # started before the other: the output did not exist then
    assert main(["-q", "encode", str(base_dir), str(ft_dir), "-o", str(out)]) == 0
    first = out.stat()
    slow.go()
    code, _, err = slow.finish()
    assert code == 2, err
    assert "appeared" in err and str(out) in err
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not replaced
    assert hidden(tmp_path) == []  # the loser left no temporaries


def test_item3_same_for_decode(encoded, tmp_path):
    out, base_dir, _ = encoded
    target = tmp_path / "decoded"
    slow = Child(tmp_path, "decode", "-q", "decode", out, "--base", base_dir, "-o", target)
    slow.wait_paused()
    assert main(["-q", "decode", str(out), "--base", str(base_dir), "-o", str(target)]) == 0
    (target / "config.json").write_text("the winner's")
    slow.go()
    code, _, err = slow.finish()
    assert code == 2 and "appeared" in err, err
    assert (target / "config.json").read_text() == "the winner's"
    assert hidden(tmp_path) == []


# --- 4. only regular files are replaced ---------------------------------------------------------


def test_item4_overwrite_refuses_what_is_not_a_regular_file(pair, encoded, tmp_path, capsys):
    base_dir, ft_dir = pair
    out = encoded[0]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("mine")
    link = tmp_path / "link.dcm"
    link.symlink_to(elsewhere)
    folder = tmp_path / "folder.dcm"
    folder.mkdir()
    for target, what in ((fifo, "named pipe"), (link, "symbolic link"), (folder, "directory")):
        code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", target, "--overwrite")
        assert code == 2 and what in err, (target, err)
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", fifo, "--overwrite")
    assert code == 2 and "named pipe" in err
    assert fifo.is_fifo() and link.is_symlink() and elsewhere.read_text() == "mine" and folder.is_dir()


# --- 5. list parameters take a string or a list ---------------------------------------------------


def test_item5_include_and_exclude_take_a_string_or_a_list(pair, tmp_path):
    base_dir, ft_dir = pair
    kinds = {}
    for label, kw in (("inc-str", {"include": "*query*"}), ("inc-list", {"include": ["*query*"]}),
                      ("exc-str", {"exclude": "*emb*"}), ("exc-list", {"exclude": ["*emb*"]})):
        out = tmp_path / f"{label}.dcm"
        dcm.encode(base_dir, ft_dir, out, method="delta-come", **kw)
        with dcm.open(out) as f:
            kinds[label] = {r.name: r.kind_name for r in f.records()}
    lossy = {name for name, kind in kinds["inc-str"].items() if kind not in ("dense-delta", "full")}
    assert lossy == {"a.query.weight"}
    lossy = {name for name, kind in kinds["exc-str"].items() if kind not in ("dense-delta", "full")}
    assert lossy == {"a.query.weight", "a.key.weight"}
    assert kinds["inc-str"] == kinds["inc-list"] and kinds["exc-str"] == kinds["exc-list"]
    with pytest.raises(DcmError, match="include"):
        dcm.encode(base_dir, ft_dir, tmp_path / "bad.dcm", method="delta-come", include=[1, 2])


# --- 6. a lossy encode that codes little is never silent ----------------------------------------


def test_item6_lossy_method_that_codes_nothing_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    base = write_checkpoint(tmp_path / "base32", {"w": ("F32", w)})
    # another dtype and another number of columns: no delta to take (another dtype alone, or more rows,
    # would be an adapted record)
    ft16 = write_checkpoint(tmp_path / "ft16", {"w": ("BF16", storage("BF16", w[:, :48] + 0.01))})
    out = tmp_path / "x.dcm"
    code, _, err = run(capsys, "encode", base, ft16, "-o", out, "--method", "delta-come")
    assert code == 2 and "coded no tensor" in err
    assert "dtype differs (BF16 in the fine-tune, F32 in the base)" in err and "--allow-uncoded" in err
    assert "\\x0a" not in err and len(err.splitlines()) == 3  # one line per reason, not escaped
    assert not out.exists() and hidden(tmp_path) == []

    ft32 = write_checkpoint(tmp_path / "ft32", {"w": ("F32", w + 0.01)})
    code, _, err = run(capsys, "encode", base, ft32, "-o", out, "--method", "delta-come", "--exclude", "*")
    assert code == 2 and "not selected by --include / --exclude" in err

    code, stdout, err = run(capsys, "encode", base, ft16, "-o", out, "--method", "delta-come", "--allow-uncoded")
    assert code == 0 and "0.0% of 3072 params" in stdout and "budget 1.000 (ratio 1/16)" in stdout
    assert "coded no tensor" in err  # still said, as a warning
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "coded:             0.0% of the params by delta-come" in stdout


def test_item6_file_far_over_its_budget_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    v = rng.standard_normal(20000).astype(np.float32)  # a big vector: stored exactly, 16+ bits/param
    base = write_checkpoint(tmp_path / "b", {"w": ("F32", w), "v": ("F32", v)})
    ft = write_checkpoint(tmp_path / "f", {"w": ("F32", w + 0.01), "v": ("F32", v + np.float32(0.5))})
    code, _, err = run(capsys, "encode", base, ft, "-o", tmp_path / "x.dcm", "--method", "delta-come")
    assert code == 2 and "more than 2x the budget of 1.000" in err
    assert "not a 2-D float matrix" in err and "[v]" in err


# --- 7. the input changes under a read ----------------------------------------------------------


def test_item7_dcm_rewritten_during_decode_is_an_error_not_sigbus(encoded, tmp_path):
    out, base_dir, _ = encoded
    target = tmp_path / "decoded"
    child = Child(tmp_path, "decode", "decode", out, "--base", base_dir, "-o", target)
    child.wait_paused()
    with open(out, "r+b") as f:  # rewritten in place: truncated, then new bytes
        f.truncate(64)
        f.seek(64)
        f.write(b"\x00" * 100)
    child.go()
    code, _, err = child.finish()
    assert code == 3, (code, err)  # not -7 / 135 (SIGBUS)
    assert "changed while dcm was reading it" in err and str(out) in err
    assert not target.exists() and hidden(tmp_path) == []


def test_item7_base_changed_during_encode_is_reported_as_such(pair, tmp_path, capsys, monkeypatch):
    base_dir, ft_dir = pair
    from dcm.checkpoint import Checkpoint
    original = Checkpoint.read_elements
    calls = []

    def touch_base(self, name, start, count):
        if not calls and Path(self.path) == base_dir:
            calls.append(name)
            path = base_dir / "model.safetensors"
            path.write_bytes(path.read_bytes())  # same bytes, rewritten in place
            os.utime(path, ns=(1, 1))  # ... at another time
        return original(self, name, start, count)
    monkeypatch.setattr(Checkpoint, "read_elements", touch_base)
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "x.dcm")
    assert code == 3 and "changed while dcm was reading it" in err
    assert not (tmp_path / "x.dcm").exists()


# --- 8. SIGTERM, SIGHUP, SIGKILL -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_item8_stopping_signals_clean_up_encode(pair, tmp_path, sig):
    base_dir, ft_dir = pair
    out = tmp_path / "x.dcm"
    child = Child(tmp_path, "encode", "encode", base_dir, ft_dir, "-o", out)
    child.wait_paused()
    assert [n for n in hidden(tmp_path) if n.startswith(".x.dcm")], hidden(tmp_path)  # temporaries exist now
    child.proc.send_signal(sig)
    code, _, err = child.finish()
    assert code == 128 + sig, (code, err)
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item8_stopping_signals_clean_up_decode(encoded, tmp_path, sig):
    out, base_dir, _ = encoded
    target = tmp_path / "decoded"
    child = Child(tmp_path, "decode", "decode", out, "--base", base_dir, "-o", target)
    child.wait_paused()
    child.proc.send_signal(sig)
    code, _, err = child.finish()
    assert code == 128 + sig, (code, err)
    assert not target.exists() and hidden(tmp_path) == []


def test_item8_temporaries_of_a_killed_run_are_removed_by_the_next(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    out = tmp_path / "x.dcm"
    child = Child(tmp_path, "encode", "encode", base_dir, ft_dir, "-o", out)
    child.wait_paused()
    child.proc.send_signal(signal.SIGKILL)
    child.finish()
    left = hidden(tmp_path)
    assert left and all(n.startswith(f".x.dcm{DCM_TMP}{child.proc.pid}-") for n in left), left
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out)
    assert code == 0 and out.is_file()
    assert hidden(tmp_path) == []
    assert f"process {child.proc.pid}" in err and "removed" in err


# --- 9. the library raises DcmError --------------------------------------------------------------


def test_item9_closed_file_raises_dcm_error(encoded):
    out, base_dir, _ = encoded
    f = dcm.open(out)
    name = f.keys()[0]
    f.close()
    with pytest.raises(DcmError, match="closed") as info:
        f.check_payload(name)
    assert str(out) in str(info.value)


def test_item9_close_while_other_threads_read(encoded):
    out, base_dir, _ = encoded
    from dcm.checkpoint import Checkpoint

    with Checkpoint(base_dir) as ck:
        bases = {n: ck.read(n) for n in ck.names()}
    f = dcm.open(out)
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            for name in f.keys():
                try:
                    f.tensor(name, bases[name])
                except DcmError:
                    return  # closed: the one acceptable failure
                except Exception as e:  # noqa: BLE001 - what the test is about
                    errors.append(repr(e))
                    return
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    f.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    name = f.keys()[0]
    with pytest.raises(DcmError, match="closed"):  # and once closed, closed for every thread
        f.tensor(name, bases[name])


def test_item9_bad_paths_raise_dcm_error_naming_the_path(encoded, tmp_path):
    out, base_dir, ft_dir = encoded
    missing = tmp_path / "missing.dcm"
    for call in (lambda: dcm.open(missing), lambda: dcm.info(missing), lambda: dcm.verify(missing)):
        with pytest.raises(DcmError) as info:
            call()
        assert str(missing) in str(info.value) and isinstance(info.value.__cause__, OSError)
    for call in (lambda: dcm.open(tmp_path), lambda: dcm.info(tmp_path)):
        with pytest.raises(DcmError, match="directory") as info:
            call()
        assert str(tmp_path) in str(info.value)
    with pytest.raises(DcmError, match="list"):
        dcm.decode(out, [base_dir], tmp_path / "d")
    with pytest.raises(DcmError, match="list"):
        dcm.encode([base_dir], ft_dir, tmp_path / "e.dcm")
    with dcm.open(out) as f, pytest.raises(DcmError, match="list"):
        f.tensor(f.keys()[0], [0.0, 1.0])
    assert not (tmp_path / "d").exists() and not (tmp_path / "e.dcm").exists()


# --- 12. option errors in the CLI's words -----------------------------------------------------------


def test_item12_option_errors_in_the_cli_words(pair, encoded, tmp_path, capsys):
    base_dir, ft_dir = pair
    out = tmp_path / "y.dcm"
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out, "--recipe", "8:2,3:32,2")
    assert code == 2 and "--recipe applies to delta-come and impart-qt, not lossless" in err
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out, "--method", "impart", "--scales", "row")
    assert code == 2 and "--scales applies to bitdelta, not impart" in err and "__init__" not in err
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out, "--include", "*query*")
    assert code == 2 and "--include" in err and "lossless" in err
    assert not out.exists()
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", encoded[0])
    assert code == 2 and "--overwrite" in err and "pass overwrite" not in err


# --- 13. non-safetensors inputs named for what they are --------------------------------------------


def test_item13_non_safetensors_inputs_are_named(encoded, tmp_path, capsys):
    out, base_dir, ft_dir = encoded
    cases = [
        (base_dir / "config.json", "a JSON file"),
        (out, "a .dcm file, not a checkpoint"),
    ]
    pickled = tmp_path / "pt"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + bytes(60))
    cases += [(pickled, "pickle checkpoints (.bin, .pt) are not read: convert to safetensors"),
              (pickled / "pytorch_model.bin", "pickle checkpoints (.bin, .pt) are not read")]
    for path, what in cases:
        code, _, err = run(capsys, "decode", out, "--base", path, "-o", tmp_path / "d")
        assert code == 3 and what in err and str(path) in err, (path, err)
        assert "header length" not in err
        code, _, err = run(capsys, "encode", path, ft_dir, "-o", tmp_path / "e.dcm")
        assert code == 3 and what in err, (path, err)
    code, _, err = run(capsys, "info", base_dir / "model.safetensors")
    assert code == 3 and "a safetensors file" in err


# --- 14. output-side OS errors ------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_item14_a_full_output_device_has_its_own_exit_code(pair, tmp_path):
    base_dir, ft_dir = pair
    out = tmp_path / "x.dcm"
    child = Child(tmp_path, "encode", "encode", base_dir, ft_dir, "-o", out, preexec_fn=_limit_file_size(4096))
    child.go()  # no pause needed: the file-size limit stops the write
    code, _, err = child.finish()
    assert code == 6, (code, err)
    assert f"{out}: cannot write" in err and DCM_TMP not in err and "dcm-out" not in err
    assert not out.exists() and hidden(tmp_path) == []


def test_item14_disk_full_and_read_only_name_the_output(pair, encoded, tmp_path, capsys, monkeypatch):
    base_dir, ft_dir = pair
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    import dcm.checkpoint as checkpoint_module
    import dcm.container as container_module

    def disk_full(src, dst, length, progress=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst.name)
    with monkeypatch.context() as m:
        m.setattr(container_module, "_copy_file", disk_full)
        code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out_dir / "x.dcm")
    assert code == 6 and f"{out_dir / 'x.dcm'}: cannot write: No space left on device" in err
    assert os.listdir(out_dir) == []

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "open", lambda *a, **k: FullFile(open(*a, **k)), raising=False)
        code, _, err = run(capsys, "decode", encoded[0], "--base", base_dir, "-o", out_dir / "d")
    assert code == 6 and f"{out_dir / 'd'}: cannot write: No space left on device" in err
    assert os.listdir(out_dir) == []

    real_open, real_mkdir = os.open, os.mkdir

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    with monkeypatch.context() as m:
        m.setattr(os, "open", lambda p, flags, *a, **k: read_only(p) if flags & os.O_CREAT and
                  str(p).startswith(str(out_dir)) else real_open(p, flags, *a, **k))
        m.setattr(os, "mkdir", lambda p, *a, **k: read_only(p) if str(p).startswith(str(out_dir))
                  else real_mkdir(p, *a, **k))
        for argv in (["encode", base_dir, ft_dir, "-o", out_dir / "x.dcm"],
                     ["decode", encoded[0], "--base", base_dir, "-o", out_dir / "d"]):
            code, _, err = run(capsys, *argv)
            assert code == 6 and "Read-only file system" in err and str(argv[-1]) in err, err
    assert os.listdir(out_dir) == []


# --- 15. messages that say what differs -----------------------------------------------------------------


def test_item15_wrong_dtype_base_names_the_dtypes(tmp_path, capsys):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    base16 = write_checkpoint(tmp_path / "b16", {"w": ("BF16", storage("BF16", w))})
    ft16 = write_checkpoint(tmp_path / "f16", {"w": ("BF16", storage("BF16", w + 0.01))})
    base32 = write_checkpoint(tmp_path / "b32", {"w": ("F32", w)})
    out = tmp_path / "x.dcm"
    dcm.encode(base16, ft16, out)
    code, _, err = run(capsys, "decode", out, "--base", base32, "-o", tmp_path / "d")
    assert code == 5 and "is F32 in the base, the file expects BF16" in err
    with dcm.open(out) as f, pytest.raises(DcmError) as info:
        f.tensor("w", w)  # a float32 array where the file expects BF16 bits
    message = str(info.value)
    assert "float32" in message and "BF16" in message and "shape [8, 8]" not in message


def test_item15_negative_ratio_and_mistyped_options(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "x.dcm", "--method", "delta-come",
                       "--ratio", "-1/16")
    assert code == 2 and "ratio -1/16" in err
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "x.dcm", "--ratoi", "1/16")
    assert code == 2 and "usage: dcm encode" in err and "--ratio" in err


# --- 16. what a lossy file is, said where it is made and used -------------------------------------------


def test_item16_encode_summary_budget_matches_info_and_decode_says_approximate(tmp_path, capsys):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    base = write_checkpoint(tmp_path / "b", {"w": ("F32", w)})
    ft = write_checkpoint(tmp_path / "f", {"w": ("F32", w + np.float32(0.01) * rng.standard_normal(w.shape)
                                                  .astype(np.float32))})
    out = tmp_path / "x.dcm"
    code, stdout, err = run(capsys, "encode", base, ft, "-o", out, "--method", "delta-come")
    assert code == 0, err
    coded = dcm.info(out)["totals"]["compressed"]["bits_per_param"]
    assert f"{coded:.3f} bits/param as coded" in stdout and "budget 1.000 (ratio 1/16)" in stdout
    code, stdout, _ = run(capsys, "decode", out, "--base", base, "-o", tmp_path / "d")
    assert code == 0 and "approximate" in stdout and "delta-come" in stdout
    code, stdout, _ = run(capsys, "decode", dcm_lossless(tmp_path, base, ft), "--base", base, "-o", tmp_path / "e")
    assert code == 0 and "approximate" not in stdout


def dcm_lossless(tmp_path, base, ft) -> Path:
    out = tmp_path / "lossless.dcm"
    dcm.encode(base, ft, out)
    return out


def test_item16_help_lists_methods_default_ratio_and_every_positional(capsys):
    code, stdout, _ = run(capsys, "encode", "--help")
    assert code == 0
    flat = " ".join(stdout.split())
    for name in dcm.methods.METHODS:
        assert name in flat
    assert "default: 1/16" in flat
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"{command} {action.metavar or action.dest} has no help text"


# --- 17. directory inputs ---------------------------------------------------------------------------------


def test_item17_which_weights_and_training_state(pair, tmp_path, capsys):
    base_dir, ft_dir = pair
    base, ft = pair_tensors()
    both = write_checkpoint(tmp_path / "both", ft, max_shard_bytes=4096)  # shards + index
    write_checkpoint(tmp_path / "single", ft)
    os.rename(tmp_path / "single" / "model.safetensors", both / "model.safetensors")
    code, _, err = run(capsys, "encode", base_dir, both, "-o", tmp_path / "a.dcm")
    assert code == 0 and "using the weights in model.safetensors" in err

    trained = write_checkpoint(tmp_path / "trained", ft, attachments={"config.json": b"{}"})
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth"):
        (trained / name).write_bytes(b"PK\x03\x04")
    (trained / "checkpoint-500").mkdir()
    (trained / "checkpoint-500" / "model.safetensors").write_bytes(b"x")
    (trained / "checkpoint-500" / "optimizer.pt").write_bytes(b"x")
    code, _, err = run(capsys, "encode", base_dir, trained, "-o", tmp_path / "b.dcm")
    assert code == 0, err
    assert "weight file" not in err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and "training state" in lines[0] and "optimizer.pt" in lines[0]


# --- 18. calibrate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from test_calibrate import _text, _vocab

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vocab = _vocab()
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    transformers.BertModel(config).eval().save_pretrained(root / "model")
    transformers.BertTokenizer(vocab=vocab).save_pretrained(root / "model")
    (root / "text.txt").write_text(_text(np.random.default_rng(0)), encoding="utf-8")
    return root / "model", root / "text.txt"


@pytest.mark.parametrize("quiet", [True, False])
def test_item18_calibrate_quiet_and_piped_print_no_transformers_progress(tiny_model, tmp_path, capsys, quiet):
    model, text = tiny_model
    argv = (["-q"] if quiet else []) + ["calibrate", model, text, "-o", tmp_path / "s.safetensors",
                                        "--seq-len", "24"]
    code, stdout, err = run(capsys, *argv)  # stderr is not a terminal here, as in a pipe
    assert code == 0, err
    assert err == ""  # no "Loading weights" bar
    assert (stdout == "") == quiet


def test_item18_missing_text_before_the_model_loads_and_no_tokenizer(tiny_model, tmp_path, capsys, monkeypatch):
    import shutil

    import transformers

    model, text = tiny_model
    loads = []
    real = transformers.AutoModel.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", counting)
    code, _, err = run(capsys, "calibrate", model, tmp_path / "nope.txt", "-o", tmp_path / "s.safetensors")
    assert code != 0 and "nope.txt" in err and loads == []

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, bare / name)
    code, _, err = run(capsys, "calibrate", bare, text, "-o", tmp_path / "s.safetensors", "--seq-len", "24")
    assert code == 3 and "has no tokenizer" in err and loads == []


# --- 19. info says what it checked; missing output folders ------------------------------------------------


def test_item19_info_says_payloads_are_not_checked(encoded, capsys):
    out, *_ = encoded
    with dcm.open(out) as f:
        blob = max((b for r in f.records() for b in r.blobs), key=lambda b: b["length"])
        where = f.header.data_start + blob["offset"] + blob["length"] // 2
    data = bytearray(out.read_bytes())
    data[where] ^= 0xFF
    out.write_bytes(bytes(data))
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "payloads:          not checked" in stdout
    code, _, err = run(capsys, "info", out, "--check")
    assert code == 4 and "CRC" in err


def test_item19_missing_output_folder_same_for_encode_and_decode(encoded, tmp_path, capsys):
    out, base_dir, ft_dir = encoded
    results = []
    for argv in (["encode", base_dir, ft_dir, "-o", tmp_path / "no" / "such" / "x.dcm"],
                 ["decode", out, "--base", base_dir, "-o", tmp_path / "no" / "such" / "d"]):
        code, _, err = run(capsys, *argv)
        results.append((code, err.replace(str(argv[-1]), "OUT")))
    assert results[0] == results[1] and results[0][0] != 0, results
    assert f"output directory {tmp_path / 'no' / 'such'} does not exist" in results[0][1]
    assert not (tmp_path / "no").exists()
