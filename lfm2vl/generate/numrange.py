"""Regular expressions for the numbers of a range: `minimum`, `maximum`, `exclusiveMinimum` and `exclusiveMaximum` of
a JSON schema, for the tool-call grammar (toolcall.py), whose numbers are decimals without exponent.

`at_least(bound, strict)` and `at_most(bound, strict)` each give a regex of the signed decimal texts on one side of a
bound; the grammar intersects them with its own number terminal (llguidance's `&`), which fixes the form (no
leading zeros, no trailing zeros after the point, no "-0"). That intersection is what makes the pieces here simple:
a fraction's digits compare like strings once trailing zeros are gone, so "x.F >= b.G" is "x > b, or x = b and
F >= G as strings", and forms the number terminal excludes may appear in the alternatives.
"""
from __future__ import annotations

from decimal import Decimal

ANY_FRACTION = r"(\.[0-9]+)?"
UNSIGNED = "[0-9]+" + ANY_FRACTION
_LIMIT = Decimal(10) ** 16  # beyond the number terminal's 15 integer digits


def bound(value, keyword: str) -> Decimal:
    """A schema bound as an exact decimal; ValueError naming the keyword when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ValueError(f"{keyword}={value!r} is invalid; expected a finite number")
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def at_least(low: Decimal, strict: bool = False) -> str:
    """Decimal texts whose value is >= low (> low when strict)."""
    if low < -_LIMIT:
        return "-?" + UNSIGNED
    if low < 0:
        return f"({UNSIGNED}|-({_magnitude_le(-low, strict)}))"
    return f"({_magnitude_ge(min(low, _LIMIT), strict)})"


def at_most(high: Decimal, strict: bool = False) -> str:
    """Decimal texts whose value is <= high (< high when strict)."""
    if high > _LIMIT:
        return "-?" + UNSIGNED
    if high < 0:
        return f"(-({_magnitude_ge(min(-high, _LIMIT), strict)}))"
    alts = ["-" + UNSIGNED, _magnitude_le(high, strict)]
    return "(" + "|".join(a for a in alts if a) + ")"


def _parts(m: Decimal) -> tuple[int, str]:
    """(integer part, fraction digits without trailing zeros) of m >= 0."""
    text = format(m, "f")
    whole, _, frac = text.partition(".")
    return int(whole), frac.rstrip("0")


def _magnitude_ge(m: Decimal, strict: bool) -> str:
    whole, frac = _parts(m)
    if frac:
        alts = [frac[:i] + f"[{int(c) + 1}-9]" + "[0-9]*" for i, c in enumerate(frac) if c != "9"]
        alts.append(frac + ("[0-9]+" if strict else "[0-9]*"))
        same = rf"\.({'|'.join(alts)})"
    else:
        same = r"\.[0-9]+" if strict else ANY_FRACTION
    return f"{_int_ge(whole + 1)}{ANY_FRACTION}|{whole}{same}"


def _magnitude_le(m: Decimal, strict: bool) -> str:
    whole, frac = _parts(m)
    alts = [f"({_int_le(whole - 1)}){ANY_FRACTION}"] if whole >= 1 else []
    if frac:
        lower = [frac[:i] + f"[0-{int(c) - 1}]" + "[0-9]*" for i, c in enumerate(frac) if c != "0"]
        lower += [frac[:i] for i in range(1, len(frac))] + ([] if strict else [frac])
        alts.append(rf"{whole}(\.({'|'.join(lower)}))?")
    elif not strict:
        alts.append(str(whole))
    return "|".join(alts)


def _int_ge(n: int) -> str:
    """Integer texts (n >= 0) whose value is >= n: as many digits and not smaller, or more digits."""
    s = str(n)
    return f"({_digits_ge(s)}|[1-9][0-9]{{{len(s)},}})"


def _int_le(n: int) -> str:
    """Integer texts (n >= 0) whose value is <= n: fewer digits, or as many and not larger."""
    s = str(n)
    shorter = [f"[0-9]{{1,{len(s) - 1}}}"] if len(s) > 1 else []
    return "|".join(shorter + [_digits_le(s)])


def _digits_ge(s: str) -> str:
    alts = [s[:i] + f"[{int(c) + 1}-9]" + (f"[0-9]{{{len(s) - i - 1}}}" if i < len(s) - 1 else "")
            for i, c in enumerate(s) if c != "9"]
    return "|".join(alts + [s])


def _digits_le(s: str) -> str:
    alts = [s[:i] + f"[0-{int(c) - 1}]" + (f"[0-9]{{{len(s) - i - 1}}}" if i < len(s) - 1 else "")
            for i, c in enumerate(s) if c != "0"]
    return "|".join(alts + [s])
