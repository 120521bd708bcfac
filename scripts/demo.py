#!/usr/bin/env python3
"""The main job, end to end on the default real pair (data/real/, see fetch_real_pair.py).

    dcm encode  -> out/demo/finetune.dcm        (method lossless)
    dcm info    -> what the file holds
    dcm decode  -> out/demo/decoded/            (a Hugging Face model directory)
    dcm verify  -> checksums and the base

then checks every tensor of the decoded checkpoint against the fine-tune, byte
for byte (per-tensor table in out/demo/tensors.tsv), loads the decoded
directory with ``transformers.AutoModel.from_pretrained`` (offline) and with
``safetensors``, compares outputs of a forward pass with the fine-tune's, and
prints sizes, bits per parameter, ratios and timings (also saved to
out/demo/summary.json).  Then the lossy methods through the same CLI:
delta-come at 1/16 and 1/32, and impart, impart-qt, lowrank, dare and
bitdelta at 1/16, each checked within its budget (``dcm info --json``),
decoded, verified against the base and loaded in transformers.

The dcm steps run the real ``dcm`` command-line tool in subprocesses.
Exits non-zero if any step or check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

import dcm  # noqa: E402
from dcm.checkpoint import Checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


class Failed(Exception):
    pass


def dcm_command() -> list[str]:
    """The installed ``dcm`` console script (next to this interpreter), else ``python -m dcm``."""
    beside = Path(sys.executable).parent / "dcm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("dcm")
    return [found] if found else [sys.executable, "-m", "dcm"]


def run(step: str, args: list[str], *, expect: int = 0, show=print) -> tuple[float, str]:
    """Run ``dcm ARGS``; return (seconds, stdout).  An exit code other than ``expect`` fails the demo."""
    cmd = dcm_command() + args
    print(f"\n$ dcm {shlex.join(_short(a) for a in args)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if show and proc.stdout.strip():
        show(proc.stdout.rstrip())
    if proc.returncode != expect:
        if proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr)
        raise Failed(f"dcm {step} exited {proc.returncode}, expected {expect}")
    if expect and proc.stderr.strip():
        print(proc.stderr.strip().splitlines()[-1])
    print(f"[{step}: exit {proc.returncode}{' as expected' if expect else ''}, {seconds:.2f} s]")
    return seconds, proc.stdout


def _short(arg: str) -> str:
    """Paths inside the repository, shown relative to it."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return arg


def _show_info(text: str) -> None:
    """dcm info prints one line per tensor: show its head and totals, keep the rest in a file."""
    lines = text.splitlines()
    try:
        first_table = next(i for i, line in enumerate(lines) if line.startswith("tensor "))
        totals = next(i for i, line in enumerate(lines) if line.startswith("kind "))
    except StopIteration:
        print(text)
        return
    print("\n".join(lines[:first_table + 5]))
    print(f"... ({totals - first_table - 5} more lines: per-tensor records and attachments)")
    print("\n".join(lines[totals:]))


def refusals(dcm_path: Path, base: Path, ft: Path, out: Path) -> None:
    """The documented exit codes on a wrong base (5) and on a corrupted file (4)."""
    run("verify (wrong base)", ["verify", str(dcm_path), "--base", str(ft)], expect=5)
    damaged = out / "damaged.dcm"
    shutil.copyfile(dcm_path, damaged)
    with dcm.open(dcm_path) as f:  # flip one bit in the middle of the largest payload
        rec = max(f.records(), key=lambda r: r.payload_bytes)
        blob = max(rec.blobs, key=lambda b: b["length"])
        offset = f.header.data_start + blob["offset"] + blob["length"] // 2
    with open(damaged, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))
    run("verify (corrupted)", ["verify", str(damaged)], expect=4)
    run("decode (output exists)", ["decode", str(dcm_path), "--base", str(base), "-o", str(out / "decoded")],
        expect=2)
    damaged.unlink()


