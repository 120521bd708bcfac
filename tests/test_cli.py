"""The dcm command line, run in-process through ``dcm.cli.main`` (one subprocess test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dcm
from conftest import assert_same_tensors, read_attachments, read_checkpoint, write_checkpoint
from dcm.cli import main, parse_size
from dcm.constants import HEADER_SIZE
from dcm.errors import EXIT_CODES


def pair_tensors(seed: int = 3):
    """F32 / BF16 (uint16 bits) / I64 deltas, one tensor only in the base, one only in the fine-tune."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w_ft = w + np.float32(1e-3) * rng.standard_normal((8, 4)).astype(np.float32)
    bf = (rng.standard_normal(16).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bf_ft = bf.copy()
    bf_ft[::5] += 1
    pos = np.arange(6, dtype=np.int64)
    base = {"layer.weight": ("F32", w), "layer.bias": ("BF16", bf), "position_ids": ("I64", pos),
            "pooler.dense": ("F32", rng.standard_normal(5).astype(np.float32))}
    ft = {"layer.weight": ("F32", w_ft), "layer.bias": ("BF16", bf_ft), "position_ids": ("I64", pos.copy()),
          "head.weight": ("F32", rng.standard_normal((3, 4)).astype(np.float32))}
    return base, ft


ATTACHMENTS = {"config.json": b'{"model_type": "bert"}\n', "tokenizer/vocab.txt": b"[PAD]\n[UNK]\n"}


@pytest.fixture
def pair(tmp_path):
    base, ft = pair_tensors()
    base_dir = write_checkpoint(tmp_path / "base", base)
    ft_dir = write_checkpoint(tmp_path / "ft", ft, attachments=ATTACHMENTS)
    return base_dir, ft_dir, base, ft


@pytest.fixture
def encoded(tmp_path, pair, capsys):
    base_dir, ft_dir, base, ft = pair
    out = tmp_path / "x.dcm"
    assert main(["-q", "encode", str(base_dir), str(ft_dir), "-o", str(out)]) == 0
    capsys.readouterr()
    return out, base_dir, base, ft


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the round trip ----------------------------------------------------------------


def test_round_trip(tmp_path, pair, capsys):
    base_dir, ft_dir, base, ft = pair
    out = tmp_path / "x.dcm"
    code, stdout, err = run(capsys, "encode", base_dir, ft_dir, "-o", out)
    assert code == 0, err
    assert str(out) in stdout and str(out.stat().st_size) in stdout and "bits/param" in stdout
    assert "16-bit dense" in stdout

    code, stdout, err = run(capsys, "info", out)
    assert code == 0, err
    for name in ft:
        assert name in stdout
    assert "pooler.dense" in stdout and "removed" in stdout and "config.json" in stdout

    code, stdout, err = run(capsys, "info", out, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    t = d["totals"]
    file_bytes = out.stat().st_size
    params = sum(np.asarray(a).size for _, a in ft.values())
    assert t["file_bytes"] == file_bytes and t["params"] == params and t["records"] == 5
    assert t["bits_per_param"] == pytest.approx(8 * file_bytes / params)
    assert t["ratio_vs_dense16"] == pytest.approx(file_bytes / (2 * params))
    assert t["ratio_vs_dense16_str"].startswith("1/") or t["ratio_vs_dense16_str"].endswith("x")
    record_totals = sum(r["total_bytes"] for r in d["records"])
    assert record_totals <= file_bytes
    assert (HEADER_SIZE + t["index_other_bytes"] + record_totals + t["attachment_stored_bytes"]
            + t["padding_bytes"]) == file_bytes
    assert {a["name"] for a in d["attachments"]} == set(ATTACHMENTS)

    decoded = tmp_path / "decoded"
    code, stdout, err = run(capsys, "decode", out, "--base", base_dir, "-o", decoded)
    assert code == 0, err
    assert str(decoded) in stdout
    assert_same_tensors(read_checkpoint(decoded), ft)
    assert read_attachments(decoded) == ATTACHMENTS

    code, stdout, err = run(capsys, "verify", out)
    assert code == 0, err
    assert stdout.startswith("OK ") and "base not checked" in stdout
    code, stdout, err = run(capsys, "verify", out, "--base", base_dir)
    assert code == 0, err
    assert stdout.startswith("OK ") and "base checked" in stdout


def test_quiet_before_and_after_subcommand(encoded, capsys, tmp_path):
    out, base_dir, *_ = encoded
    assert run(capsys, "-q", "verify", out) == (0, "", "")
    assert run(capsys, "verify", out, "--quiet") == (0, "", "")
    assert run(capsys, "decode", out, "--base", base_dir, "-o", tmp_path / "d", "-q") == (0, "", "")


def test_decode_max_shard_size(encoded, capsys, tmp_path):
    out, base_dir, _, ft = encoded
    decoded = tmp_path / "sharded"
    code, _, err = run(capsys, "-q", "decode", out, "--base", base_dir, "-o", decoded, "--max-shard-size", "100")
    assert code == 0, err
    assert (decoded / "model.safetensors.index.json").is_file()
    assert_same_tensors(read_checkpoint(decoded), ft)


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("5gb") == 5 * 10**9
    assert parse_size("1.5KiB") == 1536
    for bad in ("", "MB", "5XB", "-1", "0"):
        with pytest.raises(Exception):
            parse_size(bad)


def test_bad_shard_size_is_usage_error(encoded, capsys, tmp_path):
    out, base_dir, *_ = encoded
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", tmp_path / "d", "--max-shard-size", "lots")
    assert code == 2 and "invalid size" in err


def test_skipped_attachment_warning(tmp_path, pair, capsys):
    base_dir, ft_dir, *_ = pair
    (ft_dir / "pytorch_model.bin").write_bytes(b"\0" * 16)
    code, _, err = run(capsys, "-q", "encode", base_dir, ft_dir, "-o", tmp_path / "w.dcm")
    assert code == 0
    assert "warning" in err and "pytorch_model.bin" in err


# --- errors and exit codes ---------------------------------------------------------


def test_wrong_base_exit_5(encoded, capsys, tmp_path):
    out, _, base, _ = encoded
    bad = dict(base)
    w = base["layer.weight"][1].copy()
    w[0, 0] = -w[0, 0]
    bad["layer.weight"] = ("F32", w)
    bad_dir = write_checkpoint(tmp_path / "bad", bad)
    code, _, err = run(capsys, "verify", out, "--base", bad_dir)
    assert code == 5
    assert err.startswith("dcm: error: ") and "layer.weight" in err and "Traceback" not in err
    code, _, err = run(capsys, "decode", out, "--base", bad_dir, "-o", tmp_path / "d")
    assert code == 5 and "layer.weight" in err
    assert not (tmp_path / "d").exists()


def test_corrupt_payload_exit_4(encoded, capsys):
    out, *_ = encoded
    with dcm.open(out) as f:
        rec = f.record("layer.weight")
        pos = f.header.data_start + rec.blobs[0]["offset"]
    data = bytearray(out.read_bytes())
    data[pos] ^= 0x01
    out.write_bytes(bytes(data))
    assert run(capsys, "info", out)[0] == 0  # info reads no payload
    code, _, err = run(capsys, "verify", out)
    assert code == 4 and "layer.weight" in err and "CRC" in err


def test_truncated_exit_3(encoded, capsys):
    out, *_ = encoded
    out.write_bytes(out.read_bytes()[:-7])
    for cmd in ("info", "verify"):
        code, _, err = run(capsys, cmd, out)
        assert code == 3 and err.startswith("dcm: error: ")


def test_bad_magic_exit_3(encoded, capsys):
    out, *_ = encoded
    out.write_bytes(b"NOTADCM!" + out.read_bytes()[8:])
    code, _, err = run(capsys, "verify", out)
    assert code == 3 and "magic" in err


def test_nonzero_padding_fails_verify(encoded, capsys):
    out, *_ = encoded
    with dcm.open(out) as f:
        index_end, data_start = HEADER_SIZE + f.header.index_length, f.header.data_start
        gaps = [(index_end, data_start)]
        blobs = [b for r in f.records() for b in r.blobs]
        gaps += [(data_start + a["offset"] + a["length"], data_start + b["offset"]) for a, b in zip(blobs, blobs[1:])]
    lo = next(lo for lo, hi in gaps if hi > lo)
    data = bytearray(out.read_bytes())
    data[lo] = 0x5A
    out.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", out)
    assert code == 3 and "padding" in err


def test_output_exists_exit_2(encoded, pair, capsys, tmp_path):
    out, base_dir, *_ = encoded
    _, ft_dir, *_ = pair
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", out)
    assert code == 2 and "exists" in err
    assert run(capsys, "-q", "encode", base_dir, ft_dir, "-o", out, "--overwrite")[0] == 0
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", target)
    assert code == 2 and "exists" in err
    assert (target / "keep.txt").read_text() == "x"
    # --overwrite replaces only a directory dcm wrote (test_safety.py has the cases)
    code, _, err = run(capsys, "decode", out, "--base", base_dir, "-o", target, "--overwrite")
    assert code == 2 and "did not write" in err and (target / "keep.txt").read_text() == "x"
    decoded = tmp_path / "decoded"
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", decoded)[0] == 0
    assert run(capsys, "-q", "decode", out, "--base", base_dir, "-o", decoded, "--overwrite")[0] == 0


def test_ratio_with_lossless_exit_2(pair, capsys, tmp_path):
    base_dir, ft_dir, *_ = pair
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "r.dcm", "--ratio", "1/16")
    assert code == 2 and "ratio" in err
    assert not (tmp_path / "r.dcm").exists()


def test_unknown_method_and_bad_level_exit_2(pair, capsys, tmp_path):
    base_dir, ft_dir, *_ = pair
    assert run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "a.dcm", "--method", "nope")[0] == 2
    assert run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "a.dcm", "--zstd-level", "99")[0] == 2


