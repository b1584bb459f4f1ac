"""Simulated annotators: a scorer ranks pending tasks through the same path a person's click takes.

Each simulated annotator signs in (an account `sim-<scorer>-<i>` is made once), asks for its
next task (taking turns with the others, so an overlap below their number shares the tasks), sees the responses in its own shuffled order, ranks them by score (equal scores tie)
and submits with `handlers.submit`: assignment, overlap, gold tasks, validation and idempotency
are the app's. `noise` adds Gaussian noise scaled to the spread of a task's scores, so several
simulated annotators disagree about close calls as people do. `tie_resolution` R makes it call
replies whose scores round to the same multiple of R a tie, as a person does who cannot tell two
near-equal replies apart (support_style's -0.004 a word otherwise orders replies that differ by a
few words, a difference no reader sees and a reward model learns only as noise); export drops or
keeps those ties by its `ties` rule.

A profile makes an annotator worse on purpose, to test what reliability estimation does with one
(`--profiles good,noisy:0.8,adversarial`, one per annotator; its account is `sim-<scorer>-<i>-<profile>`):
  good           ranks by the scorer (the default);
  noisy:A        orders each pair of responses as the scorer does with probability about A (0.5..1): a
                 share 2(1 - A) of its rankings are a random order, the rest the scorer's;
  random         a random order every time (a click-through spammer: noisy:0.5);
  adversarial    the scorer's order reversed.

`unsafe_flagger` (a flagger, `flagger(prompt, response) -> bool`, named as scorers are: `support_unsafe` or
`module:function`) makes every annotator tick unsafe exactly the replies it returns True for, as a person ticks
a reply's *unsafe* box (submitted as `unsafe_shown`, in the order the annotator was shown them; A/B tasks too).
Flags are not part of the noise nor of a profile: a noisy, random or adversarial annotator flags as the flagger
says, and so does `noise`. Without one nothing is flagged.
"""

from __future__ import annotations

import logging
import random
import secrets
import time

from tqdm.auto import tqdm

from align.labeling import handlers
from align.labeling.scorers import call_scorer, resolve_flagger, resolve_scorer
from align.labeling.store import Store

log = logging.getLogger(__name__)

PROFILES = ("good", "noisy:A", "random", "adversarial")


def account_stem(scorer_spec: str) -> str:
    """The start of the accounts that rank by `scorer_spec`: `sim-<stem>-<i>` (align.report reads it back)."""
    return "".join(c if c.isalnum() else "-" for c in scorer_spec)[:40]


def ranks_from_scores(scores: list[float], tie_resolution: float = 0.0) -> list[int]:
    """Dense ranks, 1 = highest score; equal scores (rounded to multiples of `tie_resolution` if > 0) share a rank."""
    if tie_resolution > 0:
        scores = [round(s / tie_resolution) for s in scores]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) + 1 for s in scores]


def parse_profile(spec: str) -> tuple[str, float]:
    """(kind, accuracy) of a profile spec; a ValueError names what is allowed."""
    kind, _, value = spec.strip().partition(":")
    if kind in ("good", "random", "adversarial") and not value:
        return kind, {"good": 1.0, "random": 0.5, "adversarial": 0.0}[kind]
    if kind == "noisy":
        try:
            accuracy = float(value)
        except ValueError:
            accuracy = float("nan")
        if 0.5 <= accuracy <= 1:
            return kind, accuracy
        raise ValueError(f"profile {spec!r}: noisy:A needs an accuracy A in [0.5, 1], e.g. noisy:0.8")
    raise ValueError(f"profile {spec!r} is not allowed; allowed profiles: {', '.join(PROFILES)}")


def profile_ranks(profile: tuple[str, float], scores: list[float], rng: random.Random,
                  tie_resolution: float = 0.0) -> list[int]:
    """The ranks an annotator of this profile gives responses the scorer scored `scores`."""
    kind, accuracy = profile
    if kind == "adversarial":
        return ranks_from_scores([-s for s in scores], tie_resolution)
    if kind in ("noisy", "random") and rng.random() < 2 * (1 - accuracy):
        order = rng.sample(range(len(scores)), len(scores))  # a random order: right on half the pairs
        return [order.index(i) + 1 for i in range(len(scores))]
    return ranks_from_scores(scores, tie_resolution)


def simulated_rationale(scorer_spec: str, tie_resolution: float = 0.0, unsafe_flagger: str | None = None) -> str:
    """What a simulated ranking says of itself in the store: which scorer ranked, its ties, and its flagger."""
    return (f"simulated: {scorer_spec}" + (f", ties within {tie_resolution:g}" if tie_resolution else "")
            + (f", unsafe by {unsafe_flagger}" if unsafe_flagger else ""))


