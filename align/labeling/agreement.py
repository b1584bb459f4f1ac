"""Inter-annotator agreement on rankings (Krippendorff's α (ordinal), pairwise agreement, Kendall's τ-b) and
each annotator's reliability (a one-coin Dawid-Skene model: estimated accuracy, interval, vote weight).

A ranking is a list of ranks in canonical response order (1 = best, ties share a rank).
For α, each response of each task is a unit and each annotator's rank of it a value; units with
fewer than two values are not pairable and drop out (Krippendorff 2011, "Computing
Krippendorff's Alpha-Reliability").
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.labeling.store import task_flags


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


def task_agreement(ranks: Sequence[Sequence[float]], weights: Sequence[float] | None = None) -> float:
    """Mean pairwise agreement over every pair of annotators of one task (1.0 with one annotator).

    With `weights` (one per ranking: combine=dawid_skene's vote weights), each pair of annotators counts by the
    product of theirs, so one weighted 0 drops out (1.0 when fewer than two are left); all 0, they count alike.
    """
    pairs = list(itertools.combinations(range(len(ranks)), 2))
    if weights is None or not any(weights):
        weights = [1.0] * len(ranks)
    counts = [weights[a] * weights[b] for a, b in pairs]
    if not sum(counts):
        return 1.0
    return sum(c * pairwise_agreement(ranks[a], ranks[b]) for c, (a, b) in zip(counts, pairs, strict=True)) / sum(counts)


def copy_groups(texts: Sequence[str]) -> list[list[int]]:
    """The indices of each distinct answer (text stripped) of a task, in response order; blank ones are none.

    A task can hold copies of one answer (sampled twice, kept after resampling), each ranked apart: how
    someone orders two copies says nothing, so the export, the reliability model and the admin view compare
    answers, each at its copies' mean rank (`merge_copies`).
    """
    copies: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        if text.strip():
            copies.setdefault(text.strip(), []).append(i)
    return list(copies.values())


def merge_copies(ranks: Sequence[float], groups: list[list[int]]) -> list[float]:
    """A ranking's rank of each answer of `copy_groups`: the mean of its copies' ranks."""
    return [sum(ranks[i] for i in group) / len(group) for group in groups]


def dense_ranks(ranks: list[int]) -> list[int]:
    """A ranking renumbered so tied answers share a rank and the next answer takes the next one (1, 1, 2, 3),
    as align.labeling.simulate.ranks_from_scores writes them. The store accepts either numbering of a tie (1, 1, 3, 4
    too), and only the order is the annotator's: the margin, a distance of ranks, must not depend on which."""
    distinct = sorted(set(ranks))
    return [distinct.index(r) + 1 for r in ranks]


def answer_ranks(row: dict[str, Any]) -> list[float]:
    """A ranking row's ranks (Store.submitted_rankings()) per distinct answer of its task, its tie numbered
    densely as the export reads it: 1, 1, 3, 4 and 1, 1, 2, 3 are one order (α counted them apart)."""
    return merge_copies(dense_ranks(row["ranks"]), copy_groups([str(x.get("text", "")) for x in row["responses"]]))


def agreement_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """α, mean pairwise agreement and mean τ-b over tasks ranked by two or more annotators, on each task's
    distinct answers (`answer_ranks`), as the export measures agreement."""
    by_task: dict[int, dict[str, list[float]]] = defaultdict(dict)
    for r in rows:
        by_task[r["task_id"]][r["annotator"]] = answer_ranks(r)
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


# ---------------------------------------------------------------------------- annotator reliability
#
# One-coin Dawid-Skene (Dawid & Skene 1979, one accuracy per annotator instead of a confusion
# matrix) on pairwise judgements. Every two responses i < j of a ranked task are an item whose true
# order is unknown; each annotator who ordered them casts a vote (a tie says nothing), right with
# probability q_a on any item. EM: the E-step turns the votes into the posterior
# P(i beats j) = sigmoid(sum of the voters' log-odds log(q / (1 - q)), + for i, - for j) from an
# even prior; the M-step sets q_a to the mean of a Beta prior updated with a's expected right votes.
# EM starts from each annotator's accuracy on the gold items (the Beta prior updated with them; the prior's
# mean for one with no gold votes): EM only climbs to the optimum nearest its start, and from the prior two
# annotators who agree outvote a third on the first step, whatever the gold answers say.
# Gold tasks' pairs have their known order fixed (they anchor who is right), and an annotator is
# scored only on items someone else, or a gold answer, also judged: alone on an item their vote
# would only agree with itself, so an annotator nobody can check keeps the prior. An annotator below
# chance gets weight 0, not a negative one: reversals on the checked items say nothing sure about
# the rest (a spammer may have learnt the gold items), so their votes are ignored, never turned round.
# The pairs of one ranking are treated as independent items (they are not quite: a ranking is
# transitive), as every pairwise Dawid-Skene does.

PRIOR_ACCURACY = 0.7  # the Beta prior's mean: how far an unchecked annotator is trusted
PRIOR_STRENGTH = 4.0  # ... worth this many judgements: one with few checked items stays near it

Item = tuple[Any, int, int]  # (task_id, i, j) with i < j in canonical response order


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def vote_weight(accuracy: float) -> float:
    """An annotator's vote in log-odds, log(q / (1 - q)); 0 at or below chance (ignored, never inverted)."""
    return max(0.0, math.log(accuracy / (1 - accuracy)))


def beta_interval(a: float, b: float, level: float = 0.95, grid: int = 4000) -> tuple[float, float]:
    """The central `level` interval of Beta(a, b), from its density summed on a grid of `grid` cells.

    Exact to a cell (1/4000) at the counts seen here; the standard library has no Beta quantile and
    align/labeling/ needs nothing more.
    """
    xs = [(i + 0.5) / grid for i in range(grid)]
    logs = [(a - 1) * math.log(x) + (b - 1) * math.log(1 - x) for x in xs]
    top = max(logs)
    density = [math.exp(v - top) for v in logs]
    total = sum(density)
    lo_mass, hi_mass = (1 - level) / 2 * total, (1 + level) / 2 * total
    cumulative, lo, hi = 0.0, 0.0, 1.0
    for x, d in zip(xs, density, strict=True):
        before, cumulative = cumulative, cumulative + d
        if before < lo_mass <= cumulative:
            lo = x - 0.5 / grid
        if before < hi_mass <= cumulative:
            hi = x + 0.5 / grid
            break
    return lo, hi


def pair_judgements(rows: Sequence[dict[str, Any]], gold: dict[Any, Sequence[float]] | None = None
                    ) -> tuple[dict[Item, list[tuple[str, int]]], dict[Item, int]]:
    """(votes, truth) from ranking rows and gold answers: each item's [(annotator, +1 i better / -1 j better)]
    and each gold item's known +1 / -1. Ties give no vote; rows of other kinds (A/B eval tasks) are left out,
    and so are pairs export makes no pair of (two copies of one answer, a blank one): how someone orders two
    copies says nothing of their accuracy."""
    votes: dict[Item, list[tuple[str, int]]] = defaultdict(list)
    for r in rows:
        if r.get("kind", "ranking") != "ranking" or r.get("unreadable"):
            continue
        ranks = r["ranks"]
        texts = [str(x.get("text", "")).strip() for x in r.get("responses") or []]
        for i, j in itertools.combinations(range(len(ranks)), 2):
            if len(texts) == len(ranks) and (texts[i] == texts[j] or not texts[i] or not texts[j]):
                continue
            if v := _order(ranks[j], ranks[i]):  # a lower rank is better
                votes[(r["task_id"], i, j)].append((r["annotator"], v))
    truth = {}
    for task_id, ranks in (gold or {}).items():
        for i, j in itertools.combinations(range(len(ranks)), 2):
            if v := _order(ranks[j], ranks[i]):
                truth[(task_id, i, j)] = v
    return dict(votes), truth


@dataclass
class Reliability:
    """What `dawid_skene` estimated: per annotator, and per item the posterior P(i beats j)."""

    annotators: dict[str, dict[str, Any]]  # name -> accuracy, interval, weight, judgements, checked, gold, gold_accuracy
    posterior: dict[Item, float]  # items that are not gold
    iterations: int
    converged: bool
    prior: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # above chance but below it on gold; an EM that did not settle

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the model, its prior, convergence, the per-annotator table and the warnings."""
        return {"model": "one-coin Dawid-Skene on pairwise judgements (EM from gold accuracy, gold fixed, Beta prior)",
                "prior": self.prior, "iterations": self.iterations, "converged": self.converged,
                "annotators": self.annotators, "warnings": self.warnings}


def dawid_skene(votes: dict[Item, list[tuple[str, int]]], truth: dict[Item, int] | None = None, *,
                prior_accuracy: float = PRIOR_ACCURACY, prior_strength: float = PRIOR_STRENGTH,
                max_iter: int = 500, tol: float = 1e-7) -> Reliability:
    """Fit annotator accuracies and item posteriors by EM (the model: this section's comment)."""
    truth = truth or {}
    alpha, beta = prior_accuracy * prior_strength, (1 - prior_accuracy) * prior_strength
    names = sorted({a for vs in votes.values() for a, _ in vs})
    checked = [x for x, vs in votes.items() if len(vs) >= 2 or x in truth]
    gold_right, gold_seen = Counter(), Counter()
    for x, answer in truth.items():
        for a, v in votes.get(x, []):
            gold_right[a] += v == answer
            gold_seen[a] += 1
    # EM starts from each annotator's accuracy on the gold items (Beta-smoothed; the prior without any). Started
    # at the prior for everyone, two who agree outvote a third on the first E-step and EM settles there, gold or
    # not: two reversed annotators of three were trusted (0.88) and every pair came out reversed.
    q = {a: (gold_right[a] + alpha) / (gold_seen[a] + alpha + beta) for a in names}

    def e_step() -> dict[Item, float]:
        w = {a: vote_weight(q[a]) for a in names}
        return {x: (1.0 if truth[x] > 0 else 0.0) if x in truth else _sigmoid(sum(w[a] * v for a, v in vs))
                for x, vs in votes.items()}

    converged, iterations, moved = False, 0, 0.0
    right, seen = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    while not converged and iterations < max_iter:
        iterations += 1
        posterior = e_step()
        right, seen = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for x in checked:
            p = posterior[x]
            for a, v in votes[x]:
                right[a] += p if v > 0 else 1 - p
                seen[a] += 1
        new = {a: (right[a] + alpha) / (seen[a] + alpha + beta) for a in names}
        moved = max((abs(new[a] - q[a]) for a in names), default=0.0)
        converged = moved < tol
        q = new
    posterior = e_step()
    judgements = Counter(a for vs in votes.values() for a, _ in vs)
    table = {}
    for a in names:
        lo, hi = beta_interval(right[a] + alpha, seen[a] - right[a] + beta)
        table[a] = {"accuracy": q[a], "interval": [lo, hi], "weight": vote_weight(q[a]), "judgements": judgements[a],
                    "checked": seen[a], "gold": gold_seen[a],
                    "gold_accuracy": gold_right[a] / gold_seen[a] if gold_seen[a] else None}
    # EM finds a local optimum: one that disagrees with the gold answers is worth saying out loud. Where nobody else
    # judged what they judged (every check of theirs a gold vote), it is the prior that outweighs a few gold votes.
    warnings = [f"{a}: estimated accuracy {r['accuracy']:.2f} (weight {r['weight']:.2f}) but {r['gold_accuracy']:.2f} "
                f"on the {r['gold']} gold votes: " + (
                    f"the estimate follows annotators who agree with {a}, not the gold answers; check their rankings "
                    "and the gold answers, and add gold tasks" if r["checked"] > r["gold"] else
                    f"no one else ranked their other tasks, so the prior (an annotator right {prior_accuracy:.0%} of "
                    f"the time, worth {prior_strength:g} judgements) outweighs so few gold votes; check their "
                    "rankings, and add gold tasks or overlap")
                for a, r in table.items() if r["gold_accuracy"] is not None and r["gold_accuracy"] < 0.5 < r["accuracy"]]
    if not converged and names:
        # Seen at 400 tasks of a good, a noisy and an adversarial simulated annotator without gold: EM drifts along
        # the good/noisy ambiguity, and pairs they disagree on go to whichever is ahead when it stops (p ~ 0.50).
        warnings.append(f"the estimate did not settle in {max_iter} iterations (accuracies still moving by {moved:.1e} "
                        "an iteration): annotators the rankings alone cannot tell apart drift, and a pair they disagree "
                        "on goes to whichever is ahead when it stops, at a posterior near 0.5; add gold tasks, which "
                        "anchor it, or set min_posterior (combine=dawid_skene) to drop such pairs")
    return Reliability(table, {x: p for x, p in posterior.items() if x not in truth}, iterations, converged,
                       {"accuracy": prior_accuracy, "strength": prior_strength}, warnings)


def rankings_for_reliability(rows: Sequence[dict[str, Any]], *, flagged: str = "keep") -> list[dict[str, Any]]:
    """The rankings the reliability estimate (and the admin tab's agreement) reads: not A/B eval tasks (align eval
    human=true), and a ranking flagged "all are bad" or "unsafe" as the export treats it (its `flagged`): kept,
    its pairs are exported and it votes on them like any other ranking (left out, a flagged ranking that alone
    ranked a task would leave its pairs no posterior, ties under dawid_skene); dropped, it is no vote either (as
    votes, the rankings whose pairs were dropped decided, and reversed, other people's pairs). A ranking that flags
    only replies unsafe (unsafe:<i>, no all_bad or bare unsafe) is read as given under either setting: its task's
    other pairs are exported, and the export's unsafe rule applies to the pairs after the estimate."""
    return [r for r in rows if r.get("kind", "ranking") == "ranking" and not str(r["batch"]).startswith("eval-")
            and not (flagged == "drop" and task_flags(r.get("flags")))
            and not r.get("unreadable")]  # (a row the app never wrote: the store says it)


def annotator_reliability(rows: Sequence[dict[str, Any]], gold: dict[Any, Sequence[float]] | None = None,
                          **options: Any) -> Reliability:
    """`dawid_skene` on every ranking in `rows` (Store.submitted_rankings()) with the store's gold answers."""
    votes, truth = pair_judgements(rows, gold)
    return dawid_skene(votes, truth, **options)
