"""Rebuild the fuzzing seed corpus (fuzz/corpus/) from fixed inputs.

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

import dcm
from dcm.checkpoint import CheckpointWriter, TensorInfo

CORPUS = pathlib.Path(__file__).parent / "corpus"


def write(path, tensors: dict) -> None:
    infos = [TensorInfo(n, dt, a.shape, a.nbytes) for n, (dt, a) in tensors.items()]
    with CheckpointWriter(path, infos) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)


def main() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float16)
    big = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: stored as byte planes
    with tempfile.TemporaryDirectory() as tmp:
        write(f"{tmp}/b", {"w": ("F16", w), "big": ("F32", big), "pos": ("I64", np.arange(3))})
        write(f"{tmp}/f", {"w": ("F16", (w * 1.01).astype(np.float16)),
                           "big": ("F32", big + np.float32(1e-3)), "b": ("F32", np.ones(2, np.float32))})
        pathlib.Path(f"{tmp}/f/config.json").write_text('{"a": 1}')
        CORPUS.mkdir(exist_ok=True)
        dcm.encode(f"{tmp}/b", f"{tmp}/f", CORPUS / "seed-small.dcm", creator="dcm-fuzz-seed",
                   overwrite=True)


if __name__ == "__main__":
    main()
