"""Inter-annotator agreement on rankings: Krippendorff's α (ordinal), pairwise agreement, Kendall's τ-b.

A ranking is a list of ranks in canonical response order (1 = best, ties share a rank).
For α, each response of each task is a unit and each annotator's rank of it a value; units with
fewer than two values are not pairable and drop out (Krippendorff 2011, "Computing
Krippendorff's Alpha-Reliability").
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def _order(a: float, b: float) -> int:
    return (a > b) - (a < b)


def pairwise_agreement(a: Sequence[float], b: Sequence[float]) -> float:
    """The fraction of response pairs two rankings order the same way (a tie is its own answer)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return 1.0
    return sum(_order(a[i], a[j]) == _order(b[i], b[j]) for i, j in pairs) / len(pairs)


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's τ-b (ties corrected); None when either ranking is all ties."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        x, y = _order(a[i], a[j]), _order(b[i], b[j])
        if x == 0 and y == 0:
            continue
        if x == 0:
            ties_a += 1
        elif y == 0:
            ties_b += 1
        elif x == y:
            concordant += 1
        else:
            discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else None


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float | None]]) -> float | None:
    """α for ordinal data; `units` rows are units, entries the annotators' values (None = missing).

    None when there is nothing to compare (no unit with two values) or no variation at all.
    """
    values_by_unit = [[v for v in u if v is not None] for u in units]
    values_by_unit = [u for u in values_by_unit if len(u) >= 2]
    if not values_by_unit:
        return None
    cats = sorted({v for u in values_by_unit for v in u})
    index = {c: i for i, c in enumerate(cats)}
    o = [[0.0] * len(cats) for _ in cats]  # coincidence matrix
    for u in values_by_unit:
        m = len(u)
        for x, y in itertools.permutations(range(m), 2):
            o[index[u[x]]][index[u[y]]] += 1 / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)

    def delta2(c: int, k: int) -> float:  # the ordinal metric: counts between the two categories
        lo, hi = min(c, k), max(c, k)
        return (sum(n_c[lo:hi + 1]) - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c][k] * delta2(c, k) for c in range(len(cats)) for k in range(len(cats)))
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in range(len(cats)) for k in range(len(cats))) / (n - 1)
    if expected == 0:
        return None
    return 1 - observed / expected


def task_agreement(ranks: Sequence[Sequence[float]]) -> float:
    """Mean pairwise agreement over every pair of annotators of one task (1.0 with one annotator)."""
    pairs = list(itertools.combinations(ranks, 2))
    if not pairs:
        return 1.0
    return sum(pairwise_agreement(a, b) for a, b in pairs) / len(pairs)


def agreement_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """α, mean pairwise agreement and mean τ-b over tasks ranked by two or more annotators."""
    by_task: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for r in rows:
        by_task[r["task_id"]][r["annotator"]] = r["ranks"]
    shared = {t: a for t, a in by_task.items() if len(a) >= 2}
    if not shared:
        return {"krippendorff_alpha": None, "pairwise_agreement": None, "kendall_tau": None, "n_tasks": 0}
    people = sorted({p for a in shared.values() for p in a})
    units = []
    for given in shared.values():
        k = len(next(iter(given.values())))
        units += [[given[p][i] if p in given else None for p in people] for i in range(k)]
    taus = [t for a in shared.values() for x, y in itertools.combinations(a.values(), 2)
            if (t := kendall_tau_b(x, y)) is not None]
    return {"krippendorff_alpha": krippendorff_alpha_ordinal(units),
            "pairwise_agreement": sum(task_agreement(list(a.values())) for a in shared.values()) / len(shared),
            "kendall_tau": sum(taus) / len(taus) if taus else None, "n_tasks": len(shared)}
