"""Seed the fuzzing corpus (fuzz/corpus/) with the conformance vectors.

    python fuzz/make_corpus.py

Every valid, uncommon and faulty vector of spec/vectors/ is copied in (the
largest, alignment-max, is left out: 128 KiB of padding slows every run).
Each is also added with a trailing 0x01 byte, which makes the harness
recompute its CRCs, so mutations of it reach the checks behind them.
The saved corpus also holds ``found-*``: the inputs a run of 1.2 million
executions added for new coverage (libFuzzer names them by their SHA-1).
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
VECTORS = HERE.parent / "spec" / "vectors"
CORPUS = HERE / "corpus"
MAX_SEED_BYTES = 16384


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    manifest = json.loads((VECTORS / "index.json").read_text())["vectors"]
    count = 0
    for vector in manifest:
        data = (VECTORS / vector["path"]).read_bytes()
        if len(data) > MAX_SEED_BYTES:
            continue
        stem = vector["path"].replace("/vector.dcm", "").replace("/", "-").removesuffix(".dcm")
        (CORPUS / f"{stem}").write_bytes(data + b"\x00")
        (CORPUS / f"{stem}-fixcrc").write_bytes(data + b"\x01")
        count += 2
    print(f"wrote {count} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
