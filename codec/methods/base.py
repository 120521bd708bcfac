"""What every codec method shares: the selection of tensors, the ratio, the file-wide budget.

``get_config`` returns every choice a method made, written to the index as
``method.params`` so a file says exactly how it was made; ``from_config``
rebuilds the method.  Lossy methods apply to the tensors their selection picks
(by default every 2-D float matrix) and leave the rest to ``dense-delta``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .. import dtypes
from ..errors import UsageError
from .budget import FileBudget

DEFAULT_ZSTD_LEVEL = 3  # packed codes, masks, attachments
# The byte planes of exact records (dense-delta, full): their low-order planes are noise-like, and zstd's
# fast strategy both compresses them better (spurious matches cost more than they save) and runs ~4x
# faster than level 3 (a 7B-shaped bf16 pair: 6 % smaller, 213 against 128 MB/s of fine-tune per core).
DEFAULT_PLANE_ZSTD_LEVEL = 1

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


@dataclass(frozen=True)
class TensorPlan:
    """What planning decided for one matrix, carried to whichever worker codes it (small, picklable).

    ``budget``: the bytes its record may put in the file (None: no budget);
    ``data``: the method's own choices (delta-come ``rd``: the vector order and widths).
    """

    budget: int | None = None
    data: Any = None


class Method:
    """A codec profile.  ``encode_tensor`` returns None to store a tensor as dense-delta.

    Encoding runs in three steps so that tensors can be coded in parallel (threads,
    worker processes, Ray tasks) and the file still comes out byte for byte the same:

    1. ``prepare(tensors)``, once, in the main process: file-wide facts (budget shares);
    2. ``measure(...)`` per matrix, anywhere, when ``measures`` is true, then
       ``allocate(tensors, measures)`` in the main process: a ``TensorPlan`` per matrix;
    3. ``encode_tensor(name, ft, base, dtype_name, plan)`` per matrix, anywhere: a pure
       function of its arguments (no state shared between matrices, nothing that
       depends on which tensors ran before or beside it).
    """

    name: str
    takes_ratio = False
    entropy = True  # blobs may be stored rANS-coded when smaller (``encode(entropy=False)``: never)
    measures = False  # whether allocate() needs measure() of every planned matrix
    carries_leftover = False  # bytes a matrix cannot spend go to the matrices after it (encode's Ledger)

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None):
        if ratio is not None and not self.takes_ratio:
            raise UsageError(f"--ratio applies to lossy methods; {self.name} takes no ratio")
        if (include or exclude) and not self.codes_tensors():
            raise UsageError(f"--include and --exclude apply to lossy methods; {self.name} stores every "
                             f"tensor exactly")
        if zstd_level is not None and (not isinstance(zstd_level, int) or not 1 <= zstd_level <= 22):
            raise UsageError(f"zstd level must be an integer in 1..22, got {zstd_level!r}")
        self.ratio = None if ratio is None else parse_ratio(ratio)
        self.selection = Selection(include, exclude)
        # A level given applies to every blob; by default the byte planes get their own.
        self.zstd_level = DEFAULT_ZSTD_LEVEL if zstd_level is None else zstd_level
        self.plane_zstd_level = DEFAULT_PLANE_ZSTD_LEVEL if zstd_level is None else zstd_level

    def get_config(self) -> dict:
        config = {"zstd_level": self.zstd_level, "dense_delta_transform": "sub-zigzag"}
        if not self.entropy:  # the default (each blob's smallest encoding) goes unsaid
            config["entropy"] = False
        if self.plane_zstd_level != self.zstd_level:
            config["zstd_level_planes"] = self.plane_zstd_level
        if self.ratio is not None:
            config["ratio"] = f"{self.ratio.numerator}/{self.ratio.denominator}"
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Method":
        return cls(ratio=config.get("ratio"), zstd_level=config.get("zstd_level", 3),
                   **config.get("selection", {}))

    def prepare(self, tensors) -> None:
        """Called once, before any tensor is measured or coded, with the TensorInfo of every
        matrix the method will code; raises UsageError when the budget cannot hold them."""

    def measure(self, name, ft, base, dtype_name):
        """A small, picklable summary of one matrix that ``allocate`` needs (when ``measures``)."""
        raise NotImplementedError

    def allocate(self, tensors, measures: dict) -> dict[str, TensorPlan]:
        """Each planned matrix's ``TensorPlan``, from the ``measure`` results (name -> summary)."""
        return {}

    def working_bytes(self, info) -> int:
        """Upper estimate of the memory ``encode_tensor`` takes for one matrix (the encoder admits
        concurrent tensors by it): both tensors, Δ and its factors in float32, the records built."""
        return 2 * info.nbytes + 6 * 4 * math.prod(info.shape)

    def encode_tensor(self, name, ft, base, dtype_name, plan: TensorPlan | None = None):
        return None

    def holds_with_more_budget(self, plan: TensorPlan, params: dict) -> bool:
        """Whether the record ``encode_tensor`` made under ``plan`` (its ``params``) is the one any larger
        budget gives too: then a leftover passed on to this matrix later needs no second coding.  False
        (the safe answer) when the record may depend on the exact budget."""
        return False

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
    carries_leftover = True
    default_ratio: str | None = "1/16"

    def __init__(self, ratio=None, include=None, exclude=None, zstd_level: int | None = None, seed: int = 0):
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

    def prepare(self, tensors) -> None:
        if self.ratio is None:
            return
        self.budget = FileBudget(self.ratio, tensors, self.empty_cost)
        if self.budget.overspent():
            need = sum(self.empty_cost(t) for t in tensors)
            raise UsageError(f"method {self.name!r} at ratio {self.ratio}: the {len(tensors)} matrices need at "
                             f"least {need} bytes, the budget is {self.budget.total}; raise the ratio or --exclude "
                             f"small tensors")

    def allocate(self, tensors, measures) -> dict[str, TensorPlan]:
        if self.budget is None:
            return {}
        return {t.name: TensorPlan(budget=self.budget.shares[t.name]) for t in tensors}

    def encode_tensor(self, name, ft, base, dtype_name, plan=None):
        numel = ft.size
        if self.ratio is None:
            budget = None
        elif plan is not None and plan.budget is not None:
            budget = plan.budget
        else:  # not planned (a direct call): this matrix alone at the ratio
            budget = int(self.ratio * 16 * numel) // 8
        delta = dtypes.float32_delta(ft, base, dtype_name)
        coded = self.code(name, dtype_name, ft.shape, delta, budget)
        return coded.kind, coded.params, coded.raws

    def code(self, name, dtype_name, shape, delta, budget):
        raise NotImplementedError
