"""Render options stored as bit flags."""

OUTLINE = 1 << 0
FILL = 1 << 1
SHADOW = 1 << 2


def has(flags: int, flag: int) -> bool:
    return flags & flag != 0


def describe(flags: int) -> str:
    names = [name for name, bit in (("outline", OUTLINE), ("fill", FILL), ("shadow", SHADOW)) if has(flags, bit)]
    return " & ".join(names) or "<none>"
