"""Reading the user's text files (recipes, templates, data): a binary or non-UTF-8 file is one line that names
the file and the line of the first bad byte, never a UnicodeDecodeError from deep inside a library."""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import FtkitError

CHUNK = 1 << 20


def not_utf8(path: Path, line: int, byte: int, what: str) -> FtkitError:
    return FtkitError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the {what} as UTF-8")


def read_text(path: Path, what: str) -> str:
    """A small text file (recipe, chat template) as str; a leading BOM is dropped."""
    path = Path(path)
    if path.is_dir():
        raise FtkitError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise FtkitError(f"{path}: {what} not found")
    data = path.read_bytes()
    if b"\0" in data:
        raise FtkitError(f"{path}: a binary file, not a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise not_utf8(path, data.count(b"\n", 0, err.start) + 1, data[err.start], what) from None


def check_utf8(path: Path, what: str = "data file") -> None:
    """Stream a (possibly large) file through the UTF-8 decoder in blocks, counting lines, so the bad line is named."""
    line, rest = 1, b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(CHUNK)
            data, rest = rest + block, b""
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                if block and err.reason == "unexpected end of data":  # a character cut by the block boundary
                    rest, data = data[err.start:], data[:err.start]
                else:
                    raise not_utf8(path, line + data.count(b"\n", 0, err.start), data[err.start], what) from None
            line += data.count(b"\n")
            if not block:
                return


def check_arg_text(text: str | None, what: str) -> None:
    """Arguments and piped lines arrive with undecodable bytes as lone surrogates, which tokenizers reject with a
    TypeError: name the option instead."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = ord(bad) - 0xDC00 if 0xDC80 <= ord(bad) <= 0xDCFF else ord(bad)
        raise FtkitError(f"{what} is not UTF-8 text (byte 0x{byte:02x} at character {err.start + 1})") from None
