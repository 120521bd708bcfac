#!/usr/bin/env python3
"""Issue 14's cases, each run with two dcm installations: a table of case -> before -> after.

    python benchmarks/safety_cases.py --before "env PYTHONPATH= /usr/bin/python3" --after python

Each side is a Python interpreter (a command line) whose ``import dcm`` is the
version to try.  Every case runs in a fresh temporary directory with the real
BERT pair (``data/real``; ``--pair DIR`` for another) or a tiny synthetic
one, through ``python -m dcm.cli`` as a user would, or a few library lines.
The outcome printed is the exit status (a negative number is the signal that
killed the process: -7 SIGBUS, -15 SIGTERM), the first line of stderr, and
what happened to the files.  Cases needing a real full or read-only
filesystem run in a private mount namespace (``unshare -m``, root only) and
are skipped without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A child that runs the CLI and pauses after its first blob / tensor until a flag file appears.
PAUSED = textwrap.dedent(r"""
    import os, sys, time
    import dcm.cli, dcm.container, dcm.checkpoint
    ready, go, where = sys.argv[1], sys.argv[2], sys.argv[3]
    cls, attr = {"encode": (dcm.container.ContainerWriter, "add_blob"),
                 "decode": (dcm.checkpoint.CheckpointWriter, "write")}[where]
    original, calls = getattr(cls, attr), []
    def paused(self, *a, **k):
        out = original(self, *a, **k)
        if not calls:
            calls.append(1)
            open(ready, "w").close()
            t = time.time() + 300
            while not os.path.exists(go) and time.time() < t:
                time.sleep(0.01)
        return out
    setattr(cls, attr, paused)
    sys.exit(dcm.cli.main(sys.argv[4:]))
""")

TINY = textwrap.dedent(r"""
    import sys, numpy as np
    from dcm.checkpoint import CheckpointWriter, TensorInfo
    def write(path, tensors, files):
        infos = [TensorInfo(n, dt, a.shape, a.nbytes) for n, (dt, a) in tensors.items()]
        with CheckpointWriter(path, infos) as w:
            for n, (_, a) in tensors.items():
                w.write(n, a)
            for rel, data in files.items():
                w.write_attachment(rel, data)
    rng = np.random.default_rng(0)
    base = {n: ("F32", rng.standard_normal((64, 64)).astype(np.float32))
            for n in ("a.query.weight", "a.key.weight", "emb.weight")}
    ft = {n: (dt, a + np.float32(0.01)) for n, (dt, a) in base.items()}
    bf = {n: ("BF16", (a.view(np.uint32) >> 16).astype(np.uint16)) for n, (_, a) in ft.items()}
    write(sys.argv[1] + "/base", base, {"config.json": b"{}"})
    write(sys.argv[1] + "/ft", ft, {"config.json": b"{}"})
    write(sys.argv[1] + "/ft-bf16", bf, {"config.json": b"{}"})
