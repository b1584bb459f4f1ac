"""Simulated annotators: a scorer ranks pending tasks through the same path a person's click takes.

Each simulated annotator signs in (an account `sim-<scorer>-<i>` is made once), asks for its
next task, sees the responses in its own shuffled order, ranks them by score (equal scores tie)
and submits with `handlers.submit`: assignment, overlap, validation and idempotency are the
app's. `noise` adds Gaussian noise scaled to the spread of a task's scores, so several
simulated annotators disagree about close calls as people do.
"""

from __future__ import annotations

import logging
import random
import secrets
import time

from tqdm.auto import tqdm

from labeling import handlers
from labeling.scorers import resolve_scorer
from labeling.store import Store

log = logging.getLogger(__name__)


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, 1 = highest score; equal scores share a rank."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) + 1 for s in scores]


def simulate(store: Store, scorer_spec: str, *, annotators: int = 1, noise: float = 0.0, seed: int = 0,
             batch: str | None = None, overlap: int | None = None) -> int:
    """Rank every task still open for them; returns how many rankings were submitted."""
    scorer = resolve_scorer(scorer_spec)
    overlap = overlap or annotators
    rng = random.Random(seed)
    known = {u["name"] for u in store.users()}
    safe = "".join(c if c.isalnum() else "-" for c in scorer_spec)[:40]
    submitted = 0
    pending = store.pending_count(batch, overlap)
    with tqdm(total=pending, desc=f"simulated annotators ({scorer_spec})", unit="ranking") as bar:
        for i in range(annotators):
            name, password = f"sim-{safe}-{i}", secrets.token_hex(8)
            if name not in known:
                store.add_user(name, password)
            # A simulated annotator has no password to type: it gets its session as sign_in would.
            session = next(u for u in store.users() if u["name"] == name)
            session = {"annotator_id": session["id"], "name": name, "is_admin": False}
            while (task := handlers.next_task(store, session, overlap=overlap, seed=seed, batch=batch)) is not None:
                started = time.perf_counter()
                scores = [float(scorer(task["prompt"], r)) for r in task["responses"]]
                if noise > 0:
                    spread = (max(scores) - min(scores)) or 1.0
                    scores = [s + rng.gauss(0, noise * spread) for s in scores]
                handlers.submit(store, session, task["task_id"], ranks_from_scores(scores),
                                rationale=f"simulated: {scorer_spec}", seconds=time.perf_counter() - started)
                submitted += 1
                bar.update(1)
    log.info("simulated annotators (%s, %d, noise %.2f) submitted %d rankings", scorer_spec, annotators, noise,
             submitted)
    return submitted
