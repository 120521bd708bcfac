"""Coverage-guided fuzzing of the .dcm reader with atheris (libFuzzer).

    pip install atheris
    python fuzz/make_corpus.py                      # seed corpus: the conformance vectors
    python fuzz/fuzz_reader.py -atheris_runs=1000000 -rss_limit_mb=1024 -timeout=10 fuzz/corpus

The invariant (``harness.decode_everything``): ``dcm.open`` plus a full decode
of every record and attachment either raises a ``DcmError`` or returns results
whose sizes match the index.  Any other exception stops the fuzzer, and so do
a hang (``-timeout``) or memory beyond ``-rss_limit_mb``.  The last byte of
an input picks the mode: odd, the CRCs are recomputed first, so the fuzzer
also explores the checks behind the checksums.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["dcm"]):
    import harness

_PATH = os.path.join(tempfile.mkdtemp(prefix="dcm-fuzz-"), "input.dcm")


def test_one_input(data: bytes) -> None:
    if data and data[-1] & 1:
        data = harness.fix_checksums(data[:-1])
    harness.run_one(_PATH, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
