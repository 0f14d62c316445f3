"""What the lab accepts as names and text, shared by the lab (its own imports, pushes, URLs) and devices.

No third-party imports: the device side uses these checks without the ``server`` extra.
"""

from __future__ import annotations

import re

#: A species (one master gallery per project and species) is also a URL path segment: letters, digits,
#: space, ``_ . -``; it starts with a letter or digit, so never ``.`` / ``..`` or a path.
SPECIES_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
SPECIES_RULE = "1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit"
#: control characters (C0, DEL, C1) and the Unicode line / paragraph separators
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def species_problem(value: object) -> str | None:
    """None if ``value`` is a species name the lab serves, else why not."""
    if not isinstance(value, str) or not SPECIES_RE.match(value):
        return f"species {str(value)[:80]!r} is not a valid species name ({SPECIES_RULE})"
    return None


def text_problem(name: str, value: object, limit: int, *, required: bool = False, forbid: str = "",
                 trimmed: bool = False, controls: bool = False) -> str | None:
    """None if ``value`` is acceptable text for field ``name`` (or absent and not required), else why not.

    Acceptable: a string of at most ``limit`` characters without control characters (with ``controls``:
    without NUL only - file names can hold the others) or any character of ``forbid``; non-empty when
    ``required``; without surrounding whitespace when ``trimmed`` (ids).
    """
    if value is None:
        return f"{name} is missing" if required else None
    if not isinstance(value, str):
        return f"{name} is not text"
    if required and not value:
        return f"{name} is empty"
    if len(value) > limit:
        return f"{name} is longer than {limit} characters"
    if "\x00" in value or (not controls and _CONTROL_RE.search(value)):
        return f"{name} holds control characters"
    if trimmed and value != value.strip():
        return f"{name} has leading or trailing whitespace"
    bad = sorted({c for c in value if c in forbid})
    if bad:
        return f"{name} must not contain {' '.join(repr(c) for c in bad)}"
    return None