def simulate(store: Store, scorer_spec: str, *, annotators: int = 1, noise: float = 0.0, seed: int = 0,
             batch: str | None = None, overlap: int | None = None, profiles: list[str] | None = None,
             gold_rate: float = 0.0, tie_resolution: float = 0.0, unsafe_flagger: str | None = None) -> int:
    """Rank every task still open for them, taking turns; returns how many rankings were submitted.

    `profiles` (one per annotator, default all good) and `gold_rate` (the share of gold tasks
    mixed in, as the app's `--gold-rate`) let a run measure and down-weight a bad annotator.
    `tie_resolution` (>= 0) ties replies whose scores round to the same multiple of it. `unsafe_flagger` (a
    flagger's name) ticks unsafe the replies it returns True for, whatever the profile.
    """
    if not tie_resolution >= 0:
        raise ValueError(f"tie_resolution={tie_resolution}: must be >= 0 (0: only equal scores tie)")
    scorer = resolve_scorer(scorer_spec)
    flagger = resolve_flagger(unsafe_flagger) if unsafe_flagger else None
    if profiles is not None and len(profiles) != annotators:
        raise ValueError(f"{len(profiles)} profiles for {annotators} annotators: give one profile per annotator")
    kinds = [parse_profile(p) for p in profiles] if profiles else [("good", 1.0)] * annotators
    overlap = overlap or annotators
    rng = random.Random(seed)
    known = {u["name"] for u in store.users()}
    safe = account_stem(scorer_spec)
    submitted = 0
    pending = store.pending_count(batch, overlap)
    sessions = []
    for i in range(annotators):
        name, password = f"sim-{safe}-{i}", secrets.token_hex(8)
        if profiles:
            name += "-" + "".join(c if c.isalnum() else "-" for c in profiles[i].strip())
        if name not in known:
            store.add_user(name, password)
        # A simulated annotator has no password to type: it gets its session as sign_in would.
        user = next(u for u in store.users() if u["name"] == name)
        sessions.append({"annotator_id": user["id"], "name": name, "is_admin": False})
    # They take turns, each asking for one task a turn until none gets one: one after another, the first took
    # every task at --overlap 1 (`--annotators 3 --overlap 1` shares the tasks among the three). Where each is given
    # every task (overlap >= annotators) they go one after another still, the order the runs measured so far drew
    # their noise in.
    rationale = simulated_rationale(scorer_spec, tie_resolution, unsafe_flagger)

    def rank(session: dict, task: dict, kind: tuple[str, float]) -> None:
        started = time.perf_counter()
        # Scored, noised and ranked in the task's own order, then given in the order shown: the shown order
        # is keyed with the store's secret (a new one per store), and drawn in it the noise would land on
        # other responses in every run.
        canonical = [""] * task["k"]
        for shown, original in enumerate(task["order"]):
            canonical[original] = task["responses"][shown]
        # A number for every reply, or a ScorerError naming the scorer, what it gave and the task
        scores = [call_scorer(scorer, scorer_spec, task["prompt"], r, f"task {task['task_id']}", finite=True)
                  for r in canonical]
        if noise > 0:
            spread = (max(scores) - min(scores)) or 1.0
            scores = [s + rng.gauss(0, noise * spread) for s in scores]
        ranked = profile_ranks(kind, scores, rng, tie_resolution)
        ranks = [ranked[original] for original in task["order"]]
        # Ticked in the order shown, as the page's boxes are; the flagger's verdicts, not the profile's
        unsafe_shown = ([bool(flagger(task["prompt"], canonical[original])) for original in task["order"]]
                        if flagger else None)
        # An A/B task (align eval human=true) takes a verdict, as a person's click gives one
        verdict = ({(1, 2): "A", (2, 1): "B"}.get(tuple(ranks), "tie") if task["kind"] == "pairwise"
                   else None)
        handlers.submit(store, session, task["task_id"], None if verdict else ranks, verdict=verdict,
                        rationale=rationale, seconds=time.perf_counter() - started, seed=seed,
                        unsafe_shown=unsafe_shown)

    waiting = list(range(annotators))
    with tqdm(total=pending, desc=f"simulated annotators ({scorer_spec})", unit="ranking") as bar:
        while waiting:
            for i in list(waiting) if overlap < annotators else waiting[:1]:
                session = sessions[i]
                task = handlers.next_task(store, session, overlap=overlap, gold_rate=gold_rate, seed=seed, batch=batch)
                if task is None:
                    waiting.remove(i)
                    continue
                try:
                    rank(session, task, kinds[i])
                except BaseException:
                    # A scorer (or flagger) that raised, returned no number, or Ctrl-C: the task goes back, else it
                    # stayed this annotator's for ASSIGNMENT_TTL, a rerun was handed nothing and status said pending
                    try:
                        store.release(session["annotator_id"], task["task_id"])
                    except Exception as err:  # the error being raised says more than this one
                        log.warning("task %s stays assigned to %s until it expires: %s", task["task_id"],
                                    session["name"], err)
                    raise
                submitted += 1
                bar.update(1)
    log.info("simulated annotators (%s, %d, noise %.2f, profiles %s%s) submitted %d rankings", scorer_spec, annotators,
             noise, ",".join(profiles) if profiles else "good",
             f", unsafe by {unsafe_flagger}" if unsafe_flagger else "", submitted)
    return submitted