def file_bytes(path: Path) -> int:
    """Bytes of a checkpoint's weight files (a directory's *.safetensors + index) or of a file."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir()
               if p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json"))


# --- checks ------------------------------------------------------------------------


def bit_exact(ft_dir: Path, decoded_dir: Path, dcm_path: Path, table_path: Path) -> int:
    """Every tensor of the decoded checkpoint against the fine-tune's raw bytes; returns the count."""
    rows, bad = [], []
    with Checkpoint(ft_dir) as ft, Checkpoint(decoded_dir) as dec, dcm.open(dcm_path) as f:
        ft_names, dec_names = ft.names(), dec.names()
        if sorted(ft_names) != sorted(dec_names):
            missing = sorted(set(ft_names) - set(dec_names))
            extra = sorted(set(dec_names) - set(ft_names))
            raise Failed(f"decoded tensor names differ: missing {missing}, extra {extra}")
        for name in ft_names:
            a, b = ft.info(name), dec.info(name)
            same = (a.dtype, a.shape) == (b.dtype, b.shape) and ft.read(name).tobytes() == dec.read(name).tobytes()
            if not same:
                bad.append(name)
            rec = f.record(name)
            numel = max(int(np.prod(a.shape)), 1)
            rows.append((name, a.dtype, "x".join(map(str, a.shape)) or "scalar", rec.kind_name,
                         a.nbytes, rec.payload_bytes, 8 * rec.payload_bytes / numel, same))
    rows.sort(key=lambda r: -r[4])
    with open(table_path, "w") as out:
        out.write("tensor\tdtype\tshape\trecord\tfinetune_bytes\tstored_bytes\tbits_per_param\tbit_exact\n")
        for r in rows:
            out.write("\t".join(map(str, r[:6])) + f"\t{r[6]:.3f}\t{'yes' if r[7] else 'NO'}\n")
    print(f"\nper-tensor table: {len(rows)} lines in {table_path.relative_to(ROOT)} (largest first):")
    print(f"  {'tensor':48} {'dtype':5} {'shape':>11} {'record':11} {'bits/param':>10}  exact")
    for r in rows[:5]:
        print(f"  {r[0]:48} {r[1]:5} {r[2]:>11} {r[3]:11} {r[6]:>10.2f}  {'yes' if r[7] else 'NO'}")
    print(f"  ... {len(rows) - 5} more")
    if bad:
        raise Failed(f"{len(bad)} of {len(rows)} tensors are not bit-exact: {bad[:5]}")
    print(f"bit-exact: {len(rows)}/{len(rows)} tensors")
    return len(rows)


def check_info(d: dict, dcm_path: Path) -> None:
    """``dcm info --json`` agrees with the file and with ``dcm.open``."""
    text = json.dumps(d)
    with dcm.open(dcm_path) as f:
        digest, method, count = f.metadata()["base_digest"], f.metadata()["method"], len(f.records())
    for what, value in (("base digest", digest), ("method", method),
                        ("file size", str(dcm_path.stat().st_size))):
        if value not in text:
            raise Failed(f"dcm info --json does not show the {what} {value}")
    print(f"[info --json: parsed; shows method {method!r}, the base digest, "
          f"the file size; {count} records in the file]")