""")


class Side:
    def __init__(self, command: str, pair: Path):
        self.python = shlex.split(command)
        self.pair = pair

    def run(self, args, cwd, timeout=900, **kw):
        proc = subprocess.run(self.python + list(map(str, args)), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, **kw)
        return proc.returncode, proc.stdout, proc.stderr

    def dcm(self, cwd, *args, **kw):
        return self.run(["-m", "dcm.cli", *args], cwd, **kw)

    def paused(self, cwd, where, *args):
        ready, go = Path(cwd) / ".ready", Path(cwd) / ".go"
        proc = subprocess.Popen(self.python + ["-c", PAUSED, str(ready), str(go), where, *map(str, args)],
                                cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        return proc, go

    def tiny(self, cwd):
        self.run(["-c", TINY, cwd], cwd)


def first(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    text = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return text.replace("dcm: error: ", "").replace("dcm: warning: ", "warning: ")[:150]


def hidden(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and p.name not in
                  (".ready", ".go"))


def copy_pair(side, work):
    for name in ("base", "finetune"):
        shutil.copytree(side.pair / name, work / name, symlinks=True)
    return work / "base", work / "finetune"


# --- the cases: each returns a one-line outcome ------------------------------------------------


def case_decode_overwrite_base(side, work):
    base, ft = copy_pair(side, work)
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm")
    code, _, err = side.dcm(work, "decode", "x.dcm", "--base", base, "-o", base, "--overwrite")
    weights = (base / "model.safetensors").read_bytes() == (side.pair / "base" / "model.safetensors").read_bytes()
    return f"exit {code}; base weights {'intact' if weights else 'REPLACED by the decoded fine-tune'}; {first(err)}"


def case_decode_overwrite_cwd(side, work):
    base, ft = copy_pair(side, work)
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm")
    project = work / "project"
    project.mkdir()
    (project / "train.py").write_text("x")
    code, _, err = side.dcm(project, "decode", work / "x.dcm", "--base", base, "-o", ".", "--overwrite")
    kept = (project / "train.py").exists()
    return f"exit {code}; project's train.py {'kept' if kept else 'DELETED'}; {first(err)}"


def case_encode_over_base_weights(side, work):
    base, ft = copy_pair(side, work)
    code, _, err = side.dcm(work, "encode", base, ft, "-o", base / "model.safetensors", "--overwrite")
    same = (base / "model.safetensors").read_bytes() == (side.pair / "base" / "model.safetensors").read_bytes()
    return f"exit {code}; base weights {'intact' if same else 'REPLACED by the .dcm'}; {first(err)}"


def case_two_encodes(side, work):
    base, ft = copy_pair(side, work)
    proc, go = side.paused(work, "encode", "-q", "encode", base, ft, "-o", "x.dcm")
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm", "--method", "dare")
    first_ino = os.stat(work / "x.dcm").st_ino
    go.touch()
    _, err = proc.communicate()
    replaced = os.stat(work / "x.dcm").st_ino != first_ino
    return (f"second exit {proc.returncode}; first file {'REPLACED' if replaced else 'intact'}; "
            f"temporaries left {len(hidden(work))}; {first(err)}")


def case_overwrite_fifo(side, work):
    side.tiny(work)
    os.mkfifo(work / "fifo")
    code, _, err = side.dcm(work, "encode", "base", "ft", "-o", "fifo", "--overwrite")
    return f"exit {code}; fifo {'kept' if (work / 'fifo').is_fifo() else 'REPLACED by a regular file'}; {first(err)}"


def case_include_string(side, work):
    side.tiny(work)
    code, out, err = side.run(["-c", "import dcm; dcm.encode('base', 'ft', 'x.dcm', method='delta-come', "
                               "include='*query*'); f = dcm.open('x.dcm'); "
                               "print(sorted(r.name for r in f.records() if r.kind_name == 'lowrank-mixed'))"],
                              work)
    return f"exit {code}; coded {out.strip() or first(err)}"


def case_bf16_of_fp32(side, work):
    side.tiny(work)
    code, out, err = side.dcm(work, "encode", "base", "ft-bf16", "-o", "x.dcm", "--method", "delta-come")
    return f"exit {code}; {first(err) or out.strip().splitlines()[0][:150]}"


def case_dcm_rewritten(side, work):
    base, ft = copy_pair(side, work)
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm")
    proc, go = side.paused(work, "decode", "decode", "x.dcm", "--base", base, "-o", "out")
    with open(work / "x.dcm", "r+b") as f:
        f.truncate(4096)
    go.touch()
    _, err = proc.communicate()
    left = sum(p.stat().st_size for p in work.rglob("*") if ".dcm-tmp-" in str(p) or ".out.tmp-" in str(p)
               if p.is_file())
    return f"exit {proc.returncode}; {left} bytes of temporaries left; {first(err)}"


def _signal_case(side, work, sig, where="encode"):
    base, ft = copy_pair(side, work)
    if where == "encode":
        proc, go = side.paused(work, "encode", "encode", base, ft, "-o", "x.dcm")
    else:
        side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm")
        proc, go = side.paused(work, "decode", "decode", "x.dcm", "--base", base, "-o", "out")
    proc.send_signal(sig)
    _, err = proc.communicate()
    left = [work / name for name in hidden(work)]
    size = sum(p.stat().st_size for p in left if p.is_file())
    size += sum(q.stat().st_size for p in left if p.is_dir() for q in p.rglob("*") if q.is_file())
    return f"exit {proc.returncode}; {len(left)} temporaries ({size} bytes) left; {first(err)}"


def case_sigterm_encode(side, work):
    return _signal_case(side, work, signal.SIGTERM)


def case_sighup_decode(side, work):
    return _signal_case(side, work, signal.SIGHUP, "decode")


def case_sigkill_then_rerun(side, work):
    base, ft = copy_pair(side, work)
    proc, go = side.paused(work, "encode", "encode", base, ft, "-o", "x.dcm")
    proc.kill()
    proc.communicate()
    before = len(hidden(work))
    code, _, err = side.dcm(work, "encode", base, ft, "-o", "x.dcm")
    return f"rerun exit {code}; temporaries {before} -> {len(hidden(work))}; {first(err) or '(nothing said)'}"


def case_closed_file(side, work):
    side.tiny(work)
    code, out, err = side.run(["-c", "import dcm; dcm.encode('base', 'ft', 'x.dcm'); f = dcm.open('x.dcm'); "
                               "f.close(); f.check_payload(f.keys()[0])"], work)
    return f"exit {code}; {first(err)}"


def case_base_as_list(side, work):
    side.tiny(work)
    code, _, err = side.run(["-c", "import dcm; dcm.encode(['base'], 'ft', 'x.dcm')"], work)
    return f"exit {code}; {first(err)}"


def case_recipe_lossless(side, work):
    side.tiny(work)
    code, _, err = side.dcm(work, "encode", "base", "ft", "-o", "x.dcm", "--recipe", "8:2")
    return f"exit {code}; {first(err)}"


def case_include_lossless(side, work):
    side.tiny(work)
    code, _, err = side.dcm(work, "encode", "base", "ft", "-o", "x.dcm", "--include", "*q*")
    return f"exit {code}; {first(err) or 'accepted, ignored'}"


def case_config_as_base(side, work):
    side.tiny(work)
    code, _, err = side.dcm(work, "encode", "base/config.json", "ft", "-o", "x.dcm")
    return f"exit {code}; {first(err)}"


def case_dcm_as_base(side, work):
    side.tiny(work)
    side.dcm(work, "-q", "encode", "base", "ft", "-o", "x.dcm")
    code, _, err = side.dcm(work, "decode", "x.dcm", "--base", "x.dcm", "-o", "out")
    return f"exit {code}; {first(err)}"


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and os.geteuid() == 0


def _in_namespace(side, work, mount_opts, args):
    """dcm in a private mount namespace where work/out is a small tmpfs."""
    (work / "out").mkdir()
    cmd = (f"mount -t tmpfs -o {mount_opts} tmpfs {shlex.quote(str(work / 'out'))} && exec "
           + " ".join(map(shlex.quote, side.python + ["-m", "dcm.cli", *map(str, args)])))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=work, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stderr


def case_disk_full(side, work):
    if not _can_unshare():
        return "skipped (needs unshare as root)"
    base, ft = copy_pair(side, work)
    got = _in_namespace(side, work, "size=8m", ["encode", base, ft, "-o", work / "out" / "x.dcm"])
    return f"exit {got[0]}; {first(got[1])}"


def case_read_only(side, work):
    if not _can_unshare():
        return "skipped (needs unshare as root)"
    base, ft = copy_pair(side, work)
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm")
    got = _in_namespace(side, work, "size=8m,ro", ["decode", "x.dcm", "--base", base, "-o", work / "out" / "d"])
    return f"exit {got[0]}; {first(got[1])}"


def case_wrong_dtype_base(side, work):
    side.tiny(work)
    side.dcm(work, "-q", "encode", "ft", "ft", "-o", "x.dcm")
    code, _, err = side.run(["-c", "import dcm, numpy as np; f = dcm.open('x.dcm'); "
                             "f.tensor('a.key.weight', np.zeros((64, 64), np.float64))"], work)
    return f"exit {code}; {first(err)}"


def case_negative_ratio(side, work):
    side.tiny(work)
    code, _, err = side.dcm(work, "encode", "base", "ft", "-o", "x.dcm", "--method", "delta-come", "--ratio", "-1/16")
    return f"exit {code}; {first(err.splitlines()[-1] if err else '')}"


def case_mistyped_option(side, work):
    side.tiny(work)
    code, _, err = side.dcm(work, "encode", "base", "ft", "-o", "x.dcm", "--ratoi", "1/16")
    return f"exit {code}; {first(err)[:60]} ... {err.strip().splitlines()[-1][:80]}"


def case_lossy_summary(side, work):
    base, ft = copy_pair(side, work)
    code, out, err = side.dcm(work, "encode", base, ft, "-o", "x.dcm", "--method", "dare")
    lines = out.strip().splitlines()
    return f"exit {code}; {' | '.join(line.strip()[:110] for line in lines[:2])}"


def case_lossy_decode_note(side, work):
    base, ft = copy_pair(side, work)
    side.dcm(work, "-q", "encode", base, ft, "-o", "x.dcm", "--method", "dare")
    code, out, _ = side.dcm(work, "decode", "x.dcm", "--base", base, "-o", "out")
    return f"exit {code}; {'says approximate' if 'approximate' in out else 'nothing about approximation'}"


def case_training_state(side, work):
    base, ft = copy_pair(side, work)
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth"):
        (ft / name).write_bytes(b"PK\x03\x04")
    code, _, err = side.dcm(work, "encode", base, ft, "-o", "x.dcm")
    lines = [line for line in err.splitlines() if line]
    return f"exit {code}; {len(lines)} warning lines; {first(err)}"


def case_info_corrupt(side, work):
    side.tiny(work)
    side.dcm(work, "-q", "encode", "base", "ft", "-o", "x.dcm")
    data = bytearray((work / "x.dcm").read_bytes())
    data[-100] ^= 0xFF
    (work / "x.dcm").write_bytes(bytes(data))
    code, out, _ = side.dcm(work, "info", "x.dcm")
    said = "says payloads not checked" if "not checked" in out else "nothing said about payloads"
    return f"exit {code}; {said}"


def case_missing_parent(side, work):
    side.tiny(work)
    side.dcm(work, "-q", "encode", "base", "ft", "-o", "x.dcm")
    e = side.dcm(work, "encode", "base", "ft", "-o", "no/such/x.dcm")
    d = side.dcm(work, "decode", "x.dcm", "--base", "base", "-o", "no2/such/d")
    return f"encode exit {e[0]}, decode exit {d[0]} ({'created no2/such' if (work / 'no2').exists() else 'nothing created'})"


CASES = [
    ("1 decode -o BASE --overwrite", case_decode_overwrite_base),
    ("1 decode -o . --overwrite (in a project)", case_decode_overwrite_cwd),
    ("2 encode -o BASE/model.safetensors --overwrite", case_encode_over_base_weights),
    ("3 two encodes to one new path", case_two_encodes),
    ("4 encode -o FIFO --overwrite", case_overwrite_fifo),
    ("5 dcm.encode(include='*query*')", case_include_string),
    ("6 delta-come, bf16 fine-tune of an fp32 base", case_bf16_of_fp32),
    ("7 .dcm truncated while decode reads it", case_dcm_rewritten),
    ("8 SIGTERM during encode", case_sigterm_encode),
    ("8 SIGHUP during decode", case_sighup_decode),
    ("8 SIGKILL during encode, then run again", case_sigkill_then_rerun),
    ("9 read from a closed dcm.open file", case_closed_file),
    ("9 dcm.encode with the base as a list", case_base_as_list),
    ("12 --recipe with lossless", case_recipe_lossless),
    ("12 --include with lossless", case_include_lossless),
    ("13 config.json as the base", case_config_as_base),
    ("13 a .dcm as --base", case_dcm_as_base),
    ("14 encode onto a full 8 MB filesystem", case_disk_full),
    ("14 decode onto a read-only filesystem", case_read_only),
    ("15 f.tensor() with a float64 base array", case_wrong_dtype_base),
    ("15 --ratio -1/16", case_negative_ratio),
    ("15 --ratoi (mistyped option)", case_mistyped_option),
    ("16 lossy encode summary", case_lossy_summary),
    ("16 decode of a lossy file", case_lossy_decode_note),
    ("17 fine-tune dir with optimizer.pt etc.", case_training_state),
    ("19 dcm info on a corrupt payload", case_info_corrupt),
    ("19 missing output parent, encode vs decode", case_missing_parent),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="interpreter command line of the old dcm")
    parser.add_argument("--after", default=sys.executable, help="interpreter command line of the new dcm")
    parser.add_argument("--pair", type=Path, default=ROOT / "data" / "real", help="dir with base/ and finetune/")
    parser.add_argument("-k", default="", help="run only cases whose label contains this")
    args = parser.parse_args()
    sides = {"before": Side(args.before, args.pair), "after": Side(args.after, args.pair)}
    print("| # case | before | after |\n|---|---|---|")
    for label, fn in CASES:
        if args.k not in label:
            continue
        cells = []
        for name, side in sides.items():
            with tempfile.TemporaryDirectory(prefix="dcm-case-") as tmp:
                try:
                    cells.append(fn(side, Path(tmp)))
                except Exception as e:  # noqa: BLE001 - a case that breaks is reported, not fatal
                    cells.append(f"case failed: {e!r}"[:150])
        print(f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