def test_usage_errors_exit_2(capsys):
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "decode", "x.dcm")  # --base and -o missing
    assert code == 2 and "required" in err


def test_missing_paths_exit_3(tmp_path, pair, capsys):
    base_dir, ft_dir, *_ = pair
    missing = tmp_path / "nope.dcm"
    for argv in (["info", missing], ["verify", missing], ["decode", missing, "--base", base_dir, "-o", tmp_path / "o"],
                 ["encode", tmp_path / "nobase", ft_dir, "-o", tmp_path / "n.dcm"]):
        code, _, err = run(capsys, *argv)
        assert code == 3, (argv, err)
        assert err.startswith("dcm: error: ") and "Traceback" not in err
    # A missing output folder is an output-side error (6), the same for encode and decode (test_safety.py)
    code, _, err = run(capsys, "encode", base_dir, ft_dir, "-o", tmp_path / "no" / "such" / "dir.dcm")
    assert code == 6 and "does not exist" in err


def test_directory_as_dcm_exit_3(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path)
    assert code == 3 and str(tmp_path) in err


def test_keyboard_interrupt_exit_130(encoded, capsys, monkeypatch):
    out, *_ = encoded

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    # dcm.verify is the function (exported by the package); patch the module's attribute.
    monkeypatch.setattr(sys.modules["dcm.verify"], "verify", interrupted)
    code, _, err = run(capsys, "verify", out)
    assert code == 130 and "interrupted" in err


