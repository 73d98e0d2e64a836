"""Stop strings over streamed text: emit what is safe, hold what might still become a stop string.

A stop string may arrive split across many deltas ("E", "N", "D"). The matcher holds back the longest
suffix of its pending text that is a prefix of some stop string and emits the rest, so text that is part
of a stop string is never streamed. When a stop string completes, the text before it is emitted and the
stop string itself is dropped, as OpenAI does.

Earliest match wins: the occurrence that *completes* first, as if the text arrived one character at a
time (ties: the one that starts first, i.e. the longer one). That makes the result independent of how the
text was split into deltas, which depends on tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """One per request. `feed` each text delta; `flush` once at the end if no stop string matched."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        # A held suffix is a proper prefix of some stop string, so it is shorter than the longest one.
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string has completed).

        After a stop, every further feed returns ("", True): nothing past the stop string is emitted.
        """
        if self._stopped:
            return "", True
        pending = self._pending + delta
        cut = self._earliest_stop(pending)
        if cut is not None:
            self._pending, self._stopped = "", True
            return pending[:cut], True
        hold = self._held_suffix_len(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Release held text at the end of generation (it never became a stop string)."""
        if self._stopped:
            return ""
        held, self._pending = self._pending, ""
        return held

    def _earliest_stop(self, text: str) -> int | None:
        """Start of the stop occurrence in `text` that ends first (then starts first), or None."""
        # find() gives each stop's first occurrence, which is also its first-ending one.
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self._stops) if i >= 0]
        return min(hits)[1] if hits else None

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a (proper) prefix of some stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stops):
                return n
        return 0
