"""The range regexes of forced tool-call numbers, checked against Decimal comparisons on every decimal text the
call grammar's number terminal can write around each bound."""
import itertools
import re
from decimal import Decimal

import pytest

from lfm2vl.generate.callgrammar import TERMINALS
from lfm2vl.generate.numrange import at_least, at_most, bound

NUMBER = re.search(r"^NUMBER: /(.*)/$", TERMINALS, re.M).group(1)


def texts():
    """Number-terminal texts: integers to 1,200 and decimals with up to 3 places, both signs."""
    out = set()
    for whole, frac in itertools.product(list(range(0, 130)) + [999, 1000, 1001, 1199], ["", "5", "05", "25", "99",
                                                                                         "001", "75", "1", "9"]):
        for sign in ("", "-"):
            t = f"{sign}{whole}" + (f".{frac}" if frac else "")
            if re.fullmatch(NUMBER, t):
                out.add(t)
    return sorted(out)


TEXTS = texts()


@pytest.mark.parametrize("b", ["0", "1", "-1", "7", "2.5", "-2.5", "0.05", "-0.05", "99", "100", "123.25", "1000",
                               "-1000.001"])
@pytest.mark.parametrize("strict", [False, True])
def test_range_regexes_agree_with_decimal_comparison(b, strict):
    low, high = re.compile(at_least(Decimal(b), strict)), re.compile(at_most(Decimal(b), strict))
    for t in TEXTS:
        v, B = Decimal(t), Decimal(b)
        assert bool(low.fullmatch(t)) == (v > B if strict else v >= B), (t, b, strict)
        assert bool(high.fullmatch(t)) == (v < B if strict else v <= B), (t, b, strict)


def test_bounds_beyond_the_terminal_leave_one_side_open():
    assert re.fullmatch(at_least(Decimal("-1e30")), "-5") and re.fullmatch(at_most(Decimal("1e30")), "123456789")
    assert not re.fullmatch(at_least(Decimal("1e30")), "999999999999999")


@pytest.mark.parametrize("value", [True, "3", float("nan"), float("inf"), None])
def test_a_bound_that_is_not_a_number_is_a_value_error_naming_the_keyword(value):
    with pytest.raises(ValueError, match="minimum"):
        bound(value, "parameters.n.minimum")
