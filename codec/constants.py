"""Every number the .dcm format fixes, in one place (spec/dcm-format.md is normative).

Registries are append-only: a number, once given to a meaning, is never reused.
"""

from __future__ import annotations

import enum

MAGIC = b"\x89DCM\r\n\x1a\n"
VERSION_MAJOR = 1
VERSION_MINOR = 3  # the newest minor version this code reads and writes

HEADER_SIZE = 64
HEADER_CRC_OFFSET = 60  # the CRC-32 field; it covers header bytes [0, 60) then the index
DEFAULT_ALIGNMENT = 64
MIN_ALIGNMENT = 8
MAX_ALIGNMENT = 65536

# Flag bits.  None is defined in 1.0; a reader rejects any unknown required bit
# and ignores unknown optional bits.
KNOWN_REQUIRED_FLAGS = 0
KNOWN_OPTIONAL_FLAGS = 0

# Limits (spec section "Limits"): checked before anything is allocated.
MAX_INDEX_BYTES = 64 * 2**20
MAX_TENSORS = 2**20
MAX_ATTACHMENTS = 4096
MAX_NAME_BYTES = 512
MAX_DIMS = 8
MAX_ELEMENTS = 2**48  # per tensor; overflow guard on the product of dims
MAX_MSGPACK_DEPTH = 16
MAX_BLOBS_PER_RECORD = 4096
MAX_ATTACHMENT_BYTES = 16 * 2**20  # raw bytes of one attachment
MAX_ATTACHMENT_NAME_BYTES = 255
MAX_CREATOR_BYTES = 256
MAX_METHOD_NAME_BYTES = 64
MAX_DTYPE_NAME_BYTES = 16
MAX_BIT_GROUPS = 64  # bit groups of one lowrank-mixed record
MAX_QUANT_GROUP_SIZE = 65536  # elements sharing one scale and zero point


class Encoding(enum.IntEnum):
    """How a blob's stored bytes become its raw bytes."""

    RAW = 0
    ZSTD = 1
    RANS = 2  # an order-0 rANS stream (htscodecs' rANS Nx16, order 0, 4 or 32 states)


# The minor version that defined each blob encoding (spec section 4: a file's minor version
# covers its kinds and its encodings).
ENCODING_MINOR = {Encoding.RAW: 0, Encoding.ZSTD: 0, Encoding.RANS: 3}


class Kind(enum.IntEnum):
    """Record kinds: how a tensor of the fine-tune is rebuilt."""

    DENSE_DELTA = 1  # exact delta against the base tensor, bit for bit
    FULL = 2  # the fine-tuned tensor stored whole
    REMOVED = 3  # a base tensor the fine-tune does not have
    LOWRANK_MIXED = 4  # W_base + U·diag(S)·Vᵀ, U and V quantized in bit groups
    SPARSE_LOWRANK = 5  # W_base + U·diag(S)·Vᵀ with sparse U and V (ImPart), float16 or quantized
    SIGN = 6  # W_base + scale·sign (BitDelta)
    LOWRANK = 7  # W_base + U·diag(S)·Vᵀ, U and V in float16
    SPARSE = 8  # W_base + the kept elements of Δ (DARE)
    ADAPTED = 9  # an inner record against the base cast to the record's dtype, plus new rows stored whole
    LOWRANK_ROTATED = 10  # lowrank-mixed whose singular vectors are stored rotated (randomized Hadamard)


KIND_NAMES = {
    Kind.DENSE_DELTA: "dense-delta",
    Kind.FULL: "full",
    Kind.REMOVED: "removed",
    Kind.LOWRANK_MIXED: "lowrank-mixed",
    Kind.SPARSE_LOWRANK: "sparse-lowrank",
    Kind.SIGN: "sign",
    Kind.LOWRANK: "lowrank",
    Kind.SPARSE: "sparse",
    Kind.ADAPTED: "adapted",
    Kind.LOWRANK_ROTATED: "lowrank-rotated",
}

# The minor version that defined each kind: a writer writes the lowest minor version
# covering the kinds its file uses (spec section 4), so lossless files stay 1.0.
KIND_MINOR = {Kind.DENSE_DELTA: 0, Kind.FULL: 0, Kind.REMOVED: 0, Kind.LOWRANK_MIXED: 1,
              Kind.SPARSE_LOWRANK: 2, Kind.SIGN: 2, Kind.LOWRANK: 2, Kind.SPARSE: 2, Kind.ADAPTED: 3,
              Kind.LOWRANK_ROTATED: 3}

# The kinds an ``adapted`` record may hold (param "inner"): those that read the base tensor.
INNER_KINDS = (Kind.DENSE_DELTA, Kind.LOWRANK_MIXED, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.LOWRANK, Kind.SPARSE,
               Kind.LOWRANK_ROTATED)
# The dtypes an ``adapted`` record casts between (spec 10.13).
CAST_DTYPES = ("F32", "F16", "BF16")

# Kinds whose decoded tensor only approximates the fine-tune (the "compressed" tensors); an ``adapted``
# record is lossy when its inner kind is (``records.coded_kind``).
LOSSY_KINDS = frozenset({Kind.LOWRANK_MIXED, Kind.SPARSE_LOWRANK, Kind.SIGN, Kind.LOWRANK, Kind.SPARSE,
                         Kind.LOWRANK_ROTATED})


class Transform(enum.IntEnum):
    """Integer transforms applied to the bit patterns before byte-plane splitting."""

    NONE = 0  # the bit patterns as they are
    SUB_ZIGZAG = 1  # zigzag(ft_bits - base_bits mod 2^n): small deltas -> small codes


class Packing(enum.IntEnum):
    """How integer codes of b bits are laid out in a blob's raw bytes."""

    LSB_FIRST = 1  # code i, bit j at stream bit i*b + j; byte k holds bits 8k..8k+7, bit 0 = LSB


# Element layouts of a dense array in a blob (param "layout" of dense-delta / full).
class Layout(enum.IntEnum):
    PLAIN = 0  # one blob: the elements, little-endian, C order
    BYTE_PLANES = 1  # one blob per byte of the element, least significant byte first


class Rotation(enum.IntEnum):
    """How the singular vectors of one side of a lowrank-rotated record are rotated (params
    "v_rotation", "u_rotation")."""

    NONE = 0  # stored as they are
    HADAMARD = 1  # randomized block Hadamard from the record's seed (spec section 10.14)


class MaskEncoding(enum.IntEnum):
    """How a sparse record says which elements it kept (param "mask")."""

    HASH = 1  # regenerated from the record's seed and drop thresholds (spec section 10.8): no bytes
    BITMASK = 2  # one stored bit per element, 1 = kept


class SignScales(enum.IntEnum):
    """How many scales a sign record has (param "scales")."""

    MATRIX = 0  # one for the whole matrix
    ROW = 1  # one per row