def load_checks(ft_dir: Path, decoded_dir: Path) -> None:
    """The decoded directory loads with safetensors and transformers and computes what the fine-tune does."""
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file

    def raw(t):
        return t.view(torch.uint8) if t.is_floating_point() else t

    decoded_sd = {}
    for shard in sorted(decoded_dir.glob("*.safetensors")):  # one file, or the shards of a large model
        decoded_sd.update(load_file(str(shard)))
    names = []
    for shard in sorted(ft_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                names.append(name)
                want, got = f.get_tensor(name), decoded_sd.get(name)
                if got is None or got.dtype != want.dtype or not torch.equal(raw(got), raw(want)):
                    raise Failed(f"safetensors: tensor {name!r} differs from the fine-tune")
    if len(decoded_sd) != len(names):
        raise Failed(f"safetensors: decoded has {len(decoded_sd)} tensors, the fine-tune {len(names)}")
    print(f"safetensors: load_file(decoded) -> {len(decoded_sd)} tensors, all equal to the fine-tune's")

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    decoded = transformers.AutoModel.from_pretrained(str(decoded_dir)).eval()
    original = transformers.AutoModel.from_pretrained(str(ft_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(decoded_dir))
    batch = tokenizer(["dcm stores the fine-tune as a delta against its base.",
                       "Decoding gives back the fine-tuned weights bit for bit."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        got = decoded(**batch).last_hidden_state
        want = original(**batch).last_hidden_state
    if not torch.equal(got, want):
        raise Failed(f"transformers: outputs differ, max |diff| {float((got - want).abs().max())}")
    params = sum(p.numel() for p in decoded.parameters())
    print(f"transformers: AutoModel.from_pretrained(decoded) -> {type(decoded).__name__}, "
          f"{params:,} parameters; last_hidden_state{list(got.shape)} identical to the fine-tune's")


def lossy(base: Path, ft: Path, out: Path, ratio: str, method: str = "delta-come") -> dict:
    """``dcm encode --method METHOD --ratio R``: its lossy records within R·16 bits per
    parameter by ``dcm info --json``, and the decoded directory loads in transformers."""
    import torch
    import transformers

    tag = f"{method}-{ratio.replace('/', '-')}"
    path, decoded = out / f"{tag}.dcm", out / f"decoded-{tag}"
    enc_s, _ = run(f"encode {method} {ratio}", ["encode", str(base), str(ft), "-o", str(path),
                                                 "--method", method, "--ratio", ratio])
    _, js = run("info --json", ["info", "--json", str(path)], show=None)
    c = json.loads(js)["totals"]["compressed"]
    limit = 16 * float(Fraction(ratio))
    if c["bits_per_param"] > limit:
        raise Failed(f"{method} {ratio}: {c['bits_per_param']:.4f} bits per compressed parameter > {limit}")
    run("decode", ["decode", str(path), "--base", str(base), "-o", str(decoded)])
    run("verify", ["verify", str(path), "--base", str(base)])
    model = transformers.AutoModel.from_pretrained(str(decoded)).eval()
    original = transformers.AutoModel.from_pretrained(str(ft)).eval()
    starting = transformers.AutoModel.from_pretrained(str(base)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(decoded))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want, was = (m(**batch).last_hidden_state for m in (model, original, starting))
    kept = 1 - float((got - want).norm() / (was - want).norm())
    print(f"{method} {ratio}: {c['records']} matrices, {c['bytes']:,} bytes = {c['bits_per_param']:.4f} bits "
          f"per compressed parameter (limit {limit:g}); file {path.stat().st_size:,} bytes; "
          f"loads in transformers; hidden states keep {kept:.4f} of the fine-tune's change; encode {enc_s:.1f} s")
    return {"method": method, "ratio": ratio, "compressed_bits_per_param": c["bits_per_param"], "file_bytes": path.stat().st_size,
            "hidden_state_gain": kept, "encode_seconds": enc_s}


SENTENCES = ["dcm stores the fine-tune as a delta against its base.",
             "Return the number of items in a container.",
             "Open the file and return a corresponding file object.",
             "Raise an exception if the connection is closed before the reply arrives."]


# --- main --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "data" / "real" / "base")
    parser.add_argument("--finetune", type=Path, default=ROOT / "data" / "real" / "finetune")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    base, ft, out = args.base.absolute(), args.finetune.absolute(), args.out.absolute()

    if (base, ft) == ((ROOT / "data/real/base").absolute(), (ROOT / "data/real/finetune").absolute()) \
            and not ((base / "model.safetensors").is_file() and (ft / "model.safetensors").is_file()):
        print("demo: the real pair is missing; fetching it")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import fetch_real_pair
        fetch_real_pair.main([])

    dcm_path, decoded = out / "finetune.dcm", out / "decoded"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    try:
        print(f"demo: base {base}\ndemo: fine-tune {ft}\ndemo: dcm command: {shlex.join(dcm_command())}")
        enc_s, _ = run("encode", ["encode", str(base), str(ft), "-o", str(dcm_path), "--method", "lossless"])
        _, text = run("info", ["info", str(dcm_path)], show=_show_info)
        (out / "info.txt").write_text(text)
        _, js = run("info --json", ["info", "--json", str(dcm_path)], show=None)
        (out / "info.json").write_text(js)
        check_info(json.loads(js), dcm_path)
        dec_s, _ = run("decode", ["decode", str(dcm_path), "--base", str(base), "-o", str(decoded)])
        run("verify", ["verify", str(dcm_path), "--base", str(base)])
        refusals(dcm_path, base, ft, out)

        tensors = bit_exact(ft, decoded, dcm_path, out / "tensors.tsv")
        print()
        load_checks(ft, decoded)

        with Checkpoint(ft) as c:
            params = sum(int(np.prod(c.info(n).shape)) for n in c.names())
            ft_tensor_bytes = sum(c.info(n).nbytes for n in c.names())
        sizes = {"base": file_bytes(base), "finetune": file_bytes(ft), "dcm": dcm_path.stat().st_size}
        summary = {
            "tensors": tensors,
            "params": params,
            "base_bytes": sizes["base"],
            "finetune_bytes": sizes["finetune"],
            "finetune_tensor_bytes": ft_tensor_bytes,
            "dcm_bytes": sizes["dcm"],
            "bits_per_param": 8 * sizes["dcm"] / params,
            "ratio_vs_16bit_delta": 2 * params / sizes["dcm"],
            "ratio_vs_finetune": sizes["finetune"] / sizes["dcm"],
            "encode_seconds": enc_s,
            "decode_seconds": dec_s,
        }
        print("\n=== delta-come (lossy): the same pair at 1/16 and 1/32 ===")
        summary["delta_come"] = [lossy(base, ft, out, r) for r in ("1/16", "1/32")]
        print("\n=== impart, impart-qt and the baselines at 1/16 (same container, same budget) ===")
        summary["other_methods"] = [lossy(base, ft, out, "1/16", m)
                                    for m in ("impart", "impart-qt", "lowrank", "dare", "bitdelta")]
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\n=== summary (lossless) ===")
        print(f"base checkpoint         {sizes['base']:>12,} bytes ({sizes['base'] / MIB:.1f} MiB)")
        print(f"fine-tune checkpoint    {sizes['finetune']:>12,} bytes ({sizes['finetune'] / MIB:.1f} MiB), "
              f"{params:,} parameters in {tensors} tensors")
        print(f".dcm file               {sizes['dcm']:>12,} bytes ({sizes['dcm'] / MIB:.1f} MiB)")
        print(f"bits per parameter      {summary['bits_per_param']:>12.2f}")
        print(f"ratio vs 16-bit delta   {summary['ratio_vs_16bit_delta']:>12.2f}x  (2 bytes x {params:,} params)")
        print(f"ratio vs fine-tune      {summary['ratio_vs_finetune']:>12.2f}x")
        print(f"encode                  {enc_s:>12.2f} s  (dcm encode, whole process)")
        print(f"decode                  {dec_s:>12.2f} s  (dcm decode, whole process)")
        print(f"bit-exact               {tensors:>9}/{tensors} tensors")
        print(f"\ndemo: OK (outputs in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
        return 0
    except Failed as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
