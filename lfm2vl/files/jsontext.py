"""JSON from outside (files, options, request fields), read with a bound on how deep it nests.

json.loads recurses once per level of arrays and objects and so does most code that walks what it returns
(templates, schema compilers, printers): text nested thousands deep raises RecursionError, a few hundred deep
crashes that later code. Every reader of untrusted JSON goes through here instead:

    value = loads(text)                  # like json.loads; json.JSONDecodeError (a ValueError) for bad text
    check_depth(value, "tools[0].function.parameters")   # a value parsed elsewhere (a request body's field)

`loads` reports text nested more than MAX_DEPTH levels, and a number too long for Python's int conversion, as a
json.JSONDecodeError with its line and column, like any other malformed JSON, so each caller's existing handling of
JSON errors names its file, line or field. `check_depth` walks without recursion.

Imports nothing of lfm2vl.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 100  # levels of arrays and objects; real configs, schemas, messages and tool arguments stay far below

_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[\]{}]')  # a string (skipped whole) or a bracket


def too_deep(max_depth: int = MAX_DEPTH) -> str:
    """The wording of the error, for callers and tests."""
    return f"nested too deeply (more than {max_depth} levels of arrays and objects)"


def loads(text: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads(text) for text from outside; json.JSONDecodeError for text that is not JSON, nests more than
    max_depth levels, or holds an integer too long to convert."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(too_deep(max_depth), text, _deepest(text, max_depth)) from None
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        limit = _int_digits()
        raise json.JSONDecodeError(f"an integer with more than {limit} digits", text, _long_number(text, limit)) \
            from None
    if depth_exceeds(value, max_depth):
        raise json.JSONDecodeError(too_deep(max_depth), text, _deepest(text, max_depth))
    return value


def depth_exceeds(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """Whether `value` nests more than max_depth levels of mappings, lists and tuples (a scalar: 0 levels, [] or
    {}: 1). Breadth first without recursion; a container shared or cycled counts once a level, so the walk ends."""
    level = [value]
    for _ in range(max_depth):
        containers = {id(v): v for v in level if isinstance(v, (Mapping, list, tuple))}
        if not containers:
            return False
        level = [x for c in containers.values() for x in (c.values() if isinstance(c, Mapping) else c)]
    return any(isinstance(v, (Mapping, list, tuple)) for v in level)


def check_depth(value: Any, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """`value`, or a ValueError "`where` is nested too deeply (...)" when it nests more than max_depth levels."""
    if depth_exceeds(value, max_depth):
        raise ValueError(f"{where} is {too_deep(max_depth)}")
    return value


def _deepest(text: str, max_depth: int) -> int:
    """The index of the bracket that opens level max_depth + 1 (else of the deepest one), outside strings."""
    depth = deepest = at = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, m.start()
                if depth > max_depth:
                    break
        elif c in "]}":
            depth -= 1
    return at


def _int_digits() -> int:
    """The most digits Python converts to an int (sys.get_int_max_str_digits; 4300 by default)."""
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)()


def _long_number(text: str, limit: int) -> int:
    """The index of the first run of more than `limit` digits (0 when none is found)."""
    m = re.search(r"\d{%d,}" % (limit + 1), text)
    return m.start() if m else 0
