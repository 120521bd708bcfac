"""The one exception hierarchy of dcm.

Every failure caused by bad input (a damaged or hostile .dcm file, a broken
checkpoint, a wrong base, bad arguments) raises a subclass of :class:`DcmError`.
Each error names *what* is wrong and *where* (a file, a tensor, a byte offset),
so a user can act on the message alone.  The CLI maps the families below to
documented exit codes (see ``EXIT_CODES``); each class also carries the
language-neutral code of spec section 15 (``code``, e.g. ``"E_LAYOUT"``, and
``code_number``; see ``ERROR_CODES``).
"""

from __future__ import annotations


class DcmError(Exception):
    """Base class of every error dcm raises on purpose."""

    exit_code = 1


# --- arguments and files given by the user -------------------------------------


class UsageError(DcmError):
    """An argument is invalid (unknown method, bad ratio, bad pattern...)."""

    exit_code = 2


class CheckpointError(DcmError):
    """An input checkpoint (safetensors file or model directory) is unusable."""

    exit_code = 3


class OutputExistsError(DcmError):
    """The output path exists and overwriting was not asked for."""

    exit_code = 2


class UnsafeOutputError(UsageError):
    """dcm refuses to write there: the output is or holds an input, or is not a file or directory dcm may replace."""


class CoverageError(UsageError):
    """A lossy method coded no tensor, or the file is far over its budget (``allow_uncoded`` accepts it)."""


class ClosedFileError(UsageError):
    """The .dcm file was used after it was closed."""


class InputError(DcmError):
    """An input path cannot be read (missing, a directory, no permission...)."""

    exit_code = 3


class InputChangedError(InputError):
    """An input file changed (size or modification time) while dcm was reading it."""


class OutputError(DcmError):
    """The output cannot be written: an operating-system error on the output side (disk full, read-only...)."""

    exit_code = 6


# --- the .dcm file does not follow the spec ------------------------------------


class FormatError(DcmError):
    """The file violates the .dcm specification."""

    exit_code = 3


class BadMagicError(FormatError):
    """The first 8 bytes are not the .dcm magic."""


class UnsupportedVersionError(FormatError):
    """The file's major version is not one this reader implements."""


class UnknownFlagError(FormatError):
    """A required flag bit unknown to this reader is set."""


class TruncatedError(FormatError):
    """The file is shorter than its header or index says."""


class TrailingDataError(FormatError):
    """The file has bytes after the end its header declares."""


class LayoutError(FormatError):
    """Payload offsets or lengths break the layout rules (alignment, order, overlap, bounds)."""


class IndexSchemaError(FormatError):
    """The msgpack index does not follow the schema (type, missing or unknown key...)."""


class DuplicateKeyError(IndexSchemaError):
    """A msgpack map in the index repeats a key, or two records share a name."""


class LimitError(FormatError):
    """A value exceeds one of the spec's limits (index size, tensor count, dims...)."""


class UnknownKindError(FormatError):
    """A registry number (record kind, encoding, transform, packing, dtype) is unknown."""


class PayloadError(FormatError):
    """A payload does not decode to what its record declares."""


# --- integrity ------------------------------------------------------------------


class ChecksumError(DcmError):
    """Stored bytes do not match their checksum."""

    exit_code = 4


class HeaderChecksumError(ChecksumError):
    """The CRC-32 over the fixed header and the index does not match."""


class PayloadChecksumError(ChecksumError):
    """A payload's CRC-32 does not match its record."""


# --- the base model -------------------------------------------------------------


class WrongBaseError(DcmError):
    """The base checkpoint is not the one the file was encoded against."""

    exit_code = 5


# --- parallel and distributed encoding -------------------------------------------


class WorkerError(DcmError):
    """A worker process or cluster task died while coding a tensor; nothing was written."""


class DcmWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it)."""


EXIT_CODES = {
    0: "success",
    1: "other dcm error",
    2: "usage error (bad arguments, output exists or may not be replaced)",
    3: "invalid input (malformed .dcm file or checkpoint)",
    4: "checksum mismatch (corrupted file)",
    5: "wrong base model",
    6: "cannot write the output (disk full, read-only, no permission...)",
    129: "stopped by SIGHUP (terminal closed)",
    130: "interrupted (SIGINT, Ctrl-C)",
    143: "stopped by SIGTERM",
}


# Language-neutral error codes (spec section 15): the stable name and number that any
# implementation reports for the same condition, so that a decoder in another language
# is checked against the conformance vectors by code, not by Python class name.  The
# codes form a registry like the format's others: append-only, never renumbered or reused.
ERROR_CODES: dict[str, tuple[int, type[DcmError]]] = {
    "E_DCM": (1, DcmError),
    "E_USAGE": (2, UsageError),
    "E_OUTPUT_EXISTS": (3, OutputExistsError),
    "E_CHECKPOINT": (4, CheckpointError),
    "E_UNSAFE_OUTPUT": (5, UnsafeOutputError),
    "E_COVERAGE": (6, CoverageError),
    "E_CLOSED_FILE": (7, ClosedFileError),
    "E_INPUT": (8, InputError),
    "E_INPUT_CHANGED": (9, InputChangedError),
    "E_FORMAT": (10, FormatError),
    "E_BAD_MAGIC": (11, BadMagicError),
    "E_UNSUPPORTED_VERSION": (12, UnsupportedVersionError),
    "E_UNKNOWN_FLAG": (13, UnknownFlagError),
    "E_TRUNCATED": (14, TruncatedError),
    "E_TRAILING_DATA": (15, TrailingDataError),
    "E_LAYOUT": (16, LayoutError),
    "E_INDEX_SCHEMA": (17, IndexSchemaError),
    "E_DUPLICATE_KEY": (18, DuplicateKeyError),
    "E_LIMIT": (19, LimitError),
    "E_UNKNOWN_KIND": (20, UnknownKindError),
    "E_PAYLOAD": (21, PayloadError),
    "E_CHECKSUM": (30, ChecksumError),
    "E_HEADER_CHECKSUM": (31, HeaderChecksumError),
    "E_PAYLOAD_CHECKSUM": (32, PayloadChecksumError),
    "E_WRONG_BASE": (40, WrongBaseError),
    "E_OUTPUT": (41, OutputError),
    "E_WORKER": (42, WorkerError),
}

for _code, (_number, _cls) in ERROR_CODES.items():
    _cls.code, _cls.code_number = _code, _number  # e.g. LayoutError.code == "E_LAYOUT"
del _code, _number, _cls
