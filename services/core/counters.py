"""Numbered names (run-7, ds-000007, feedloop-v7) that never reuse a number already on disk.

The numbers come from Redis INCR counters. A Redis that restarts without its data (no AOF, a new pod, a
failover to an empty replica) starts them again at 1, while the folders of earlier runs, dataset versions
and adapters are still on disk: the next run would collide with them. :func:`next_number` raises the
counter above the highest number on disk, in one atomic script, before it hands a number out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# KEYS: counter. ARGV: the highest number already taken (0: none). Returns the next free number.
_NEXT = """
local n = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if n <= floor then
  n = floor + 1
  redis.call('SET', KEYS[1], n)
end
return n
"""


def highest_on_disk(folders: Iterable[Path | str | None], pattern: str) -> int:
    r"""The highest number N among the entries of folders whose name fully matches pattern (one group: N,
    no anchors), e.g. ``r"ds-(\d+)"``. Hidden temporary folders of an interrupted write (``.ds-000007.x1y2``)
    count too, so a half-written version also keeps its number from being reused."""
    regex = re.compile(pattern)
    hidden = re.compile(rf"\.{pattern}(?:\.|$)")
    highest = 0
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder)
        if not path.is_dir():
            continue
        for entry in path.iterdir():
            match = regex.fullmatch(entry.name) or hidden.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest


def next_number(redis: Any, key: str, floor: int = 0) -> int:
    """INCR key, but never return a number <= floor (the highest one on disk). Sync Redis client."""
    return int(redis.eval(_NEXT, 1, key, floor))


async def next_number_async(redis: Any, key: str, floor: int = 0) -> int:
    """:func:`next_number` for an asyncio Redis client."""
    return int(await redis.eval(_NEXT, 1, key, floor))
