"""A vLLM LoRA resolver serving a directory of .dcm files (route 2, by name).

With the OpenAI server started with ``--enable-lora``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``
and ``DCM_LORA_DIR=/path/to/fine-tunes``, a request whose ``model`` is NAME (not a model
the server already knows) makes vLLM ask its resolvers; this one answers with the
adapter of ``$DCM_LORA_DIR/NAME.dcm``, converted once by ``export_lora`` into a cache
folder keyed by the file's identity (size, mtime, inode), the rank limit and dcm's
version.  Concurrent conversions of one file (several server processes) wait on a lock
and convert once.

Settings (environment): ``DCM_LORA_BASE`` the base model directory (default: the served
model's name, when it is a directory); ``DCM_LORA_CACHE`` the cache (default
``$VLLM_CACHE_ROOT/dcm-lora``, else ``~/.cache/vllm/dcm-lora``); ``DCM_LORA_MAX_RANK``
the rank limit (set it to the server's ``--max-lora-rank`` when a fine-tune's ranks exceed it).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from dcm._version import __version__

from .lora import ADAPTER_CONFIG, export_lora

RESOLVER_NAME = "dcm"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def default_cache() -> Path:
    root = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "vllm")
    return Path(os.environ.get("DCM_LORA_CACHE") or os.path.join(root, "dcm-lora"))


class DcmLoRAResolver(LoRAResolver):
    """``NAME`` -> the LoRA adapter of ``<folder>/NAME.dcm`` (None when there is no such file)."""

    def __init__(self, folder, base: str | None = None, cache=None, max_rank: int | None = None):
        self.folder = Path(folder)
        self.base = base
        self.cache = Path(cache) if cache else default_cache()
        self.max_rank = max_rank
        self.conversions = 0  # adapters this resolver converted (not found in the cache)

    def dcm_path(self, lora_name: str) -> Path | None:
        if not _NAME.fullmatch(lora_name) or ".." in lora_name:
            return None  # never a path outside the folder
        path = self.folder / f"{lora_name}.dcm"
        return path if path.is_file() else None

    def cache_dir(self, path: Path) -> Path:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{self.max_rank}|{__version__}"
        return self.cache / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def adapter(self, lora_name: str, base_model_name: str) -> Path | None:
        """The adapter folder of ``lora_name``, converted now if the cache lacks it (blocking)."""
        path = self.dcm_path(lora_name)
        if path is None:
            return None
        out = self.cache_dir(path)
        if (out / ADAPTER_CONFIG).is_file():
            return out
        base = self.base or base_model_name
        if not os.path.isdir(base):
            raise ValueError(f"dcm resolver: cannot convert {path}: set DCM_LORA_BASE to the base model's "
                             f"directory (the served model {base_model_name!r} is not one)")
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / ADAPTER_CONFIG).is_file():
                export_lora(path, base, out, max_rank=self.max_rank)
                self.conversions += 1
        return out

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        out = await asyncio.to_thread(self.adapter, lora_name, base_model_name)
        if out is None:
            return None
        lora_id = int.from_bytes(hashlib.sha256(str(out).encode()).digest()[:4], "big") % (2**31 - 1) + 1
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(out))


def register_resolver(folder: str) -> DcmLoRAResolver:
    if not os.path.isdir(folder):
        raise ValueError(f"DCM_LORA_DIR={folder!r} is not a directory of .dcm files")
    rank = os.environ.get("DCM_LORA_MAX_RANK")
    resolver = DcmLoRAResolver(folder, os.environ.get("DCM_LORA_BASE") or None, max_rank=int(rank) if rank else None)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    return resolver
