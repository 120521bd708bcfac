"""spec/dcm-format.md and the code stay in step.

The specification is normative, the code its reference implementation; these
tests read the spec's machine-checkable parts and hold the code to them:

* the bit-packing example (fenced block ``text bitpack-example``);
* the complete example file: rebuilt from the inputs the spec states (block
  ``json example-inputs``), it must equal the annotated hex dump (block ``hex
  example-file``) byte for byte, and the dump's bytes must decode to the inputs;
* the registry tables (marked ``<!-- registry: NAME -->``) against
  ``dcm.constants``, ``dcm.dtypes`` and ``dcm.errors``;
* the limits table against every limit constant.

When the format changes on purpose, regenerate the example's dump with
``python tests/test_spec.py`` and paste it into the spec.
"""

from __future__ import annotations

import inspect
import json
import re
import struct
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

import dcm
from dcm import bitpack, blobs, constants, dtypes, errors
from dcm.checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from dcm.container import HEADER

SPEC = Path(__file__).resolve().parent.parent / "spec" / "dcm-format.md"


# --- reading the spec ----------------------------------------------------------


def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def fenced_block(tag: str) -> str:
    """Body of the one fenced block whose info string is ``<lang> <tag>``."""
    found = re.findall(r"^```\w+ " + re.escape(tag) + r"\n(.*?)^```", spec_text(), re.M | re.S)
    assert len(found) == 1, f"spec must have exactly one fenced block tagged {tag!r}"
    return found[0]


def registry_table(name: str) -> list[list[str]]:
    """Rows (cells, backticks stripped) of the table after ``<!-- registry: name -->``."""
    text = spec_text()
    marker = f"<!-- registry: {name} -->"
    assert text.count(marker) == 1, f"spec must mark exactly one table with {marker}"
    lines = text.split(marker, 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("`", "") for c in line.strip().strip("|").split("|")])
    assert len(rows) >= 3, f"table {name!r} is empty"
    assert set(rows[1][0]) <= set(":- "), f"table {name!r}: second line must be the separator"
    return rows[2:]


def parse_hex_dump(body: str) -> bytes:
    """Lines ``OFFSET: HEX BYTES | annotation``; offsets must follow one another."""
    out = bytearray()
    for number, line in enumerate(body.splitlines(), 1):
        data = line.split("|", 1)[0].strip()
        if not data:
            continue
        offset, _, hexbytes = data.partition(":")
        assert int(offset, 16) == len(out), f"hex dump line {number}: offset {offset}, expected {len(out):04x}"
        out += bytes.fromhex(hexbytes)
    return bytes(out)


def example_inputs() -> dict:
    return json.loads(fenced_block("example-inputs"))


def storage_array(tensor: dict) -> np.ndarray:
    storage = dtypes.dtype(tensor["dtype"]).storage
    array = np.array(tensor["values"], dtype=storage).reshape(tensor["shape"])
    assert array.reshape(-1).tolist() == tensor["values"], f"{tensor['name']}: values not exact"
    return array


def write_checkpoint(path: Path, tensors: list[dict]) -> None:
    arrays = {t["name"]: storage_array(t) for t in tensors}
    infos = [TensorInfo(t["name"], t["dtype"], tuple(t["shape"]), arrays[t["name"]].nbytes) for t in tensors]
    with CheckpointWriter(path, infos) as writer:
        for t in tensors:
            writer.write(t["name"], arrays[t["name"]])


def build_example(workdir: Path) -> bytes:
    """The example file, made the way the spec says it was made."""
    inputs = example_inputs()
    write_checkpoint(workdir / "base", inputs["base"])
    write_checkpoint(workdir / "finetune", inputs["finetune"])
    out = workdir / "example.dcm"
    dcm.encode(workdir / "base", workdir / "finetune", out, **inputs["encode"])
    return out.read_bytes()


# --- (a) the bit-packing example -------------------------------------------------


