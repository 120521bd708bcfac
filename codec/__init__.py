"""dcm: a versioned container and codecs for compressed fine-tune deltas.

``dcm.open(path)`` reads a .dcm file lazily (numpy only, no torch);
``dcm.encode(base, finetune, out)`` and ``dcm.decode(path, base, out_dir)``
convert between Hugging Face safetensors checkpoints and .dcm files.
"""

from ._version import __version__  # noqa: E402
from .decode import decode  # noqa: E402
from .encode import encode  # noqa: E402
from .errors import DcmError  # noqa: E402
from .info import info  # noqa: E402
from .reader import DcmFile, Record, open  # noqa: E402,A004
from .verify import verify  # noqa: E402

__all__ = ["open", "encode", "decode", "info", "verify", "DcmFile", "Record", "DcmError", "__version__"]
