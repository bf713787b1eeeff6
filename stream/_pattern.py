"""Topic-name patterns of subscriptions, matched with RE2.

A subscription pattern comes from a client and is matched against every topic name on the
broker, under the group's lock. Python's `re` backtracks: `(a+)+b` against a 40-character
name runs for hours. RE2 matches in time linear in the name, as Kafka's broker-side patterns
(RE2/J, KIP-848) do, at the price of RE2's syntax: no backreferences, no lookaround.
The client checks patterns with the same engine, so a pattern the broker would refuse fails
where it is written.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

# A subscription's pattern may be at most this long (characters).
PATTERN_CHARS_MAX = 1_000

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is the caller's error, not a line on stderr


class PatternError(ValueError):
    """A pattern RE2 cannot compile, or one over PATTERN_CHARS_MAX."""


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern (an re2 pattern: `.fullmatch(name)`), or PatternError saying why."""
    if len(pattern) > PATTERN_CHARS_MAX:
        raise PatternError(
            f"pattern of {len(pattern)} characters; the limit is {PATTERN_CHARS_MAX}"
        )
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as e:
        detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(
            f"bad pattern {pattern[:80]!r}: {detail} (RE2 syntax: no backreferences or lookaround)"
        ) from None
