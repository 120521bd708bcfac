"""What every codec method shares: the selection of tensors, the ratio, the file-wide budget.

``get_config`` returns every choice a method made, written to the index as
``method.params`` so a file says exactly how it was made; ``from_config``
rebuilds the method.  Lossy methods apply to the tensors their selection picks
(by default every 2-D float matrix) and leave the rest to ``dense-delta``.
"""

from __future__ import annotations

import fnmatch
from fractions import Fraction

from .. import dtypes
from ..errors import UsageError
from .budget import FileBudget


def parse_ratio(text) -> Fraction:
    """``1/16``, ``0.0625`` or a Fraction -> a ratio in (0, 1]."""
    try:
        ratio = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"ratio {text!r} is not a number like 1/16 or 0.0625") from None
    if not 0 < ratio <= 1:
        raise UsageError(f"ratio {text} must be in (0, 1]")
    return ratio


def str_list(value, what: str) -> list[str]:
    """A list parameter given as one string or a list of strings ('*query*' is one pattern, not 8)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{what} must be a string or a list of strings, got {value!r:.80}")


class Selection:
    """Which tensors a lossy method applies to: 2-D float tensors, narrowed by globs."""

    def __init__(self, include=None, exclude=None):
        self.include = str_list(include, "include")
        self.exclude = str_list(exclude, "exclude")

    def selects(self, name: str, dtype_name: str, shape) -> bool:
        if len(shape) != 2 or not dtypes.dtype(dtype_name).is_float:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def get_config(self) -> dict:
        return {"include": self.include, "exclude": self.exclude}


class Method:
    """A codec profile.  ``encode_tensor`` returns None to store a tensor as dense-delta."""

    name: str
    takes_ratio = False
    entropy = True  # blobs may be stored rANS-coded when smaller (``encode(entropy=False)``: never)

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int = 3):
        if ratio is not None and not self.takes_ratio:
            raise UsageError(f"--ratio applies to lossy methods; {self.name} takes no ratio")
        if (include or exclude) and not self.codes_tensors():
            raise UsageError(f"--include and --exclude apply to lossy methods; {self.name} stores every "
                             f"tensor exactly")
        if not isinstance(zstd_level, int) or not 1 <= zstd_level <= 22:
            raise UsageError(f"zstd level must be an integer in 1..22, got {zstd_level!r}")
        self.ratio = None if ratio is None else parse_ratio(ratio)
        self.selection = Selection(include, exclude)
        self.zstd_level = zstd_level

    def get_config(self) -> dict:
        config = {"zstd_level": self.zstd_level, "dense_delta_transform": "sub-zigzag"}
        if not self.entropy:  # the default (each blob's smallest encoding) goes unsaid
            config["entropy"] = False
        if self.ratio is not None:
            config["ratio"] = f"{self.ratio.numerator}/{self.ratio.denominator}"
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Method":
        return cls(ratio=config.get("ratio"), zstd_level=config.get("zstd_level", 3),
                   **config.get("selection", {}))

    def plan(self, tensors, load) -> None:
        """Called once before encoding with the TensorInfo of every tensor the method wants.

        ``load(name)`` gives (fine-tune, base) storage arrays, for methods that
        share a file-wide budget by looking at the data first.
        """

    def encode_tensor(self, name, ft, base, dtype_name):
        return None

    @classmethod
    def codes_tensors(cls) -> bool:
        """Whether the method codes tensors itself (a lossy method), rather than storing all exactly."""
        return cls.encode_tensor is not Method.encode_tensor

    def wants_tensor(self, name: str, dtype_name: str, shape) -> bool:
        """Whether the encoder should hand this tensor to ``encode_tensor``.

        The hook takes whole arrays, so the encoder loads the tensor and its base
        whole for it; a method that keeps the default hook (lossless) wants none,
        and every tensor is streamed in chunks instead.
        """
        return self.codes_tensors() and self.selection.selects(name, dtype_name, shape)


class Lossless(Method):
    """Exact deltas of every tensor: decode reproduces the fine-tune bit for bit."""

    name = "lossless"


class BudgetedMethod(Method):
    """A lossy method that codes each selected matrix's Δ within a share of the file's byte budget.

    Subclasses give the cheapest record's cost (``empty_cost``) and code one
    matrix (``code``) into a ``budget.Coded`` whose cost is at most the bytes given.
    """

    takes_ratio = True
    default_ratio: str | None = "1/16"

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int = 3, seed: int = 0):
        super().__init__(ratio if ratio is not None else self.default_ratio, include, exclude, zstd_level)
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise UsageError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self.seed = seed
        self.budget = None

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}

    def wants_tensor(self, name, dtype_name, shape) -> bool:
        return dtype_name in ("F32", "F16", "BF16") and self.selection.selects(name, dtype_name, shape)

    def empty_cost(self, info) -> int:
        raise NotImplementedError

    def plan(self, tensors, load) -> None:
        if self.ratio is None:
            return
        self.budget = FileBudget(self.ratio, tensors, self.empty_cost)
        if self.budget.overspent():
            need = sum(self.empty_cost(t) for t in tensors)
            raise UsageError(f"method {self.name!r} at ratio {self.ratio}: the {len(tensors)} matrices need at "
                             f"least {need} bytes, the budget is {self.budget.total}; raise the ratio or --exclude "
                             f"small tensors")

    def encode_tensor(self, name, ft, base, dtype_name):
        numel = ft.size
        if self.ratio is None:
            budget = None
        elif self.budget is not None:
            budget = self.budget.take(name, numel, self.ratio)
        else:  # not planned (a direct call): this matrix alone at the ratio
            budget = int(self.ratio * 16 * numel) // 8
        delta = dtypes.to_float32(ft, dtype_name)
        delta -= dtypes.to_float32(base, dtype_name)
        coded = self.code(name, dtype_name, ft.shape, delta, budget)
        if self.budget is not None:
            self.budget.spend(budget, coded.cost)
        return coded.kind, coded.params, coded.raws

    def code(self, name, dtype_name, shape, delta, budget):
        raise NotImplementedError