def test_bitpack_example():
    fields = dict(line.split(":", 1) for line in fenced_block("bitpack-example").strip().splitlines())
    bits = int(fields["bits"])
    codes = [int(c) for c in fields["codes"].split()]
    packed = bytes.fromhex(fields["bytes"])
    assert bitpack.packed_size(len(codes), bits) == len(packed)
    assert bitpack.pack(np.array(codes), bits) == packed
    assert bitpack.unpack(packed, len(codes), bits).tolist() == codes
    # The padding bits after the last code must be zero.
    spoiled = packed[:-1] + bytes([packed[-1] | 0x80])
    with pytest.raises(errors.PayloadError):
        bitpack.unpack(spoiled, len(codes), bits)


def test_bitpack_bit_table_matches_example():
    """The bit-by-bit table: stream bit p of the example is bit p%8 of byte p//8."""
    fields = dict(line.split(":", 1) for line in fenced_block("bitpack-example").strip().splitlines())
    bits, codes = int(fields["bits"]), [int(c) for c in fields["codes"].split()]
    packed = bytes.fromhex(fields["bytes"])
    rows = registry_table("bitpack-bits")
    assert len(rows) == len(codes) * bits
    for p, row in enumerate(rows):
        stream_bit, code_index, code_bit, byte_index, bit_in_byte, value = map(int, row[:6])
        assert (stream_bit, code_index, code_bit) == (p, p // bits, p % bits)
        assert (byte_index, bit_in_byte) == (p // 8, p % 8)
        assert value == (codes[p // bits] >> (p % bits)) & 1 == (packed[p // 8] >> (p % 8)) & 1


# --- (b) the complete example file -------------------------------------------------


def test_example_file_matches_hex_dump(tmp_path):
    dumped = parse_hex_dump(fenced_block("example-file"))
    built = build_example(tmp_path)
    assert len(built) == len(dumped), f"example is {len(built)} bytes, the dump {len(dumped)}"
    for i, (a, b) in enumerate(zip(built, dumped)):
        assert a == b, f"byte 0x{i:04x}: encoder writes {a:02x}, the spec shows {b:02x}"


def test_example_hex_dump_decodes(tmp_path):
    inputs = example_inputs()
    path = tmp_path / "from-spec.dcm"
    path.write_bytes(parse_hex_dump(fenced_block("example-file")))
    write_checkpoint(tmp_path / "base", inputs["base"])
    with dcm.open(path) as f:
        assert f.padding_is_zero()
        assert f.metadata()["creator"] == inputs["encode"]["creator"]
        ft_names = [t["name"] for t in inputs["finetune"]]
        assert f.keys() == ft_names
        base_names = {t["name"] for t in inputs["base"]}
        removed = [r.name for r in f.records() if r.kind_name == "removed"]
        assert removed == [t["name"] for t in inputs["base"] if t["name"] not in ft_names]
        for rec in f.records():
            assert (rec.base is not None) == (rec.name in base_names)
    dcm.decode(path, tmp_path / "base", tmp_path / "decoded")
    with Checkpoint(tmp_path / "decoded") as out:
        assert out.names() == ft_names
        for t in inputs["finetune"]:
            info = out.info(t["name"])
            assert (info.dtype, list(info.shape)) == (t["dtype"], t["shape"])
            expected = storage_array(t)
            assert out.read(t["name"]).tobytes() == expected.tobytes()


def test_example_stated_values():
    """Numbers the spec's prose quotes about the example (digests, codes) are right."""
    import hashlib

    data = parse_hex_dump(fenced_block("example-file"))
    index_length = struct.unpack_from("<Q", data, 24)[0]
    index = msgpack.unpackb(data[64 : 64 + index_length])
    text = spec_text()
    for rec in index["tensors"]:
        if "base" in rec:
            assert rec["base"]["sha256"].hex() in text.replace(" ", "")
    assert index["base"]["digest"].hex() in text.replace(" ", "")
    inputs = example_inputs()
    base = {t["name"]: storage_array(t) for t in inputs["base"]}
    refs = [(r["name"], hashlib.sha256(base[r["name"]].tobytes()).digest())
            for r in index["tensors"] if "base" in r]
    assert dcm.reader.base_digest(refs) == index["base"]["digest"]
    # Section 18.2: sizes, offsets, CRCs and each blob's stored bytes.
    prose = " ".join(text.split("### 18.2", 1)[1].split("### 18.3", 1)[0].split())
    alignment, file_length, header_crc = (struct.unpack_from("<I", data, 20)[0],
                                          struct.unpack_from("<Q", data, 32)[0],
                                          struct.unpack_from("<I", data, 60)[0])
    data_start = -(-(64 + index_length) // alignment) * alignment
    assert f"The index is {index_length} bytes" in prose
    assert f"= {data_start}` (0x{data_start:04x})" in prose
    assert f"the file is `{data_start} + {file_length - data_start} = {file_length}` bytes" in prose
    assert f"0x{header_crc:08x}" in prose and " ".join(f"{b:02x}" for b in data[60:64]) in prose
    for rec in index["tensors"]:
        for blob in rec["blobs"]:
            start = data_start + blob["offset"]
            stored = " ".join(f"{b:02x}" for b in data[start : start + blob["length"]])
            assert f"`{stored}` → 0x{blob['crc32']:08x} ({blob['crc32']})" in prose, rec["name"]


# --- (c) registries ---------------------------------------------------------------


def registry_name(member) -> str:
    return member.name.lower().replace("_", "-")


@pytest.mark.parametrize("enum", [constants.Kind, constants.Encoding, constants.Transform,
                                  constants.Layout, constants.Packing, constants.MaskEncoding,
                                  constants.SignScales, constants.Rotation])
def test_registry_tables(enum):
    rows = registry_table(enum.__name__)
    in_spec = {(int(r[0]), r[1]) for r in rows}
    in_code = {(int(m), registry_name(m)) for m in enum}
    assert in_spec == in_code, (f"{enum.__name__}: only in the spec {sorted(in_spec - in_code)}, "
                                f"only in the code {sorted(in_code - in_spec)}")


def test_kind_names():
    assert {int(k): v for k, v in constants.KIND_NAMES.items()} == {
        int(k): registry_name(k) for k in constants.Kind}


def test_dtype_table():
    rows = registry_table("dtypes")
    in_spec = {r[0]: (int(r[1]), r[2] == "yes") for r in rows}
    in_code = {name: (d.itemsize, d.is_float) for name, d in dtypes.DTYPES.items()}
    assert in_spec == in_code, (f"only in the spec {sorted(in_spec.items() - in_code.items())}, "
                                f"only in the code {sorted(in_code.items() - in_spec.items())}")


def test_error_table():
    """Spec section 15's registry of error codes is ``dcm.errors.ERROR_CODES``, row for row."""
    rows = registry_table("errors")
    in_spec = {code: (int(number), parent, int(exit_code), cls) for code, number, parent, exit_code, cls, _ in rows}
    in_code = {code: (number, "—" if cls is errors.DcmError else cls.__mro__[1].code, cls.exit_code, cls.__name__)
               for code, (number, cls) in errors.ERROR_CODES.items()}
    assert in_spec == in_code, (f"only in the spec {sorted(in_spec.items() - in_code.items())}, "
                                f"only in dcm.errors {sorted(in_code.items() - in_spec.items())}")
    numbers = [number for number, _ in errors.ERROR_CODES.values()]
    assert len(set(numbers)) == len(numbers), "error numbers must be unique"
    for code, (number, cls) in errors.ERROR_CODES.items():
        assert re.fullmatch(r"E_[A-Z_]+", code), code
        assert (cls.code, cls.code_number) == (code, number), cls


def test_every_error_class_has_its_own_code():
    """A DcmError subclass added to dcm.errors needs a row in ERROR_CODES and in the spec's table."""
    classes = {cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.DcmError)}
    registered = {cls for _, cls in errors.ERROR_CODES.values()}
    assert classes == registered, (f"add to ERROR_CODES and to spec section 15: {sorted(c.__name__ for c in classes - registered)}")


def test_exit_code_table():
    rows = registry_table("exit-codes")
    assert {int(r[0]) for r in rows} == set(errors.EXIT_CODES)


def test_header_table():
    rows = registry_table("header")
    codes = re.findall(r"(\d*)([a-zA-Z])", HEADER.format.lstrip("<"))
    kinds = {"s": "bytes", "H": "u16", "I": "u32", "Q": "u64"}
    offset = 0
    assert len(rows) == len(codes)
    for row, (count, code) in zip(rows, codes):
        size = struct.calcsize("<" + count + code)
        assert int(row[0]) == offset and int(row[1]) == size, row
        assert row[2].startswith(kinds[code]), row
        offset += size
    assert offset == constants.HEADER_SIZE


def test_magic_in_spec():
    assert " ".join(f"{b:02x}" for b in constants.MAGIC) in spec_text()


# --- (d) limits -----------------------------------------------------------------


def limit_constants() -> dict[str, int]:
    found = {name: value for name, value in vars(constants).items()
             if re.fullmatch(r"(MAX|MIN)_[A-Z_]+", name) and isinstance(value, int)}
    found["MAX_WINDOW_BYTES"] = blobs.MAX_WINDOW_BYTES
    return found


def test_limits_table():
    rows = {r[1]: r for r in registry_table("limits")}
    for name, value in limit_constants().items():
        assert name in rows, f"limit {name} is missing from the spec's limits table"
        assert rows[name][2].split()[0] == str(value), f"{name}: spec says {rows[name][2]}, code {value}"
        assert isinstance(getattr(errors, rows[name][3], None), type), rows[name]


# --- regenerating the example ----------------------------------------------------


class _Annotator:
    """Annotated hex dump of the example file (``python tests/test_spec.py``)."""

    WIDTH = 16

    def __init__(self, data: bytes):
        self.data, self.lines = data, []

    def emit(self, start: int, end: int, note: str = "") -> None:
        first = True
        for pos in range(start, end, self.WIDTH):
            chunk = self.data[pos : min(end, pos + self.WIDTH)]
            hexes = " ".join(f"{b:02x}" for b in chunk)
            self.lines.append(f"{pos:04x}: {hexes:<{self.WIDTH * 3 - 1}} | {note if first else ''}".rstrip())
            first = False

    # -- msgpack --

    def token(self, pos: int):
        """(value or container marker, end of the token's own bytes)."""
        b = self.data[pos]
        if b <= 0x7F:
            return b, pos + 1
        if 0x80 <= b <= 0x8F:
            return ("map", b & 0x0F), pos + 1
        if 0x90 <= b <= 0x9F:
            return ("array", b & 0x0F), pos + 1
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
            return self.data[pos + 1 : pos + 1 + n].decode(), pos + 1 + n
        if b == 0xD9:
            n = self.data[pos + 1]
            return self.data[pos + 2 : pos + 2 + n].decode(), pos + 2 + n
        if b == 0xC4:
            n = self.data[pos + 1]
            return ("bin", n, pos + 2), pos + 2
        if b in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[b], pos + 1
        ints = {0xCC: "B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q"}
        if b in ints:
            size = struct.calcsize(ints[b])
            return struct.unpack_from(ints[b], self.data, pos + 1)[0], pos + 1 + size
        raise ValueError(f"annotator: msgpack byte {b:#x} not handled")

    def scalar_text(self, value) -> str:
        return json.dumps(value)

    def inline(self, pos: int):
        """(text, end) when the object at pos is a small container of scalars, else None."""
        value, end = self.token(pos)
        if not (isinstance(value, tuple) and value[0] in ("map", "array")):
            return None
        items = []
        for _ in range(value[1] * (2 if value[0] == "map" else 1)):
            item, end = self.token(end)
            if isinstance(item, tuple):
                return None
            items.append(self.scalar_text(item))
        if value[0] == "map":
            body = ", ".join(f"{k}: {v}" for k, v in zip(items[::2], items[1::2]))
            return "{" + body + "}", end
        return "[" + ", ".join(items) + "]", end

    def obj(self, start: int, pos: int, depth: int, prefix: str) -> int:
        """Emit bytes [start, end of the object at pos): key bytes (if any) then the object."""
        pad = "  " * depth
        small = self.inline(pos)
        value, end = self.token(pos)
        if small is not None and small[1] - start <= self.WIDTH:
            self.emit(start, small[1], f"{pad}{prefix}{small[0]}")
            return small[1]
        if isinstance(value, tuple) and value[0] == "bin":
            _, n, data_start = value
            self.emit(start, data_start, f"{pad}{prefix}bin, {n} bytes")
            for i, chunk_start in enumerate(range(data_start, data_start + n, self.WIDTH)):
                chunk_end = min(data_start + n, chunk_start + self.WIDTH)
                self.emit(chunk_start, chunk_end, f"{pad}  ({i + 1}/{(n + self.WIDTH - 1) // self.WIDTH})")
            return data_start + n
        if isinstance(value, tuple):
            kind, count = value
            noun = {"map": ("entry", "entries"), "array": ("item", "items")}[kind][count != 1]
            self.emit(start, end, f"{pad}{prefix}{kind}, {count} {noun}")
            for i in range(count):
                if kind == "map":
                    key, key_end = self.token(end)
                    end = self.obj(end, key_end, depth + 1, f"{json.dumps(key)}: ")
                else:
                    end = self.obj(end, end, depth + 1, f"[{i}] ")
            return end
        self.emit(start, end, f"{pad}{prefix}{self.scalar_text(value)}")
        return end

    def dump(self) -> str:
        d = self.data
        fields = HEADER.unpack_from(d)
        names = ["magic", "major version", "minor version", "required flags", "optional flags",
                 "alignment", "index_length", "file_length", "reserved", "CRC-32"]
        pos = 0
        for i, (name, value) in enumerate(zip(names, fields)):
            size = struct.calcsize("<" + re.findall(r"\d*[a-zA-Z]", HEADER.format.lstrip("<"))[i])
            if name == "magic":
                note = "magic: \\x89 D C M \\r \\n \\x1a \\n"
            elif name == "reserved":
                note = "reserved, zero (20 bytes)"
            elif name == "CRC-32":
                note = f"CRC-32 of bytes 0000..003b and the index = 0x{value:08x}"
            else:
                note = f"{name} = {value}"
            self.emit(pos, pos + size, note)
            pos += size
        index_length, file_length, alignment = fields[6], fields[7], fields[5]
        end = self.obj(pos, pos, 0, "index: ")
        assert end == 64 + index_length
        index = msgpack.unpackb(d[64:end])
        data_start = -(-end // alignment) * alignment
        where = []
        for i, rec in enumerate(index["tensors"]):
            kind = constants.KIND_NAMES[rec["kind"]]
            layout = rec["params"].get("layout")
            for j, blob in enumerate(rec["blobs"]):
                if layout == constants.Layout.BYTE_PLANES:
                    part = f"byte plane {j}"
                elif layout == constants.Layout.PLAIN:
                    part = "plain blob"
                else:
                    part = f"blob {j}"
                where.append((f"tensors[{i}] {rec['name']!r} ({kind}), {part}", blob))
        for att in index.get("attachments", []):
            where.append((f"attachment {att['name']!r}", att["blob"]))
        for label, blob in where:
            start = data_start + blob["offset"]
            if start > end:
                self.emit(end, start, f"padding to the alignment ({start - end} zero bytes)")
            encoding = registry_name(constants.Encoding(blob["encoding"]))
            self.emit(start, start + blob["length"], f"{label}: {encoding}, data offset {blob['offset']}")
            end = start + blob["length"]
        assert end == file_length == len(d)
        return "\n".join(self.lines)


def render_example_dump() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = build_example(Path(tmp))
    return _Annotator(data).dump()


if __name__ == "__main__":
    sys.stdout.write("```hex example-file\n" + render_example_dump() + "\n```\n")
