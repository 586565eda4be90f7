"""Text safe for a terminal: control characters shown as visible escapes, never sent raw.

Job records, notes, log names and logs can come from a teammate's fetched refs
or from a job's output, so none of it may reach a terminal raw: an escape
sequence could set the window title, write the clipboard (OSC 52), hide text
or move the cursor. Every string shown to a person goes through `visible`,
every log shown through `visible_bytes`. Pure: no imports from the package.

The rules:

- C0 controls (U+0000-U+001F) other than tab, DEL (U+007F) and C1 controls
  (U+0080-U+009F), ESC included, become `\\xNN` (`\\r` for a carriage return,
  `\\n` for a newline unless newlines are allowed);
- the bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069),
  which reorder what is displayed, become `\\uNNNN`;
- lone surrogates (from undecodable bytes read with `surrogateescape`) become
  `\\xNN` for the byte they stand for, `\\uNNNN` otherwise;
- everything else, backslashes included, is left as it is: printable text
  comes out unchanged.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator

_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# What JSON leaves raw that a terminal would act on (json.dumps escapes C0 itself).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r"}
BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def visible(text: str, *, newlines: bool = False) -> str:
    """`text` with every control character shown as an escape (see the module's rules).

    Tabs are kept; newlines are kept only when `newlines` is true.
    """
    pattern = _UNSAFE_KEEP_NEWLINES if newlines else _UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(_escape, text)


def visible_bytes(data: bytes) -> bytes:
    """A log's bytes made safe for a terminal: UTF-8 kept, newlines and tabs kept,
    undecodable bytes shown as `\\xNN`, control characters as escapes."""
    text = data.decode("utf-8", errors="surrogateescape")
    return visible(text, newlines=True).encode("utf-8")


def visible_stream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`visible_bytes` for data that arrives in pieces: a UTF-8 character split
    between two pieces is decoded whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield visible(text, newlines=True).encode("utf-8")
    rest = decoder.decode(b"", final=True)
    if rest:
        yield visible(rest, newlines=True).encode("utf-8")


def json_safe(encoded: str) -> str:
    """JSON text (from json.dumps with ensure_ascii=False) with DEL, C1 controls,
    bidi controls and lone surrogates written as \\uNNNN escapes; still the same JSON."""
    if encoded.isascii() and "\x7f" not in encoded:  # the common case, scanned in C
        return encoded
    if _JSON_UNSAFE.search(encoded) is None:
        return encoded
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)
