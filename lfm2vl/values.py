"""What counts as a number in lfm2vl's options (sampling, request limits, image knobs): Python's and numpy's real
scalars (np.float32(0.5), np.int64(4)), never a bool. Every option check reads numbers through `plain_number`, so
they all accept the same values and hand Python ints and floats on.
"""
from __future__ import annotations

import numbers

import numpy as np


def plain_number(value, integer: bool = False) -> int | float | None:
    """`value` as a Python int (an integral value) or float (another real one), or None when it is not a number
    (a bool, a string, a complex number, ...). integer=True: None for anything but an integral value."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if not integer and isinstance(value, numbers.Real):
        return float(value)
    return None
