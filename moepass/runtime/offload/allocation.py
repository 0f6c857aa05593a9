"""Splitting a cache budget of expert slots across layers.

* ``even_split`` — the baseline: every layer gets the same number of slots.
* ``allocate_slots`` — AdapMoE's idea, on measured costs: a layer whose misses
  cost more gets more slots.  From a trace of the first calls (which experts
  each call needed, which the prefetcher had predicted for it) an LRU cache
  of every size ``c`` is simulated per layer; its demand misses × the bytes
  a miss reads is the layer's cost at ``c``, and a dynamic program picks the
  split that minimises the total cost for the budget::

      best[l][b] = min over c ≤ min(E_l, b) of  best[l-1][b - c] + cost_l(c)

  (AdapMoE's own DP, src/dp.py, models the miss probability from the layer's
  prefetch accuracy and top-1 ratio; simulating the recorded trace measures
  the same two effects — a well-predicted or top-1-heavy layer misses less —
  directly.)
"""

from __future__ import annotations

import collections
from typing import Sequence

__all__ = ["even_split", "simulate_misses", "miss_curve", "allocate_slots"]

#: One call of a layer: (experts it needed, experts predicted for it beforehand).
Call = tuple[frozenset[int], frozenset[int]]


def even_split(total: int, limits: Sequence[int]) -> list[int]:
    """``total`` slots split as evenly as possible, layer l getting at most ``limits[l]``."""
    sizes = [0] * len(limits)
    left = max(0, int(total))
    while left > 0:
        open_layers = [i for i, limit in enumerate(limits) if sizes[i] < limit]
        if not open_layers:
            break
        share = max(1, left // len(open_layers))
        for i in open_layers:
            take = min(share, limits[i] - sizes[i], left)
            sizes[i] += take
            left -= take
            if left == 0:
                break
    return sizes


def simulate_misses(trace: Sequence[Call], capacity: int, prefetch: bool) -> int:
    """Demand misses of an LRU cache of ``capacity`` experts on ``trace``.

    With ``prefetch`` the predicted experts of a call are brought in (most
    recently used) before it, at most ``capacity`` of them, as the prefetcher does.
    """
    if capacity <= 0:
        return sum(len(needed) for needed, _ in trace)
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()

    def use(expert: int) -> bool:
        hit = expert in cache
        if hit:
            cache.move_to_end(expert)
        else:
            cache[expert] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
        return hit

    misses = 0
    for needed, predicted in trace:
        if prefetch:
            for expert in sorted(predicted)[:capacity]:
                use(expert)
        for expert in sorted(needed):
            misses += not use(expert)
    return misses


def miss_curve(trace: Sequence[Call], num_experts: int, prefetch: bool) -> list[int]:
    """Demand misses at every capacity 0..num_experts."""
    return [simulate_misses(trace, c, prefetch) for c in range(num_experts + 1)]


def allocate_slots(costs: Sequence[Sequence[float]], total: int) -> list[int]:
    """Slots per layer minimising Σ costs[l][c_l] subject to Σ c_l ≤ total.

    ``costs[l][c]`` is layer l's cost with c slots (c = 0..E_l).  The whole
    budget is used, as far as the E_l caps allow (an LRU cache's misses never
    grow with its size, so this loses nothing), and among splits of equal cost
    the most even one is taken (a tiny convex penalty on c_l breaks the ties),
    so the result is deterministic and does not pile spare slots on one layer.
    """
    layers = len(costs)
    total = max(0, min(int(total), sum(len(c) - 1 for c in costs)))  # more than every expert buys nothing
    scale = 1e-9 * (max((abs(v) for c in costs for v in c), default=0.0) + 1.0)
    inf = float("inf")
    # best[b] after layer l: minimal cost of layers 0..l using exactly b slots
    best = [0.0] + [inf] * total
    choice: list[list[int]] = []
    for layer_costs in costs:
        new = [inf] * (total + 1)
        pick = [0] * (total + 1)
        for budget in range(total + 1):
            for c in range(min(len(layer_costs) - 1, budget) + 1):
                previous = best[budget - c]
                if previous == inf:
                    continue
                value = previous + layer_costs[c] + scale * c * c
                if value < new[budget]:
                    new[budget], pick[budget] = value, c
        best = new
        choice.append(pick)
    budget = total
    sizes = [0] * layers
    for layer in range(layers - 1, -1, -1):
        sizes[layer] = choice[layer][budget]
        budget -= sizes[layer]
    return sizes
