"""Read a file line by line in binary, in constant memory, whatever its size or line lengths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BOM = b"\xef\xbb\xbf"
# A chat example longer than this is far beyond any model's context; refusing it keeps memory flat.
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
_DRAIN = 1 << 20


class DatasetError(Exception):
    """A user mistake (missing file, bad option); the message is one line naming the path."""


@dataclass(slots=True)
class Line:
    """One physical line: its 1-based number, its text (``None`` when unusable) and what was off."""

    number: int
    text: str | None
    bom: bool = False
    crlf: bool = False
    too_long: int = 0  # bytes seen when the line was over the cap (0 when it was not)
    bad_utf8: int = 0  # 1-based byte column of the first invalid UTF-8 byte (0 when fine)


def open_binary(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading; raise DatasetError with a one-line reason if we cannot."""
    p = Path(path)
    try:
        return p.open("rb")
    except FileNotFoundError:
        raise DatasetError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{p}: is a directory, expected a file") from None
    except OSError as e:
        raise DatasetError(f"{p}: cannot read: {e.strerror}") from None


def iter_lines(
    f: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, keep_ends: bool = False
) -> Iterator[Line]:
    """Decode the lines of a binary stream one at a time, never holding more than one line."""
    number = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            # Over the cap: skip the rest of the line in bounded chunks instead of reading it.
            seen = len(raw)
            del raw
            while True:
                chunk = f.readline(_DRAIN)
                seen += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield Line(number, None, too_long=seen)
            continue
        bom = raw.startswith(BOM)
        if bom:
            raw = raw[len(BOM) :]
        crlf = raw.endswith(b"\r\n")
        if not keep_ends:
            raw = raw[:-2] if crlf else raw.rstrip(b"\n")
        elif crlf:
            raw = raw[:-2] + b"\n"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Line(number, None, bom=bom, crlf=crlf, bad_utf8=e.start + 1)
            continue
        yield Line(number, text, bom=bom, crlf=crlf)
