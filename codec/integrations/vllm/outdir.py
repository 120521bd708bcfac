"""Writing an export directory the way every dcm output is written (``dcm.outputs``).

The directory is filled in a hidden temporary beside the output and moved into place
only when complete, so a failure leaves nothing; it is never an input, never inside
one, and an existing one is replaced only with ``overwrite`` and only if dcm wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from dcm._version import __version__
from dcm.checkpoint import INDEX_FILE, SINGLE_FILE
from dcm.errors import CheckpointError
from dcm.outputs import Output, write_marker


@contextlib.contextmanager
def export_dir(out_dir, inputs: dict, overwrite: bool, label: str):
    """Yields the temporary directory to fill; on a normal exit it becomes ``out_dir``."""
    output = Output(out_dir, kind="dir", inputs=inputs, overwrite=overwrite)
    tmp = output.temp_dir(label)
    try:
        with output.errors():
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the output gets the usual mode
        yield Path(tmp)
        with output.errors():
            files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if not p.is_dir())
            write_marker(tmp, files, f"dcm {__version__}")
        output.place(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weight_files(base_dir: Path) -> list[str]:
    """The safetensors files (and index) of a model directory, as transformers picks them."""
    if (base_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    index = base_dir / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a readable safetensors index ({e})") from e
        return [INDEX_FILE, *shards]
    raise CheckpointError(f"{base_dir}: directory has neither {SINGLE_FILE} nor {INDEX_FILE}")


def link(target: Path, at: Path) -> None:
    """A symbolic link at ``at`` to the absolute ``target`` (the base's weights are never copied)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.abspath(target), at)
