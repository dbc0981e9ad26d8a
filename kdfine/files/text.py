"""Text from files that reaches spreadsheets and terminals: class names, file names, archs.

Class names and file names come from the data a user trains on, or from a checkpoint someone
else wrote. Two places treat such text as instructions instead of data:

- a spreadsheet runs a CSV cell that begins with ``=``, ``+``, ``-`` or ``@`` (or a tab or
  carriage return, which :func:`printable` already writes as ``\\t``/``\\r``) as a formula:
  :func:`csv_cell` prefixes such a cell with ``'``, which spreadsheets show as text (a plain
  number such as ``-1`` is left alone: it cannot be a formula);
- a terminal obeys control characters (ESC sequences move the cursor, recolour, retitle the
  window, or write a clickable link): :func:`printable` writes them as ``\\x1b``-style escapes.

File names that are not valid UTF-8 (undecodable bytes carried by Python as surrogate escapes)
are written with their bytes as ``\\xNN`` (:func:`utf8_safe`), so a CSV stays valid UTF-8.
"""

from __future__ import annotations

import re

#: The first characters that make a spreadsheet evaluate a cell (OWASP's CSV injection list).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# C0 controls, DEL, C1 controls, and the Unicode controls that reorder text on screen (bidi)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def utf8_safe(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) as ``\\xNN``: valid UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_cell(text: str) -> str:
    """A text cell that no spreadsheet evaluates and no terminal obeys: :func:`printable`, then
    ``'`` before a leading ``= + - @`` (unless the cell is a plain number such as ``-1``)."""
    text = printable(text)
    if text.startswith(FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (ESC, BEL, CR, newline, C1,
    bidi overrides) written as ``\\x1b``/``\\u202e`` escapes, undecodable bytes as ``\\xNN``."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), utf8_safe(text))
