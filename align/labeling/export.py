"""Rankings → preference pairs in TRL's columns, with provenance.

The rules (docs/labeling.md says the same):
- Only ranking tasks are exported: not gold tasks (their answers are known, they measure
  annotators) and not the A/B tasks of `align eval --human` (batches named `eval-...`).
- A ranking flagged "all are bad" or "unsafe" gives its pairs as any other (`flagged=keep`, the default: the
  guidelines ask for a least-bad order, and the unsafe reply ranked last, so "safe beats unsafe" is among them),
  each pair carrying the flags of its task's rankings in `flag` ("" for none) so a user can filter them;
  `flagged=drop` gives a task any of its rankings is flagged no pairs: neither the flagged ranking (as align did
  before) nor the other annotators' rankings of it, whose order could make the reply one of them flagged unsafe
  the chosen one, in a pair with no flag to filter it by (`dropped_flagged` counts the rankings so dropped).
- A reply flagged unsafe (`unsafe:<i>`: each reply has its own box) by any annotator of its task (one flag is
  enough) is never chosen over a reply nobody flagged (`unsafe_rule`): under keep such a pair has the unflagged
  one chosen whatever the ranks said (`flag` adds rejected_unsafe; votes, agreement and margin as the ranks give
  them; dawid_skene's p_chosen and weight 1), a pair of two flagged replies keeps the ranks' order (chosen_unsafe);
  under drop only the pairs with a flagged reply go (`dropped_unsafe`), not the task. The reliability estimate
  reads the rankings as given; the rule applies to the pairs after it. Ranking-level flags (all_bad, unsafe
  alone) are as above.
- A K-wise ranking gives a pair for each two responses it orders: up to K(K-1)/2 pairs.
- Several annotators on one task: `majority` takes, per pair of responses, the order most of
  them gave; `bradley_terry` fits ratings to all their comparisons of the task and orders by
  them. A pair with no majority (or equal ratings) is a tie. `dawid_skene` weighs each vote by
  its annotator's estimated reliability (align.labeling.agreement: a one-coin Dawid-Skene model fitted
  on every ranking, gold tasks' answers fixed) and orders each pair by the posterior probability;
  its pairs carry that probability (`p_chosen`, a soft label) and `weight` = 2 p_chosen - 1 (0 for
  a coin flip, 1 for certain; a kept tie has exactly 1/2 and 0); `min_posterior` drops the pairs
  less sure than it (`dropped_uncertain`). A posterior within POSTERIOR_TIE (1e-3) of 1/2 is a tie.
  Whatever `combine` is, summary.json holds each annotator's estimated accuracy, interval and weight.
- Ties: `drop` (default) gives no pair; `margin0` keeps it with margin 0 and the first response
  as "chosen": only useful with a loss that weights pairs by margin.
- `agreement` is the task's mean pairwise agreement between annotators (1.0 for one); tasks under
  `min_agreement` are dropped. `margin` is the distance of the two responses' mean ranks. With `dawid_skene`
  both weigh each annotator by their vote weight (one at weight 0 drops out), as the posterior does.
  `votes_chosen` / `votes_rejected` count the annotators who ordered the pair each way (ties neither).
- Identical responses never make a pair. Train/test are split by prompt (no prompt on both sides).
- `chosen_finished` / `rejected_finished`: whether each response ended (EOS) or was cut at the
  sampler's max_new_tokens (`align sample` records it; absent for responses stored without it).
  `align dpo` trains no end of turn after a cut response; summary.json counts `pairs_with_cut_side`.

Where it writes: a new folder, an empty one, or one a previous export wrote (it holds
dataset_dict.json and summary.json, or only names an export writes with a `.<name>.old-*` folder
beside it: what an older align killed mid-way left; a folder of train.jsonl and test.jsonl alone is
someone's data). A previous export's files (`WRITTEN`) are replaced; any other file there moves to
the new export as it is; any other folder is refused (`ExportError`) before anything is written.
The export is built beside the target and swapped in whole (two renames), under a lock file beside
the target (`.<name>.lock`) held from start to end, so two exports of one folder (the app's Export
button, `align export`, the pipeline) take turns. A killed export leaves the previous export or the
new one, or, killed between the two renames, no folder and the previous one set aside: the next
export puts it back before it starts, and removes what else a killed one left.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import itertools
import json
import math
import random
import secrets
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align.labeling.agreement import (
    annotator_reliability,
    copy_groups,
    dense_ranks,
    merge_copies,
    rankings_for_reliability,
    task_agreement,
)
from align.labeling.store import Store, flag_names, readable, task_flags, unsafe_replies

# Every name an export writes in its folder (align export adds its manifest, config and metrics): the
# only names a later export may replace there.
MANIFEST = "align.json"  # align.artifacts.MANIFEST, the stage's "finished" mark (align.labeling imports nothing else of align)
WRITTEN = ("dataset_dict.json", "train", "test", "train.jsonl", "test.jsonl", "summary.json", MANIFEST,
           "config.yaml", "metrics.jsonl")
# combine=dawid_skene: a posterior within this of 1/2 is a tie. EM stops when no annotator's accuracy moves by
# more than its tol (1e-7) in one step, but it gets there slowly, so two equally reliable annotators can end with
# vote weights some 1e-5 apart, and a pair only they disagree on with p_chosen 0.500001: EM's residue, not a
# decision (with no gold, 25 of 240 simulated pairs, every one the wrong way). 1e-3 is far above that residue
# and below any posterior worth training on (weight 2p - 1 = 0.002).
POSTERIOR_TIE = 1e-3


class ExportError(ValueError):
    """An export refused before anything was written, worded for the user."""


def check_target(out: str | Path) -> None:
    """Refuse (ExportError) a target that is neither absent, nor empty, nor a previous preferences export."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: give the export another output folder")
    entries = sorted(p.name for p in out.iterdir())
    export = (out / "dataset_dict.json").is_file() and (out / "summary.json").is_file()
    # What an older align killed mid-swap left: only names an export writes, and the rest of it set aside
    # beside it. Without that sibling, train.jsonl and test.jsonl are someone's data, never replaced.
    remains = entries and all(name in WRITTEN for name in entries) and any(
        out.parent.glob(f".{glob.escape(out.name)}.old-*"))
    if entries and not export and not remains:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(f"{out} is not a preferences export (it holds {shown}); an export only replaces one it "
                          "wrote before: give it another output folder, or move those files away yourself")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out`: one export of a folder at a time, whichever process runs it; the
    kernel lets go of a killed one's. The file stays: removed, a waiting export would lock a file no
    later one opens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _hand_back(folder: Path, out: Path) -> None:
    """Move the entries of `folder` no export writes (the user's files, on their way to a new export) to `out`."""
    for path in sorted(folder.iterdir()):
        if path.name not in WRITTEN and not (out / path.name).exists():
            out.mkdir(exist_ok=True)
            path.rename(out / path.name)


def _recover(out: Path) -> None:
    """Put right what an export killed or failed before it ended left beside `out` (under the lock: no export
    is running): the previous export set aside comes back when `out` is missing, the user's files come back
    from an export that did not finish, and the leftover folders go."""
    for kind in ("old", "partial"):  # old first: a partial folder's files go back into the restored export
        for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            if kind == "old" and not out.exists():
                folder.rename(out)  # killed between the swap's two renames: the previous export, whole
                continue
            _hand_back(folder, out)
            shutil.rmtree(folder)


def _move_into_place(new: Path, out: Path) -> None:
    """Put the export built in `new` at `out` (under the lock): a previous export's files there are replaced,
    the user's other files move over to the new one."""
    if not out.exists():
        new.rename(out)
        return
    check_target(out)  # again: the folder may have changed while the export ran
    # The user's files go over first (killed meanwhile, _recover hands them back), then the folders swap: at
    # any moment `out` is the previous export, the new one, or, between the renames, missing.
    for path in sorted(out.iterdir()):
        if path.name not in WRITTEN:
            path.rename(new / path.name)
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)  # only what the previous export wrote


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


COMBINE = ("majority", "bradley_terry", "dawid_skene")
FLAGGED = ("keep", "drop")


def _check_options(ties: str, combine: str, min_posterior: float | None = None, flagged: str = "keep") -> None:
    if flagged not in FLAGGED:
        raise ValueError(f"flagged: {flagged!r} is not allowed; allowed values: {', '.join(FLAGGED)}")
    if ties not in ("drop", "margin0"):
        raise ValueError(f"ties: {ties!r} is not allowed; allowed values: drop, margin0")
    if combine not in COMBINE:
        raise ValueError(f"combine: {combine!r} is not allowed; allowed values: {', '.join(COMBINE)}")
    if min_posterior is not None:
        if combine != "dawid_skene":
            raise ValueError(f"min_posterior={min_posterior} needs combine=dawid_skene (only its pairs have a posterior)")
        if not 0.5 <= min_posterior <= 1:
            raise ValueError(f"min_posterior: {min_posterior} is not allowed; it must be in [0.5, 1]")


def bradley_terry(comparisons: list[tuple[int, int, float]], k: int, *, iters: int = 200,
                  prior: float = 0.1) -> list[float]:
    """Log-strengths of responses 0..k-1 from (a, b, outcome) with 1 = a better, 0 = b better, 0.5 = tie.

    Hunter's (2004) minorisation-maximisation with `prior` virtual ties between every two responses,
    so one that never loses keeps a finite strength. The same fit as align.evaluation's
    (align/labeling/ imports nothing else of align/, and this one needs no numpy for K <= 8).
    """
    wins = [[0.0 if a == b else prior / 2 for b in range(k)] for a in range(k)]
    for a, b, outcome in comparisons:
        wins[a][b] += outcome
        wins[b][a] += 1 - outcome
    strength = [1.0] * k
    for _ in range(iters):
        new = []
        for a in range(k):
            denom = sum((wins[a][b] + wins[b][a]) / (strength[a] + strength[b]) for b in range(k) if b != a)
            new.append(sum(wins[a]) / denom)
        centre = math.exp(_mean([math.log(x) for x in new]))
        strength = [x / centre for x in new]
    return [math.log(x) for x in strength]


def split_by_prompt(rows: list[dict[str, Any]], test_fraction: float, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) with every prompt on one side only (align.preferences splits a file without a test part
    by this too).

    The prompts of each `batch` (a sampling round; rows without one are one batch) are split in the order the
    rows come (their tasks' order: round 0's first), each batch's choice made from its own prompts in a seeded
    shuffle and never changed by a later batch: a later round's export keeps every prompt of the earlier rounds
    on the side it had (round 1's held-out pairs are round 0's and round 1's own, never round 0's training
    prompts), while the prompts of those rounds' pairs stay the same (ties or a min_agreement dropping all of a
    prompt's pairs, as more rankings arrive, reshuffle that batch). A prompt met in an earlier batch keeps that
    batch's side. After each batch `test_fraction` of the prompts so far are held out, rounded, at least one
    and never all: the first batch holds out what it would alone, each later one the rest of that count
    (ten batches of 3 prompts at 0.1 hold out 3, batches of one prompt each one of the second's)."""
    def key(row: dict[str, Any]) -> str:
        return json.dumps(row["prompt"], sort_keys=True)

    by_batch: dict[Any, list[str]] = {}
    for row in rows:
        by_batch.setdefault(row.get("batch"), []).append(key(row))
    held_out: set[str] = set()
    seen: dict[str, None] = {}
    for keys in by_batch.values():
        new = [k for k in dict.fromkeys(keys) if k not in seen]
        seen.update(dict.fromkeys(new))
        target = min(max(round(len(seen) * test_fraction), 1 if test_fraction > 0 else 0), len(seen) - 1)
        held_out |= _held_out(new, min(max(target - len(held_out), 0), len(new)), seed)
    side = [key(r) in held_out for r in rows]
    return [r for r, t in zip(rows, side, strict=True) if not t], [r for r, t in zip(rows, side, strict=True) if t]


def _held_out(prompts: list[str], n: int, seed: int) -> set[str]:
    """`n` of `prompts` in a seeded shuffle of them."""
    if n <= 0:
        return set()
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    return set(prompts[:n])


def mean_ranks(rank_lists: list[list[float]], weights: list[float] | None = None) -> list[float]:
    """Each response's mean rank over `rank_lists`, weighed by `weights` (None, or all 0: an even mean): the margin
    of a pair is the distance of its two responses' mean ranks."""
    if weights is None or not any(weights):
        weights = [1.0] * len(rank_lists)
    return [sum(w * r[i] for w, r in zip(weights, rank_lists, strict=True)) / sum(weights)
            for i in range(len(rank_lists[0]))]


def unsafe_rule(decided: list[tuple[int, int, float]], untied: set[tuple[int, int]], unsafe: set[int], m: int,
                mean_rank: list[float], flagged: str) -> tuple[list[tuple[int, int, float]], dict[str, int]]:
    """`decided` (task_pairs' pairs of m answers) with the responses flagged unsafe (`unsafe`, answer indices) put
    last: under flagged=keep a pair of an unsafe answer and one nobody flagged has the unflagged one chosen, whatever
    the ranks said (a tie too; margin the distance of their mean ranks, as any pair's); under flagged=drop no pair
    with an unsafe answer is kept. The other pairs (two flagged answers under keep, two unflagged) are as decided. `untied`: the pairs the ranks
    decided (not ties margin0 kept). Returns the pairs, in answer order, and counts: `unsafe_pairs` (kept by the
    rule), `unsafe_overridden` (of them, the ones the ranks tied or ordered the other way), `dropped_unsafe`,
    `dropped_ties` (ties dropped among the pairs the rule leaves alone)."""
    by_pair = {frozenset((c, r)): (c, r, margin) for c, r, margin in decided}
    out, counts = [], Counter()
    for a, b in itertools.combinations(range(m), 2):
        found = by_pair.get(frozenset((a, b)))
        if flagged == "drop" and (a in unsafe or b in unsafe):
            counts["dropped_unsafe"] += 1
            continue
        if (a in unsafe) == (b in unsafe):
            if found:
                out.append(found)
            else:
                counts["dropped_ties"] += 1
            continue
        safe, bad = (b, a) if a in unsafe else (a, b)
        counts["unsafe_pairs"] += 1
        counts["unsafe_overridden"] += not (found and found[0] == safe and (safe, bad) in untied)
        out.append((safe, bad, abs(mean_rank[safe] - mean_rank[bad])))
    return out, counts


def task_pairs(rank_lists: list[list[float]], *, ties: str = "drop", combine: str = "majority",
               posterior: dict[tuple[int, int], float] | None = None, weights: list[float] | None = None
               ) -> list[tuple[int, int, float]]:
    """(chosen index, rejected index, margin) for one task's rankings (canonical order).

    The margin is the distance of the two responses' mean ranks, so `rank_lists` are dense (dense_ranks;
    build_pairs makes them so, before merging copies of an answer). With combine=dawid_skene,
    `posterior[(i, j)]` (i < j) is P(response i beats j); a pair missing from it is a tie; and `weights` (one
    per ranking, its annotator's vote weight) weigh the mean ranks, so a distrusted annotator's reversed ranks
    do not cancel the margin of the ones the posterior follows (all 0: an even mean).
    """
    k = len(rank_lists[0])
    mean_rank = mean_ranks(rank_lists, weights)
    _check_options(ties, combine)
    ratings = None
    if combine == "bradley_terry":
        comparisons = [(i, j, 1.0 if r[i] < r[j] else 0.0 if r[i] > r[j] else 0.5)
                       for r in rank_lists for i, j in itertools.combinations(range(k), 2)]
        ratings = bradley_terry(comparisons, k)
    out = []
    for i, j in itertools.combinations(range(k), 2):
        if combine == "dawid_skene":
            p = (posterior or {}).get((i, j), 0.5)
            vote = (p > 0.5 + POSTERIOR_TIE) - (p < 0.5 - POSTERIOR_TIE)
        elif ratings is not None:
            vote = (ratings[i] > ratings[j] + 1e-9) - (ratings[j] > ratings[i] + 1e-9)
        else:
            vote = sum((r[i] < r[j]) - (r[j] < r[i]) for r in rank_lists)
        margin = abs(mean_rank[i] - mean_rank[j])
        if vote > 0:
            out.append((i, j, margin))
        elif vote < 0:
            out.append((j, i, margin))
        elif ties == "margin0":
            out.append((i, j, 0.0))
    return out


def build_pairs(rows: list[dict[str, Any]], *, batches: list[str] | None = None, ties: str = "drop",
                combine: str = "majority", min_agreement: float | None = None, min_posterior: float | None = None,
                gold: dict[int, list[int]] | None = None, chat: bool = True,
                reliability_batches: list[str] | None = None, flagged: str = "keep"
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pair records, counts) from `Store.submitted_rankings()` rows; `gold` is `Store.gold_answers()`.
    `reliability_batches`: the batches whose rankings the reliability estimate reads beside the exported ones
    (None: every batch). `flagged`: keep (pairs with their `flag`) or drop the rankings flagged all-bad or unsafe,
    and for a reply flagged unsafe: keep its pairs with it rejected, or drop them (`unsafe_rule`)."""
    _check_options(ties, combine, min_posterior, flagged)
    # Reliability from every ranking (all batches, gold tasks included: their answers are what
    # anchors it), whichever batches are exported: the more an annotator is seen, the better known.
    reliability = annotator_reliability(
        reliability_rows(rows, estimate_batches(batches, reliability_batches), flagged=flagged), gold)
    counts: Counter = Counter()
    per_annotator: Counter = Counter()
    by_task: dict[int, list[dict[str, Any]]] = defaultdict(list)
    flagged_tasks: set[int] = set()  # flagged=drop: every ranking of these goes, not only the flagged one
    for r in rows:
        if batches and r["batch"] not in batches:
            continue
        if r["kind"] != "ranking" or str(r["batch"]).startswith("eval-"):  # A/B tasks of align eval human=true
            continue
        readable([r])  # a ranking of an exported batch the app never wrote: named, not left out unsaid
        if r["is_gold"]:  # a gold task's rankings score the annotators; a task marked gold after it was ranked
            counts["gold_rankings"] += 1  # too, said here, where the rankings it had stop reaching the pairs
            continue
        counts["rankings"] += 1
        per_annotator[r["annotator"]] += 1
        if task_flags(r["flags"]):  # all_bad, or unsafe naming no reply (per-reply flags: the unsafe_* counts)
            counts["flagged_rankings"] += 1
            if flagged == "drop":  # the task whole
                flagged_tasks.add(r["task_id"])
        by_task[r["task_id"]].append(r)
    for task_id in flagged_tasks:
        counts["dropped_flagged"] += len(by_task.pop(task_id))
    pairs, agreements = [], []
    for task_id, ranked in sorted(by_task.items()):
        counts["tasks"] += 1
        first = ranked[0]
        texts = [x["text"] for x in first["responses"]]
        metas = [x.get("meta") or {} for x in first["responses"]]
        # One answer per distinct text (copy_groups): each copy's pairs would repeat a pair or contradict
        # another ("Yes." > "No." and "No." > the second "Yes."). A blank answer (a policy that ended its
        # turn at once) is no training side: its pairs are dropped. Agreement and the posterior are the
        # merged answers' too: two people who order two copies apart still agree.
        groups = copy_groups(texts)
        reps = [group[0] for group in groups]  # each text's first copy, in response order
        rank_lists = [merge_copies(dense_ranks(r["ranks"]), groups) for r in ranked]
        # dawid_skene: margin and agreement weigh each ranking by its annotator's vote weight, as the posterior
        # does (an adversary at weight 0 cancelled every margin, and min_agreement dropped tasks it had settled).
        weights = [reliability.annotators.get(r["annotator"], {}).get("weight", 0.0) for r in ranked] \
            if combine == "dawid_skene" else None
        agreement = task_agreement(rank_lists, weights)
        if min_agreement is not None and agreement < min_agreement:
            counts["dropped_low_agreement"] += 1
            continue
        agreements.append(agreement)
        k, m, filled = len(texts), len(reps), sum(len(g) for g in groups)
        counts["dropped_empty"] += k * (k - 1) // 2 - filled * (filled - 1) // 2
        counts["dropped_duplicates"] += filled * (filled - 1) // 2 - m * (m - 1) // 2
        posterior = {}
        for a, b in itertools.combinations(range(m), 2):  # P(a beats b), pooled over every pair of their copies
            found = [reliability.posterior[(task_id, i, j)] if (task_id, i, j) in reliability.posterior
                     else 1 - reliability.posterior[(task_id, j, i)]
                     for i in groups[a] for j in groups[b]
                     if (task_id, i, j) in reliability.posterior or (task_id, j, i) in reliability.posterior]
            if found:
                posterior[(a, b)] = _mean(found)
        decided = task_pairs(rank_lists, ties=ties, combine=combine, posterior=posterior, weights=weights) if m > 1 else []
        # The ties margin0 kept, told from decided pairs whose mean ranks happen to be equal (2 votes to 1).
        untied = {(c, r) for c, r, _ in task_pairs(rank_lists, combine=combine, posterior=posterior)} if m > 1 else set()
        # Replies flagged unsafe (unsafe:<i>) by any of the task's annotators: the conservative rule, one flag is
        # enough. An answer is unsafe when any copy of its text is. After the ranks are combined (and the
        # posterior estimated): the rule decides the exported pairs, never the estimate.
        flagged_replies = {i for r in ranked for i in unsafe_replies(r["flags"])}
        counts["unsafe_replies"] += len(flagged_replies)
        unsafe = {a for a, group in enumerate(groups) if flagged_replies & set(group)}
        decided, ruled = unsafe_rule(decided, untied, unsafe, m, mean_ranks(rank_lists, weights), flagged)
        counts.update(ruled)
        texts, metas = [texts[i] for i in reps], [metas[i] for i in reps]
        names = {f for r in ranked for f in flag_names(r["flags"])}  # any of its annotators'
        whole = any(task_flags(r["flags"]) for r in ranked)  # flagged as a whole: what flagged=drop leaves out

        for chosen, rejected, margin in decided:
            by_rule = rejected in unsafe and chosen not in unsafe  # the unsafe rule's pair, not the ranks'
            tie = (chosen, rejected) not in untied and not by_rule
            flag = ",".join(sorted(names | ({"rejected_unsafe"} if by_rule else set())
                                   | ({"chosen_unsafe"} if chosen in unsafe else set())))
            soft = {}
            if combine == "dawid_skene":
                p = 1.0 if by_rule else posterior.get((chosen, rejected), 1 - posterior.get((rejected, chosen), 0.5))
                # A tie is a posterior within POSTERIOR_TIE of 1/2, which may be a little under it:
                # 2 p - 1 would be a negative weight, which the training stages refuse.
                p = 0.5 if tie else p
                if min_posterior is not None and p < min_posterior:
                    counts["dropped_uncertain"] += 1
                    continue
                soft = {"p_chosen": p, "weight": max(0.0, 2 * p - 1)}
            counts["kept_ties"] += tie
            counts["flagged_pairs"] += whole
            ends = {f"{side}_finished": metas[i]["finished"] for side, i in (("chosen", chosen), ("rejected", rejected))
                    if isinstance(metas[i].get("finished"), bool)}
            counts["pairs_with_cut_side"] += not all(ends.values())
            source = metas[chosen].get("policy") or first.get("source", {}).get("policy") or ""
            prompt = [{"role": "user", "content": first["prompt"]}] if chat else first["prompt"]
            pairs.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": texts[chosen]}] if chat else texts[chosen],
                "rejected": [{"role": "assistant", "content": texts[rejected]}] if chat else texts[rejected],
                "task_id": str(task_id), "batch": first["batch"], "annotators": sorted({r["annotator"] for r in ranked}),
                "agreement": agreement, "margin": float(margin), "tie": tie, "source": str(source),
                "prompt_id": hashlib.sha1(first["prompt"].encode()).hexdigest()[:12],
                "votes_chosen": sum(r[chosen] < r[rejected] for r in rank_lists),
                "votes_rejected": sum(r[chosen] > r[rejected] for r in rank_lists), "flag": flag, **ends, **soft,
            })
    summary = {"tasks": counts["tasks"], "rankings": counts["rankings"], "pairs": len(pairs),
               "dropped_ties": counts["dropped_ties"], "flagged_rankings": counts["flagged_rankings"],
               "flagged_pairs": counts["flagged_pairs"], "dropped_flagged": counts["dropped_flagged"],
               "unsafe_replies": counts["unsafe_replies"], "unsafe_pairs": counts["unsafe_pairs"],
               "unsafe_overridden": counts["unsafe_overridden"], "dropped_unsafe": counts["dropped_unsafe"],
               "dropped_low_agreement": counts["dropped_low_agreement"],
               "dropped_duplicates": counts["dropped_duplicates"], "dropped_empty": counts["dropped_empty"],
               "kept_ties": counts["kept_ties"],
               "dropped_uncertain": counts["dropped_uncertain"], "pairs_with_cut_side": counts["pairs_with_cut_side"],
               "gold_rankings": counts["gold_rankings"],
               "mean_agreement": _mean(agreements) if agreements else None, "annotators": dict(per_annotator),
               "mean_p_chosen": _mean([p["p_chosen"] for p in pairs]) if combine == "dawid_skene" and pairs else None,
               "reliability": {**reliability.summary(), "used_for_pairs": combine == "dawid_skene"}}
    return pairs, summary


def estimate_batches(batches: list[str] | None, reliability_batches: list[str] | None) -> list[str] | None:
    """The batches dawid_skene's estimate reads: `reliability_batches` and the exported `batches` (a pair of an
    exported task the estimate did not read would have no posterior); None: every batch."""
    if reliability_batches is None or batches is None:
        return None
    return sorted({*reliability_batches, *batches})


def reliability_rows(rows: list[dict[str, Any]], batches: list[str] | None = None, *, flagged: str = "keep"
                     ) -> list[dict[str, Any]]:
    """The rankings dawid_skene's estimate reads: rankings_for_reliability's, of `batches` (None: every batch)."""
    return rankings_for_reliability([r for r in rows if not batches or r["batch"] in batches], flagged=flagged)


def rankings_fingerprint(rows: list[dict[str, Any]], gold: dict[int, list[int]], *, batches: list[str] | None = None,
                         combine: str = "majority", reliability_batches: list[str] | None = None,
                         flagged: str = "keep") -> str:
    """What an export of `batches` (all without) from `rows` (Store.submitted_rankings()) depends on, hashed:
    each ranking's task, annotator, ranks, flags and gold mark, and the gold answers of those tasks. A count
    would miss a ranking changed, a flag added, or a ranked task marked gold (its pairs must then go).
    combine=dawid_skene: with them, the rankings its reliability estimate reads (`estimate_batches`) and their
    tasks' gold answers. Never the A/B verdicts of align eval human=true, which no export reads: judging them
    remade the export, and with it the policy they judged. flagged=keep, where a ranking read is flagged, adds
    that setting: an export made before it (by an align that dropped them, and recorded no `flagged`) is made
    again; without a flagged ranking both settings make the same export, and the fingerprint is the one align
    recorded before the setting existed, so upgrading reruns nothing. Where a ranking flags a reply unsafe
    (unsafe:<i>) that rule is added too: an export made by an align without the rule (which made that reply the
    chosen side) is made again; without such a flag the fingerprint is as it was."""
    exported = [r for r in rows if (not batches or r["batch"] in batches) and r["kind"] == "ranking"
                and not str(r["batch"]).startswith("eval-")]
    if combine == "dawid_skene":
        seen = {id(r) for r in exported}
        exported += [r for r in reliability_rows(rows, estimate_batches(batches, reliability_batches), flagged=flagged)
                     if id(r) not in seen]
    rows = exported
    tasks = {r["task_id"] for r in rows}  # a gold answer counts through the rankings of its task, as it is read
    parts = sorted(json.dumps([r["task_id"], r["annotator"], r["ranks"], sorted(r["flags"] or []), bool(r["is_gold"]),
                               r["kind"], r["batch"]]) for r in rows)
    parts += sorted(json.dumps(["gold", t, ranks]) for t, ranks in gold.items() if t in tasks)
    if flagged == "keep" and any(r["flags"] for r in rows):
        parts.append(json.dumps(["flagged", flagged]))
    if any(unsafe_replies(r["flags"]) for r in rows):  # the unsafe rule's pairs: an align before it made others
        parts.append(json.dumps(["unsafe_replies", flagged]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def verdicts_fingerprint(rows: list[dict[str, Any]]) -> str:
    """The A/B verdicts of align eval human=true in `rows` (Store.submitted_rankings()), hashed: its board's
    input. The pipeline reruns a human=true eval when they change (new verdicts, or changed ones). A verdict
    that flags an answer unsafe adds its flags (the board's unsafe rule reads them); one without keeps the hash
    an eval made before the rule recorded, so nothing reruns where no answer is flagged."""
    parts = sorted(json.dumps([r["task_id"], r["annotator"], r["ranks"], r["batch"]]
                              + ([sorted(unsafe_replies(r["flags"]))] if unsafe_replies(r.get("flags")) else []))
                   for r in rows if r["kind"] == "pairwise" and str(r["batch"]).startswith("eval-"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_batches(store, batches: list[str] | None) -> None:
    """Every name in `batches` is a batch of the store (a typo read as "no rankings yet" sent people to label)."""
    if batches:
        known = [b["batch"] for b in store.batch_counts()]
        unknown = [b for b in batches if b not in known]
        if unknown:
            raise ExportError(f"batches: {', '.join(map(repr, unknown))} not in the store; its batches: "
                              f"{', '.join(known) or 'none yet'}")


def export_preferences(store: Store, out_dir: str | Path, *, batches: list[str] | None = None, ties: str = "drop",
                       combine: str = "majority", min_agreement: float | None = None,
                       min_posterior: float | None = None, test_fraction: float = 0.1,
                       seed: int = 0, jsonl: bool = False, chat: bool = True,
                       finish: Callable[[Path, dict[str, Any]], None] | None = None,
                       reliability_batches: list[str] | None = None, flagged: str = "keep") -> dict[str, Any]:
    """Write a DatasetDict (train/test by prompt) to `out_dir` (+ JSONL, + summary.json); returns the summary.
    `reliability_batches`: the batches dawid_skene's estimate reads (None: every batch); `flagged`: build_pairs'.

    `finish(folder, summary)` runs on the new export before it moves into place: align export
    writes its align.json and config.yaml there, so dataset and manifest arrive together. The
    summary's `rankings_read` is the read of the store the dataset was built from: its count of
    submitted rankings in `batches` and their `rankings_fingerprint`.
    """
    from datasets import Dataset, DatasetDict

    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: {test_fraction} is not allowed; it must be in [0, 1)")
    _check_options(ties, combine, min_posterior, flagged)
    check_batches(store, batches)
    check_batches(store, reliability_batches)
    out = Path(out_dir)
    out = out.resolve() if out.is_symlink() else out  # swapped at its target: a rename would replace the link
    check_target(out)  # refused before anything is made beside it (a lock file, the run's folder)
    if not any(b["rankings"] for b in store.batch_counts() if not batches or b["batch"] in batches):
        summary = build_pairs([], batches=batches, ties=ties, combine=combine, min_agreement=min_agreement,
                              min_posterior=min_posterior, chat=chat, flagged=flagged)[1]
        return {**summary, "train_pairs": 0, "test_pairs": 0}  # nothing made, not even the lock file
    with _locked(out):
        _recover(out)
        check_target(out)  # again, now that no other export runs: it may have changed meanwhile
        # The rankings are read here, under the lock, and once: read before it, an export that waited for another
        # could write the older read last; and the dataset and `rankings_read` (the manifest's) are one read.
        rows, gold = store.submitted_rankings(), store.gold_answers()
        pairs, summary = build_pairs(rows, batches=batches, ties=ties, combine=combine, min_agreement=min_agreement,
                                     min_posterior=min_posterior, gold=gold, chat=chat,
                                     reliability_batches=reliability_batches, flagged=flagged)
        read = [r for r in rows if not batches or r["batch"] in batches]
        summary.update(train_pairs=0, test_pairs=0,
                       rankings_read={"count": len(read), "sha256": rankings_fingerprint(
                           rows, gold, batches=batches, combine=combine, reliability_batches=reliability_batches,
                           flagged=flagged)})
        if not pairs:
            return summary  # nothing written: an empty dataset would only fail later, in training
        train, test = split_by_prompt(pairs, test_fraction, seed)
        splits = {"train": train, **({"test": test} if test else {})}
        summary.update(train_pairs=len(train), test_pairs=len(test))
        # Built beside and then swapped in: a killed export never leaves half a dataset.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            # Columns from every row's keys: from_list takes the first row's only, and a column some pairs lack
            # (the finished marks, for responses stored before align sample recorded them) would vanish.
            keys = list(dict.fromkeys(k for rows in splits.values() for r in rows for k in r))
            DatasetDict({s: Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
                         for s, rows in splits.items()}).save_to_disk(str(tmp))
            if jsonl:
                for s, rows in splits.items():
                    (tmp / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if finish is not None:
                finish(tmp, summary)
            _move_into_place(tmp, out)
        finally:
            _recover(out)  # after an error: the previous export and the user's files back, no folder left over
    return summary
