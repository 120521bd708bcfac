"""Hostile inputs: the saved fuzzing corpus, seeded random mutations, and exhaustive
bit-flip and truncation sweeps of small valid files (issue: no silent mis-decode).

The sweeps decode each damaged file with both decoders, ``dcm`` and the
independent ``spec/reference/dcmref.py``, against the file's real base: each
must reject it or decode exactly what the intact file decodes to.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from dcm.errors import DcmError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))
import harness  # noqa: E402
from test_vectors import MANIFEST, VECTORS_DIR, decode_with_dcm, decode_with_reference, dcmref  # noqa: E402

CORPUS = sorted((ROOT / "fuzz" / "corpus").iterdir())
SWEPT = ["valid/spec-example/vector.dcm", "valid/sign/vector.dcm"]


def run_harness(path: Path, data: bytes) -> None:
    if data and data[-1] & 1:
        data = harness.fix_checksums(data[:-1])
    harness.run_one(path, data)  # raises on anything but a DcmError


def test_corpus_replay(tmp_path):
    assert len(CORPUS) >= 100
    for seed in CORPUS:
        run_harness(tmp_path / "input.dcm", seed.read_bytes())


def mutate(rnd: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(5)
        pos = rnd.randrange(len(data) + 1)
        if op == 0 and data:
            data[pos % len(data)] ^= 1 << rnd.randrange(8)
        elif op == 1 and data:
            data[pos % len(data)] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
        elif op == 2:
            data[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 3:
            del data[pos:pos + rnd.randint(1, 16)]
        else:
            data = data[:pos]
    return bytes(data)


def test_seeded_mutations(tmp_path):
    """A fixed-seed stand-in for the fuzzer that runs everywhere (atheris need not be installed)."""
    rnd = random.Random(6)
    seeds = [(VECTORS_DIR / v["path"]).read_bytes() for v in MANIFEST if v["tier"] != "faulty"
             and v["path"] != "uncommon/alignment-max/vector.dcm"]
    for _ in range(3000):
        data = mutate(rnd, rnd.choice(seeds))
        harness.run_one(tmp_path / "input.dcm", harness.fix_checksums(data) if rnd.random() < 0.5 else data)


def outcome(decoder, path: Path, base: Path):
    """The decoded result, or the code of the error that rejected the file (spec 15)."""
    try:
        return decoder(path, base)
    except (DcmError, dcmref.DcmRefError) as e:
        return e.code


@pytest.mark.parametrize("decoder", [decode_with_dcm, decode_with_reference], ids=["dcm", "reference"])
@pytest.mark.parametrize("vector", SWEPT)
def test_bit_flip_and_truncation_sweep(tmp_path, vector, decoder):
    source = VECTORS_DIR / vector
    base = source.parent / "base.safetensors"
    data = source.read_bytes()
    intact = decoder(source, base)
    path = tmp_path / "damaged.dcm"
    silent = []
    damaged = [(f"bit {i}", data[:i // 8] + bytes([data[i // 8] ^ (1 << i % 8)]) + data[i // 8 + 1:])
               for i in range(8 * len(data))]
    damaged += [(f"truncated to {n}", data[:n]) for n in range(len(data))]
    for what, variant in damaged:
        path.write_bytes(variant)
        result = outcome(decoder, path, base)
        if not isinstance(result, str) and result != intact:
            silent.append(what)
    assert silent == [], f"{len(silent)} silent mis-decodes of {len(damaged)}: {silent[:10]}"


def test_decoders_agree_behind_the_checksums(tmp_path):
    """Every bit flip with the CRCs recomputed: both decoders reject it with the same error, or both
    decode the same file."""
    source = VECTORS_DIR / "valid/spec-example/vector.dcm"
    base = source.parent / "base.safetensors"
    data = source.read_bytes()
    path = tmp_path / "flipped.dcm"
    disagree, accepted = [], 0
    for i in range(8 * len(data)):
        variant = harness.fix_checksums(data[:i // 8] + bytes([data[i // 8] ^ (1 << i % 8)]) + data[i // 8 + 1:])
        path.write_bytes(variant)
        results = [outcome(d, path, base) for d in (decode_with_dcm, decode_with_reference)]
        accepted += not isinstance(results[0], str)
        if results[0] != results[1]:
            disagree.append((i, *(r if isinstance(r, str) else "decoded" for r in results)))
    assert disagree == [], f"decoders disagree on {len(disagree)} flipped bits: {disagree[:20]}"
    assert accepted > 0  # some flips (a code, a scale) make another valid file