def test_hostile_tensor_name_not_printed_raw(tmp_path, capsys):
    name = "w\x1b]0;owned\x07"
    out = tmp_path / "h.dcm"
    dcm.encode(write_checkpoint(tmp_path / "b", {name: ("F32", np.zeros(3, np.float32))}),
               write_checkpoint(tmp_path / "f", {name: ("F32", np.ones(3, np.float32))}), out)
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "\x1b" not in stdout and "\x07" not in stdout
    code, stdout, _ = run(capsys, "info", out, "--json")
    assert code == 0 and "\x1b" not in stdout and json.loads(stdout)["records"][0]["name"] == name


def test_version(capsys):
    code, stdout, _ = run(capsys, "--version")
    assert code == 0 and stdout.strip() == f"dcm {dcm.__version__}"


def test_help_subprocess_lists_exit_codes():
    env = dict(os.environ, COLUMNS="100")
    proc = subprocess.run([sys.executable, "-m", "dcm.cli", "--help"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for sub in ("encode", "decode", "info", "verify"):
        assert sub in proc.stdout
    for code, meaning in EXIT_CODES.items():
        assert f"{code}" in proc.stdout and meaning in proc.stdout


def test_error_messages_are_escaped(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "x\x1b[2J.dcm")
    assert code == 3 and "\x1b" not in err and "\\x1b[2J" in err
