"""Read the key/value metadata of a GGUF file (architecture, shape, chat template) in milliseconds.

gguf's GGUFReader also decodes every tensor's info and every token string into numpy objects (seconds for
a 49k-token vocabulary on a small CPU); the importer's checks need a few scalars only. Arrays are
skipped and given as their length. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(little-endian; versions 2 and 3 use 64-bit counts and string lengths).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> struct format of one scalar
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class GGUFFormatError(ValueError):
    pass


class GGUFArray:
    """An array value, kept as its element type and length (the importer never needs the elements)."""

    def __init__(self, item_type: int, length: int):
        self.item_type, self.length = item_type, length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"GGUFArray(type={self.item_type}, length={self.length})"


def read_metadata(path: Path | str) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (strings decoded, arrays as GGUFArray)."""
    with open(path, "rb") as f:
        try:
            buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as error:  # an empty file cannot be mapped
            raise GGUFFormatError("empty file") from error
        try:
            return _parse(buf)
        except struct.error as error:  # read past the end
            raise GGUFFormatError("the metadata is cut short") from error
        finally:
            buf.close()


def _parse(buf: Any) -> dict[str, Any]:
    if buf[:4] != MAGIC:
        raise GGUFFormatError("no GGUF magic bytes")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
    _tensors, kv_count = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        if at + 8 + n > len(buf):
            raise GGUFFormatError("a string runs past the end of the file")
        return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind == STRING:
            return string(at)
        if kind == ARRAY:
            item, n = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item == STRING:
                for _ in range(n):
                    (size,) = struct.unpack_from("<Q", buf, at)
                    at += 8 + size
            elif item in _SCALARS:
                at += n * struct.calcsize(_SCALARS[item])
            else:
                raise GGUFFormatError(f"arrays of type {item} are not supported")
            if at > len(buf):
                raise GGUFFormatError("an array runs past the end of the file")
            return GGUFArray(item, n), at
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFFormatError(f"unknown value type {kind}")
        (v,) = struct.unpack_from(fmt, buf, at)
        return v, at + struct.calcsize(fmt)

    out: dict[str, Any] = {}
    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        out[key], pos = value(kind, pos + 4)
    return out
