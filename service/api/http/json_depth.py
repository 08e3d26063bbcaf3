"""How deep a JSON document nests, measured before it is parsed and without recursion.

Python's json module recurses once per level and raises RecursionError about 1,000 levels
down; the HTTP front refuses anything nested deeper than MAX_DEPTH before parsing it, as a
bad request naming the limit. The scan is linear, vectorised with numpy over chunks of the
body: only quotes, backslashes and brackets are looked at; a quote after an odd run of
backslashes is escaped, the others open and close strings, and brackets outside strings
move the depth.
"""

from __future__ import annotations

import numpy as np

MAX_DEPTH = 400
"""Deepest nesting of arrays and objects a JSON request may have (a tensor needs a few levels)."""
_CHUNK = 1 << 20  # bytes per step: a few MB of index arrays at most
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]], _STEP[[ord("]"), ord("}")]] = 1, -1
_INTERESTING = bytes(1 if c in b'"\\[]{}' else 0 for c in range(256))  # bytes.translate: 1 marks a symbol


class _Scan:
    """The state carried from one chunk to the next."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.backslashes = 0
        """Length of the run of backslashes that ended the previous chunk (0: none)."""

    def deeper_than(self, chunk: bytes, limit: int) -> bool:
        pos = np.flatnonzero(np.frombuffer(chunk.translate(_INTERESTING), dtype=bool))
        if not len(pos):
            self.backslashes = 0
            return False
        sym = np.frombuffer(chunk, dtype=np.uint8)[pos]
        index = np.arange(len(pos))
        slash = sym == _BACKSLASH
        # Runs of adjacent backslashes: `run[k]` is how many end at (and include) symbol k.
        adjacent = np.zeros(len(pos), dtype=bool)
        adjacent[1:] = slash[1:] & slash[:-1] & (np.diff(pos) == 1)
        carried = bool(slash[0] and pos[0] == 0 and self.backslashes)
        start = np.maximum.accumulate(np.where(adjacent, 0, index))
        run = np.where(slash, index - start + 1, 0)
        if carried:
            run[start == 0] += self.backslashes
        # Backslashes right before symbol k (the run that ends at the byte before it).
        before = np.zeros(len(pos), dtype=np.int64)
        touching = (np.diff(pos) == 1) & slash[:-1]
        before[1:] = np.where(touching, run[:-1], 0)
        if pos[0] == 0:
            before[0] = self.backslashes
        quote = (sym == _QUOTE) & (before % 2 == 0)
        inside = (np.cumsum(quote) + self.in_string) % 2 == 1  # after symbol k (quotes move no depth)
        steps = np.where(inside, 0, _STEP[sym]).astype(np.int64)
        running = np.cumsum(steps)
        if self.depth + int(running.max()) > limit:
            return True
        self.depth += int(running[-1])
        self.in_string = bool(inside[-1])
        self.backslashes = int(run[-1]) if slash[-1] and pos[-1] == len(chunk) - 1 else 0
        return False


def nested_deeper_than(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in `data` (JSON, valid or not) nest deeper than `limit`,
    brackets inside strings aside."""
    if data.count(b"[") + data.count(b"{") <= limit:  # cannot nest deeper than it opens
        return False
    scan = _Scan()
    return any(scan.deeper_than(data[i:i + _CHUNK], limit) for i in range(0, len(data), _CHUNK))
