"""Which prompts share a prefill pass: BatchGenerator prefills several prompts in one forward, right-padded to the
pass length, so a burst of requests reads the weights once instead of once each."""
from __future__ import annotations


def prefill_group(left: list[int], starts: list[int], budget: int, capacity: int) -> tuple[list[int], int]:
    """The prompts of one pass, as indices in arrival order, and its length T. left[i]: prompt i's tokens still to
    prefill; starts[i]: tokens its cache row holds; budget: tokens the pass may take (padding included); capacity:
    tokens a cache row holds. A prompt with T tokens or more left feeds T of them, a shorter one is padded to T. The
    first prompt always goes (min(left, budget) of it); another joins, lengthening the pass where that helps, while
    the pass stays within the budget, no prompt in it has less than half of T left (at most half a pass is
    padding) and every row has room for T more tokens."""
    group, T = [0], min(left[0], budget)
    for i in range(1, len(left)):
        want = max(T, min(left[i], budget))
        for t in (want, T) if want > T else (T,):
            members = group + [i]
            if (len(members) * t <= budget and all(2 * left[m] >= t for m in members)
                    and all(starts[m] + t <= capacity for m in members)):
                group, T = members, t
                break
    return group, T
