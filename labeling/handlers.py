"""What the labelling app does, as pure functions of (store, session, inputs): tested without a browser.

The app (labeling/app.py) is layout only and calls these. A session is the dict `sign_in`
returns; a task view is what `next_task` returns: the prompt and the responses in the order this
annotator sees them (shuffled per annotator, blind: no model names), plus `order`, the canonical
index of each shown response, which `submit` uses to store ranks in canonical order.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from labeling.store import Store, _check_ranks

FLAGS = ("all_bad", "unsafe")


class AuthError(Exception):
    """Shown to the user as it is."""


def sign_in(store: Store, name: str, password: str) -> dict[str, Any]:
    session = store.authenticate(name or "", password or "")
    if session is None:
        raise AuthError("unknown user or wrong password")
    return session


def _require(session: dict[str, Any] | None) -> dict[str, Any]:
    if not session or "annotator_id" not in session:
        raise AuthError("sign in first")
    return session


def shown_order(task_id: int, annotator_id: int, k: int, seed: int = 0) -> list[int]:
    """The same shuffle for an annotator every time they see a task; another for each annotator."""
    order = list(range(k))
    random.Random(f"{seed}:{task_id}:{annotator_id}").shuffle(order)
    return order


def next_task(store: Store, session: dict[str, Any], *, overlap: int = 1, gold_rate: float = 0.0, seed: int = 0,
              batch: str | None = None) -> dict[str, Any] | None:
    session = _require(session)
    task_id = store.assign(session["annotator_id"], overlap=overlap, gold_rate=gold_rate, seed=seed, batch=batch)
    if task_id is None:
        return None
    task = store.task(task_id)
    k = len(task["responses"])
    order = shown_order(task_id, session["annotator_id"], k, seed)
    draft = store.draft(session["annotator_id"], task_id)
    return {"task_id": task_id, "kind": task["kind"], "prompt": task["prompt"],
            "responses": [task["responses"][i]["text"] for i in order], "order": order, "k": k,
            "progress": store.progress(session["annotator_id"]),
            # a saved partial ranking in shown order (None where unranked), so a reload loses nothing
            "draft": [draft[i] or None for i in order] if draft else None}


def to_canonical(task: dict[str, Any], ranks_shown: list[int]) -> list[int]:
    canonical = [0] * task["k"]
    for shown, original in enumerate(task["order"]):
        canonical[original] = ranks_shown[shown]
    return canonical


def pairwise_ranks(choice: str) -> tuple[list[int], list[str]]:
    """An A/B verdict as ranks over the two shown responses (+ flags)."""
    table = {"A": ([1, 2], []), "B": ([2, 1], []), "tie": ([1, 1], []), "both_bad": ([1, 1], ["all_bad"])}
    if choice not in table:
        raise ValueError(f"choose one of: A better, B better, tie, both bad (got {choice!r})")
    return table[choice]


def _whole(value: Any) -> Any:
    """A rank as an int when it is a whole number in any form ("2", 2.0 from a number box); else as given."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def submit(store: Store, session: dict[str, Any], task: dict[str, Any], ranks_shown: list[int], *,
           all_bad: bool = False, unsafe: bool = False, rationale: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """Validate and save one ranking. Idempotent: repeating it keeps the first submitted ranking."""
    session = _require(session)
    if task is None:
        raise ValueError("there is no task to submit")
    ranks = [_whole(r) for r in ranks_shown]
    if any(r is None or r == "" for r in ranks):
        raise ValueError("give every response a rank (1 = best; equal ranks are ties)")
    _check_ranks(ranks, task["k"])
    flags = [f for f, on in zip(FLAGS, (all_bad, unsafe), strict=True) if on]
    created = store.save_ranking(session["annotator_id"], task["task_id"], to_canonical(task, ranks), flags=flags,
                                 rationale=(rationale or "").strip(), seconds=seconds)
    return {"ok": True, "created": created,
            "message": "Saved. Next task." if created else "Already saved (kept your first submission)."}


def save_draft(store: Store, session: dict[str, Any], task: dict[str, Any], ranks_shown: list[int | None]) -> None:
    """Keep a partial ranking (no validation beyond types): a reload shows nothing lost."""
    session = _require(session)
    ranks = [int(r) if r not in (None, "") else 0 for r in ranks_shown]
    store.save_ranking(session["annotator_id"], task["task_id"], to_canonical(task, ranks), status="draft")


def skip(store: Store, session: dict[str, Any], task: dict[str, Any]) -> None:
    session = _require(session)
    store.skip(session["annotator_id"], task["task_id"])


def _require_admin(session: dict[str, Any] | None) -> dict[str, Any]:
    session = _require(session)
    if not session.get("is_admin"):
        raise PermissionError("the admin view is for admins (align label users add NAME --admin)")
    return session


def gold_accuracy(store: Store) -> dict[str, float]:
    """Per annotator: the fraction of response pairs ordered as in the gold answer, over gold tasks."""
    from labeling.agreement import pairwise_agreement

    answers = store.gold_answers()
    scores: dict[str, list[float]] = {}
    for r in store.submitted_rankings():
        if r["task_id"] in answers:
            scores.setdefault(r["annotator"], []).append(pairwise_agreement(r["ranks"], answers[r["task_id"]]))
    return {a: sum(v) / len(v) for a, v in scores.items()}


def admin_stats(store: Store, session: dict[str, Any], *, overlap: int = 1) -> dict[str, Any]:
    """Progress, throughput, gold accuracy and agreement; `pending` counts rankings still needed at `overlap`."""
    _require_admin(session)
    from labeling.agreement import agreement_summary

    rows = store.submitted_rankings()
    gold = gold_accuracy(store)
    people = store.annotator_activity()
    for p in people:
        p["gold_accuracy"] = round(gold[p["name"]], 3) if p["name"] in gold else None
    batches = store.batch_counts()
    for b in batches:
        b["pending"] = store.pending_count(b["batch"], overlap)
    return {"per_annotator": people, "per_batch": batches,
            "agreement": agreement_summary([r for r in rows if not r["is_gold"]]),
            "totals": {"tasks": sum(b["tasks"] for b in batches), "rankings": len(rows),
                       "annotators": sum(p["done"] > 0 for p in people)}}


def export(store: Store, session: dict[str, Any], out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    _require_admin(session)
    from labeling.export import export_preferences

    return export_preferences(store, out_dir, **kwargs)
