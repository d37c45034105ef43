"""Where each key of a TOML text is written: ``KeyLines`` (tomllib reports no positions)."""
from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

Path_ = tuple  # a key's position in the document: ("steps", 0, "level")


class KeyLines:
    """Line numbers (1-based) of the keys and table headers of a TOML text, found by tomllib
    itself: the text is parsed up to each line in turn, and a key path seen for the first
    time goes to the first line of the piece that made the prefix parse (a multi-line string
    or array: the line of its key). Each ``[[steps]]`` is ``("steps", i)``; keys inside inline
    tables and arrays map to their key's line. Quadratic in the line count, which recipes keep
    small; a text past MAX_LINES gets no lines (errors then name the key only)."""

    MAX_LINES = 2000

    def __init__(self, text: str):
        self.lines: dict[Path_, int] = {}
        rows = text.splitlines()
        if len(rows) > self.MAX_LINES:
            return
        start = 0  # the first line not in the last prefix that parsed
        for end in range(1, len(rows) + 1):
            try:
                data = tomllib.loads("\n".join(rows[:end]))
            except tomllib.TOMLDecodeError:
                continue  # inside a value that spans lines
            first = next((i + 1 for i in range(start, end) if rows[i].strip() and not rows[i].lstrip().startswith("#")), end)
            for path in _key_paths(data, ()):
                self.lines.setdefault(path, first)
            start = end

    def line_of(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _key_paths(value: Any, path: Path_):
    """Every key path in a parsed TOML value (list items by index)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield path + (key,)
        yield from _key_paths(item, path + (key,))
