"""The store and the handlers, on SQLite and PostgreSQL: nothing an annotator acknowledged is lost or doubled."""

from __future__ import annotations

import html
import os
import re
import threading
import unicodedata

import pytest
from sqlalchemy.engine import make_url

from align.labeling import handlers
from align.labeling.store import SCHEMA_VERSION, Store


def make_tasks(store, n: int = 4, k: int = 4, batch: str = "round-0") -> list[int]:
    items = [{"prompt": f"Ticket {i}: how do I sync my notes?",
              "responses": [f"Answer {j} to ticket {i}." for j in range(k)],
              "response_meta": [{"policy": "runs/x/sft"} for _ in range(k)]} for i in range(n)]
    store.add_tasks(batch, items, source={"policy": "runs/x/sft"})
    return [t["task_id"] for t in store.batch_tasks(batch)]


def session(store, name: str, admin: bool = False) -> dict:
    store.add_user(name, "secret-pw", admin=admin)
    return handlers.sign_in(store, name, "secret-pw")


def test_batch_response_meta_is_one_query_whatever_the_batch(store):
    """sample's counts of a batch's answers (and those cut) come from one query, not one task() per task."""
    from sqlalchemy import event

    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    for n in (2, 6):
        batch = f"b{n}"
        store.add_tasks(batch, [{"prompt": f"{batch} ticket {i}", "responses": [f"a{i}", f"b{i}", f"c{i}"],
                                 "response_meta": [{"finished": i % 2 == 0}] * 3} for i in range(n)])
        statements.clear()
        meta = store.batch_response_meta(batch)
        assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1  # not SQLite's BEGIN
        assert len(meta) == 3 * n and sum(m.get("finished") is False for m in meta) == 3 * (n // 2)
        assert meta == [r["meta"] for t in store.batch_tasks(batch) for r in store.task(t["task_id"])["responses"]]
    assert store.batch_response_meta("none") == []


def test_schema_is_created_versioned_and_reopens(store):
    make_tasks(store, 2)
    again = Store(store.url)
    assert again.schema_version == SCHEMA_VERSION
    assert len(again.batch_tasks("round-0")) == 2


def test_a_sqlite_store_runs_wal_with_full_sync_and_foreign_keys(tmp_path):
    """What align/labeling/store.py promises of SQLite on every connection: WAL (reads beside a writer),
    synchronous=FULL (an acknowledged ranking survives a crash of the machine, where NORMAL or OFF may lose it),
    foreign keys enforced and a 30 s busy wait."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    make_tasks(store, 1)  # a write: the pool's connection has been used for a transaction
    for _ in range(2):  # the pooled connection again, and a fresh one past the pool
        with store.tx() as conn:
            got = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                   for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")}
        assert got == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 30000}, got
        store.engine.dispose()


def test_add_tasks_is_idempotent_per_batch_and_prompt(store):
    make_tasks(store, 3)
    assert store.add_tasks("round-0", [{"prompt": "Ticket 0: how do I sync my notes?", "responses": ["a", "b"]}],
                           source={}) == 0
    assert store.add_tasks("round-1", [{"prompt": "Ticket 0: how do I sync my notes?", "responses": ["a", "b"]}],
                           source={}, round=1) == 1
    assert len(store.batch_tasks("round-0")) == 3 and store.task_prompts("round-1") == {"Ticket 0: how do I sync my notes?"}
    with pytest.raises(ValueError, match="a list of 2 to 8 strings"):
        store.add_tasks("round-0", [{"prompt": "x", "responses": ["only one"]}], source={})


def test_a_batch_note_is_written_with_its_tasks_and_replaced_by_the_next(store):
    """align sample selection=uncertainty keeps every candidate's value in the transaction of its tasks: a call
    stopped after the commit left tasks whose selection no record described."""
    long = "b" * 200  # a batch name longer than align_meta's 64-character key
    assert store.batch_note("round-0") is None
    store.add_tasks("round-0", [{"prompt": "p1", "responses": ["a", "b"]}], note={"candidates": [1]})
    store.add_tasks(long, [{"prompt": "p1", "responses": ["a", "b"]}], note={"candidates": [2]})
    store.add_tasks("round-0", [{"prompt": "p2", "responses": ["a", "b"]}])  # no note given: the batch's kept
    assert store.batch_note("round-0") == {"candidates": [1]} and store.batch_note(long) == {"candidates": [2]}
    store.add_tasks("round-0", [{"prompt": "p3", "responses": ["a", "b"]}], note={"candidates": [1, 3]})
    assert store.batch_note("round-0") == {"candidates": [1, 3]} and store.batch_note(long) == {"candidates": [2]}
    with pytest.raises(ValueError, match="a list of 2 to 8 strings"):  # the tasks refused: no note either
        store.add_tasks("other", [{"prompt": "x", "responses": ["only one"]}], note={"candidates": []})
    assert store.batch_note("other") is None


def test_add_tasks_refuses_responses_the_app_cannot_show_before_anything_is_written(store):
    """A string of responses became one response per character; nine responses, more than the app lays out, and
    response_meta entries that are no objects were stored as they came. Each is refused, naming the item and
    its prompt, and the items before it in the call are not stored either (one transaction)."""
    good = {"prompt": "Q1", "responses": ["a", "b"]}
    for bad, said in (({"prompt": "Refund?", "responses": "Yes, sure."}, "got a str"),
                      ({"prompt": "Nine?", "responses": [str(i) for i in range(9)]}, "got 9"),
                      ({"prompt": "Mixed?", "responses": ["a", 2]}, "got a response that is not a string (2)"),
                      ({"prompt": "Meta?", "responses": ["a", "b"], "response_meta": ["x", "y"]},
                       "'response_meta' must be a list of 2 objects, one per response"),
                      ({"prompt": "Meta?", "responses": ["a", "b"], "response_meta": [{}]}, "list of 2 objects")):
        with pytest.raises(ValueError, match=re.escape(f"item 1 (prompt {bad['prompt']!r})") + ".*" + re.escape(said)):
            store.add_tasks("round-0", [good, bad])
    assert store.batch_tasks("round-0") == []
    assert store.add_tasks("round-0", [good, {"prompt": "Eight?", "responses": [str(i) for i in range(8)],
                                              "response_meta": [{"policy": "p"}] * 8}]) == 2


def test_passwords_are_hashed_and_checked(store):
    store.add_user("alice", "correct horse")
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("alice", "another")
    with pytest.raises(handlers.AuthError, match="wrong password"):
        handlers.sign_in(store, "alice", "wrong")
    assert handlers.sign_in(store, "alice", "correct horse")["name"] == "alice"
    from sqlalchemy import text

    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT password_hash FROM annotators")).scalar_one()
    assert "correct horse" not in stored and stored.startswith("scrypt$")


def test_no_anonymous_writes(store):
    make_tasks(store, 1)
    with pytest.raises(handlers.AuthError):
        handlers.submit(store, None, 1, [1, 2, 3, 4])
    with pytest.raises(handlers.AuthError):
        handlers.next_task(store, {})


def test_a_page_drawn_for_another_account_is_refused_by_name(store):
    """The account a page was drawn for must be the session's: the cookie changes under an open page when another
    tab signs in as someone else."""
    bob = session(store, "bob")
    handlers.check_page_account(bob, "bob")
    handlers.check_page_account(bob, "")  # a page loaded signed out claims nobody
    with pytest.raises(handlers.AuthError, match="^this page was opened by ann; you are signed in as bob: "
                                                 "reload to rank as bob$"):
        handlers.check_page_account(bob, "ann")
    with pytest.raises(handlers.AuthError):
        handlers.check_page_account(None, "bob")


def test_the_shown_order_is_keyed_with_the_stores_secret(store):
    """The shuffle was seeded with "seed:task:annotator" alone, values that are no secret (the page shows the task's
    id; account ids count up from 1): anyone could work out each annotator's order, and an A/B task's first
    response is the policy's, so which side was which. Now it is keyed with the store's secret: not the public
    formula's order, nor another key's, and the same on every view."""
    import random
    import secrets

    make_tasks(store, 12)
    alice = session(store, "alice")
    shown = {}
    while (task := handlers.next_task(store, alice)) is not None:
        shown[task["task_id"]] = task["order"]
        again = handlers.next_task(store, alice)
        assert again["task_id"] == task["task_id"] and again["order"] == task["order"]
        handlers.skip(store, alice, task["task_id"])
    assert len(shown) == 12

    def public(task_id: int) -> list[int]:
        order = list(range(4))
        random.Random(f"0:{task_id}:{alice['annotator_id']}").shuffle(order)
        return order

    assert shown != {t: public(t) for t in shown}
    assert shown == {t: handlers.shown_order(t, alice["annotator_id"], 4, key=store.secret()) for t in shown}
    other = secrets.token_bytes(32)
    assert shown != {t: handlers.shown_order(t, alice["annotator_id"], 4, key=other) for t in shown}


def test_the_gold_draw_is_keyed_with_the_stores_secret(tmp_path):
    """Which of an annotator's turns were gold was drawn from "seed:annotator:count" alone: the seed defaults to 0,
    account ids count up from 1, and everyone knows their own count, so anyone could work out their gold turns.
    Now it is keyed with the store's secret: two stores alike but for their secrets draw different turns, and a
    store draws the turns `gold_turn` gives with its own secret."""
    import secrets

    from align.labeling.store import gold_turn

    turns = {}
    for name in ("one", "two"):
        store = Store(f"sqlite:///{tmp_path / name}.db")
        ids = make_tasks(store, 60)
        for task_id in ids[30:]:
            store.add_gold(task_id, [1, 2, 3, 4])
        alice = session(store, "alice")
        turns[name] = []
        for _ in range(24):  # enough gold for every turn: each draw shows
            task = handlers.next_task(store, alice, gold_rate=0.5)
            turns[name].append(task["task_id"] in ids[30:])
            handlers.skip(store, alice, task["task_id"])
        assert turns[name] == [gold_turn(store.secret(), 0, alice["annotator_id"], n, 0.5) for n in range(24)]
        assert turns[name] != [gold_turn(secrets.token_bytes(32), 0, alice["annotator_id"], n, 0.5) for n in range(24)]
    assert alice["annotator_id"] == 1 and turns["one"] != turns["two"]


def test_ranks_given_in_an_order_the_server_no_longer_shows_are_refused_and_nothing_is_saved(store):
    """The server maps a page's ranks to canonical order through the order it shows the task in now. When that
    changed since the page was drawn (this version's keyed shuffle; a new store secret), the page's ranks, A/B
    verdict and drafts were saved against the wrong responses, silently. The page sends back the tag of its order:
    a page with another one, or none (drawn before tags), is refused and nothing is written; its own tag saves."""
    from sqlalchemy import update

    from align.labeling.store import meta_table

    make_tasks(store, 1)
    store.add_tasks("eval-ab", [{"prompt": "Which reply?", "responses": ["first", "second"]}], kind="pairwise")
    alice, bob = session(store, "alice"), session(store, "bob")
    page = handlers.next_task(store, alice, batch="round-0")
    ab_page = handlers.next_task(store, bob, batch="eval-ab")
    best = page["responses"].index("Answer 2 to ticket 0.")
    handlers.save_draft(store, alice, page["task_id"], [int(i == best) for i in range(4)], order_tag=page["order_tag"])
    assert store.draft(alice["annotator_id"], page["task_id"]) == [0, 0, 1, 0]
    # The tag tells nothing of the order: another task or another key, the same order, another tag.
    assert page["order_tag"] != handlers.order_tag(page["task_id"] + 1, alice["annotator_id"], page["order"],
                                                   key=store.secret())
    assert page["order_tag"] != handlers.order_tag(page["task_id"], alice["annotator_id"], page["order"],
                                                   key=b"another key")

    # The orders change under the open pages (as they did with the keyed shuffle): here the store's secret.
    with store.tx() as conn:
        conn.execute(update(meta_table).where(meta_table.c.key == "session_secret").values(value="ab" * 32))
    store = Store(store.url)  # the app restarted
    for tag in (page["order_tag"], "", "0" * 8):  # the page's old tag, none (a page drawn before tags), a made-up one
        with pytest.raises(handlers.StaleOrder, match="order changed since the page was drawn.*nothing was saved"):
            handlers.submit(store, alice, page["task_id"], [1 if i == best else 2 for i in range(4)], order_tag=tag)
        with pytest.raises(handlers.StaleOrder, match="reload"):
            handlers.save_draft(store, alice, page["task_id"], [2, 2, 2, 2], order_tag=tag)
        with pytest.raises(handlers.StaleOrder):
            handlers.submit(store, bob, ab_page["task_id"], verdict="A", order_tag=tag)
        with pytest.raises(handlers.StaleOrder):
            handlers.save_draft(store, bob, ab_page["task_id"], [], verdict="B", order_tag=tag)
    assert store.submitted_rankings() == [] and store.draft(bob["annotator_id"], ab_page["task_id"]) is None
    assert store.draft(alice["annotator_id"], page["task_id"]) == [0, 0, 1, 0]  # as the old page saved it

    # Reloaded: the same tasks in their new orders, the draft shown in it; the page's own tag saves.
    page = handlers.next_task(store, alice, batch="round-0")
    best = page["responses"].index("Answer 2 to ticket 0.")
    assert page["draft"] == [1 if i == best else None for i in range(4)]
    assert handlers.submit(store, alice, page["task_id"], [1 if i == best else 2 for i in range(4)],
                           order_tag=page["order_tag"])["created"]
    ab_page = handlers.next_task(store, bob, batch="eval-ab")
    assert handlers.save_draft(store, bob, ab_page["task_id"], [], verdict="B", order_tag=ab_page["order_tag"])
    verdict = "A" if ab_page["responses"][0] == "first" else "B"  # "first" is better
    assert handlers.submit(store, bob, ab_page["task_id"], verdict=verdict, order_tag=ab_page["order_tag"])["created"]
    assert {r["annotator"]: r["ranks"] for r in store.submitted_rankings()} == {"alice": [2, 2, 1, 2], "bob": [1, 2]}


def test_a_submit_stores_canonical_ranks_from_the_shuffled_view(store):
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    assert sorted(task["order"]) == [0, 1, 2, 3] and "policy" not in str(task["responses"])
    best_shown = task["responses"].index("Answer 2 to ticket 0.")
    ranks = [1 if i == best_shown else 2 for i in range(4)]  # the best first, three tied after it
    result = handlers.submit(store, alice, task["task_id"], ranks, unsafe=True, rationale=" clear steps ", seconds=12.5)
    assert result["created"]
    (row,) = store.submitted_rankings()
    assert row["ranks"] == [2, 2, 1, 2] and row["flags"] == ["unsafe"] and row["rationale"] == "clear steps"
    assert row["annotator"] == "alice" and row["seconds"] == 12.5 and row["responses"][2]["meta"]["policy"]
    assert handlers.next_task(store, alice) is None


def test_bad_ranks_are_refused_with_a_reason(store):
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    with pytest.raises(ValueError, match="4 responses"):
        handlers.submit(store, alice, task["task_id"], [1, 2, 3])
    with pytest.raises(ValueError, match="from 1"):
        handlers.submit(store, alice, task["task_id"], [1, 2, 3, 9])
    with pytest.raises(ValueError, match="every response a rank"):
        handlers.submit(store, alice, task["task_id"], [1, None, 2, 3])
    assert store.submitted_rankings() == []


def test_a_ranking_row_spoilt_outside_the_app_is_named_not_read_as_other_pairs(store, tmp_path):
    """Ranks the app never writes (a row edited by hand, a response deleted after the ranking): an export of its
    batch names the task, annotator and row, instead of pairing the wrong answers or a bare traceback; an export
    of another batch, and the admin's statistics, go on without it (one bad row stopped them all)."""
    from sqlalchemy import delete, update

    from align.labeling.export import export_preferences
    from align.labeling.store import StoreError, rankings, readable, responses, tasks

    first, second = make_tasks(store, 2)
    other = make_tasks(store, 2, batch="round-1")
    alice, boss = session(store, "alice"), session(store, "boss", admin=True)
    while (task := handlers.next_task(store, alice)) is not None:
        handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4])
    assert len(readable(store.submitted_rankings())) == 4
    for bad, problem in (("[1, 2, 3, 9]", "whole numbers from 1"), ("[1, 2, 3, 4, 5]", "5 ranks for 4"),
                         ("null", "ranks 'null' is not a list"), ("not json", "Expecting value")):
        with store.tx() as conn:
            conn.execute(update(rankings).where(rankings.c.task_id == first).values(ranks=bad))
        named = rf"task {first}'s ranking by alice \(rankings.id \d+\) cannot be read: .*{problem}.*'discarded'"
        with pytest.raises(StoreError, match=named):
            readable(store.submitted_rankings())
        with pytest.raises(StoreError, match=named):
            export_preferences(store, tmp_path / "round-0", batches=["round-0"], test_fraction=0)
    assert export_preferences(store, tmp_path / "round-1", batches=["round-1"], test_fraction=0)["pairs"] == 12
    stats = handlers.admin_stats(store, boss)
    assert stats["totals"]["rankings"] == 4 and stats["agreement"]["n_tasks"] == 0  # one ranking a task: no overlap
    with store.tx() as conn:
        conn.execute(update(rankings).where(rankings.c.task_id == first).values(status="discarded"))
        conn.execute(delete(responses).where(responses.c.task_id == second, responses.c.position == 1))
    with pytest.raises(StoreError, match=rf"task {second}'s ranking .* 4 ranks for 3 responses"):
        readable(store.submitted_rankings())  # the ranks of answers 2 and 3 would have become those of 3 and 4
    with store.tx() as conn:
        conn.execute(update(tasks).where(tasks.c.id == second).values(source="{oops"))
    with pytest.raises(StoreError, match=rf"task {second}: its source or a response's meta in the store is not JSON"):
        store.task(second)
    assert other  # (round-1's tasks)


def test_a_submit_racing_the_hand_over_of_its_stale_slot_is_one_ranking_not_two(store):
    """alice walked away from her task past ASSIGNMENT_TTL and comes back to submit just as bob asks for a task.
    Her submit read her assignment ("assigned"), then bob's assign expired it and took the slot, then her submit
    wrote "submitted" over "expired": on PostgreSQL (READ COMMITTED; save_ranking took no lock) the task got two
    rankings at overlap 1 (and the other order told her a saved submit was handed on, or looped her on it).
    Her submit holds the assignment lock: bob waits, then gets another task."""
    import threading

    from sqlalchemy import event, update

    from align.labeling import store as store_module

    first, second = make_tasks(store, 2)
    alice, bob = session(store, "alice"), session(store, "bob")
    assert handlers.next_task(store, alice)["task_id"] == first
    with store.engine.begin() as conn:  # she left it more than the TTL ago, without a draft
        conn.execute(update(store_module.assignments).values(
            assigned_at=store_module.assignments.c.assigned_at - 2 * store_module.ASSIGNMENT_TTL))
    reached, go = threading.Event(), threading.Event()

    @event.listens_for(store.engine, "before_cursor_execute")
    def pause_alice(conn, cursor, statement, *args):  # her submit, between reading her assignment and writing
        if threading.current_thread().name == "alice" and "SELECT rankings.id, rankings.status" in statement:
            reached.set()
            go.wait(10)

    results = {}

    def run(name, call):
        results[name] = call()

    alices = threading.Thread(target=run, name="alice", args=("alice", lambda: handlers.submit(
        store, alice, first, [1, 2, 3, 4])))
    alices.start()
    assert reached.wait(10)
    bobs = threading.Thread(target=run, name="bob", args=("bob", lambda: handlers.next_task(store, bob)["task_id"]))
    bobs.start()
    bobs.join(1.0)
    assert bobs.is_alive(), "bob's assign went ahead inside alice's submit"
    go.set()
    alices.join(30)
    bobs.join(30)
    event.remove(store.engine, "before_cursor_execute", pause_alice)
    assert "Saved" in results["alice"]["message"] and results["bob"] == second
    assert [r["annotator"] for r in store.submitted_rankings() if r["task_id"] == first] == ["alice"]
    assert store.progress(alice["annotator_id"])["done"] == 1


def test_the_progress_of_an_app_serving_one_batch_counts_that_batch_only(store):
    """`align label --batch eval-ab` showed "Progress: 3 / 4 done" on its first A/B task: the ranking batch's tasks
    this annotator had labelled before were counted with it."""
    make_tasks(store, 3, batch="round-0")
    make_tasks(store, 2, batch="round-1")
    alice = session(store, "alice")
    for _ in range(3):
        task = handlers.next_task(store, alice, batch="round-0")
        handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4], order_tag=task["order_tag"])
    first = handlers.next_task(store, alice, batch="round-1")
    assert first["progress"] == {"done": 0, "skipped": 0, "assigned": 1}
    handlers.submit(store, alice, first["task_id"], [1, 2, 3, 4], order_tag=first["order_tag"])
    assert handlers.next_task(store, alice, batch="round-1")["progress"] == {"done": 1, "skipped": 0, "assigned": 2}
    assert handlers.next_task(store, alice)["progress"]["done"] == 4  # every batch: every batch's count
    assert handlers.next_task(store, alice, batch="")["progress"]["done"] == 4  # --batch "": every batch, as assign


def test_double_submit_from_twenty_threads_keeps_one_ranking(store):
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    results, errors = [], []

    def click(ranks):
        try:
            results.append((ranks, handlers.submit(store, alice, task["task_id"], ranks)))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=click, args=([1, 2, 3, 4] if i == 0 else [4, 3, 2, 1],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r["created"] for _, r in results) == 1
    rows = store.submitted_rankings()
    assert len(rows) == 1  # one ranking, whichever click landed first; the others were told so
    kept = next(ranks for ranks, r in results if r["created"])
    # A repeat of the kept ranking is "already saved"; the other ranking is told it was not saved.
    for ranks, r in results:
        if not r["created"]:
            assert r["message"] == (handlers.ALREADY_SAVED if ranks == kept else handlers.OTHER_RANKING), (ranks, r)


def test_two_annotators_at_once_get_different_tasks_and_keep_their_own_rankings(store):
    make_tasks(store, 2)
    people = [session(store, n) for n in ("alice", "bob")]
    tasks: dict[str, dict] = {}

    def work(person):
        task = handlers.next_task(store, person)
        tasks[person["name"]] = task
        handlers.submit(store, person, task["task_id"], [1, 2, 3, 4])

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tasks["alice"]["task_id"] != tasks["bob"]["task_id"]
    rows = {r["annotator"]: r["task_id"] for r in store.submitted_rankings()}
    assert rows == {"alice": tasks["alice"]["task_id"], "bob": tasks["bob"]["task_id"]}


def test_overlap_sends_each_task_to_n_annotators_never_twice_to_one(store):
    ids = make_tasks(store, 3)
    people = [session(store, n) for n in ("a", "b", "c")]
    seen: dict[str, list[int]] = {p["name"]: [] for p in people}
    for _ in range(3):
        for p in people:
            task = handlers.next_task(store, p, overlap=2)
            if task:
                seen[p["name"]].append(task["task_id"])
                handlers.submit(store, p, task["task_id"], [1, 2, 3, 4])
    for name, got in seen.items():
        assert len(got) == len(set(got)), name
    per_task = {t: sum(t in got for got in seen.values()) for t in ids}
    assert per_task == {t: 2 for t in ids}
    assert store.pending_count("round-0", overlap=2) == 0 and store.pending_count("round-0", overlap=3) == 3


def test_an_open_assignment_comes_back_and_skip_hands_it_on(store):
    make_tasks(store, 2)
    alice, bob = session(store, "alice"), session(store, "bob")
    first = handlers.next_task(store, alice)
    assert handlers.next_task(store, alice)["task_id"] == first["task_id"]  # a reload shows the same task
    handlers.skip(store, alice, first["task_id"])
    assert handlers.next_task(store, alice)["task_id"] != first["task_id"]
    assert handlers.next_task(store, bob)["task_id"] == first["task_id"]  # skipped: free for someone else


def test_an_annotator_at_work_keeps_the_slot_past_the_assignment_ttl(store, monkeypatch):
    """An assignment nobody touches for ASSIGNMENT_TTL frees its slot; a draft or a reload renews it."""
    import time as clock

    from align.labeling import store as store_module

    make_tasks(store, 1)
    alice, bob, carol = session(store, "alice"), session(store, "bob"), session(store, "carol")
    task = handlers.next_task(store, alice)
    start = clock.time()
    monkeypatch.setattr(store_module.time, "time", lambda: start + 0.8 * store_module.ASSIGNMENT_TTL)
    handlers.save_draft(store, alice, task["task_id"], [1, None, None, None])  # still at it
    monkeypatch.setattr(store_module.time, "time", lambda: start + 1.6 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, bob) is None  # 0.8 TTL since her draft: still hers
    assert handlers.next_task(store, alice)["task_id"] == task["task_id"]  # a reload renews it too
    monkeypatch.setattr(store_module.time, "time", lambda: start + 2.4 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, carol) is None
    monkeypatch.setattr(store_module.time, "time", lambda: start + 2.7 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, carol)["task_id"] == task["task_id"]  # abandoned: handed on


def test_an_expired_assignment_is_not_handed_back_once_another_annotator_holds_its_slot(store, monkeypatch):
    """overlap 1: Alice opens task 1 and walks away; past ASSIGNMENT_TTL Bob is given it and submits. Back, Alice
    gets task 2, which nobody has ranked, not task 1 again for a second ranking; her old page cannot submit it."""
    import time as clock

    from align.labeling import store as store_module

    first_id, second_id = make_tasks(store, 2)
    alice, bob = session(store, "alice"), session(store, "bob")
    assert handlers.next_task(store, alice)["task_id"] == first_id
    start = clock.time()
    monkeypatch.setattr(store_module.time, "time", lambda: start + 1.1 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, bob)["task_id"] == first_id  # abandoned: handed on
    handlers.submit(store, bob, first_id, [1, 2, 3, 4])
    assert handlers.next_task(store, alice)["task_id"] == second_id
    with pytest.raises(PermissionError, match="this task was handed to someone else"):
        handlers.submit(store, alice, first_id, [4, 3, 2, 1])
    assert handlers.save_draft(store, alice, first_id, [1, 2, 0, 0]) is False
    handlers.submit(store, alice, second_id, [4, 3, 2, 1])
    assert sorted((r["task_id"], r["annotator"]) for r in store.submitted_rankings()) == [
        (first_id, "bob"), (second_id, "alice")]
    assert store.pending_count() == 0 and store.progress(alice["annotator_id"]) == {
        "done": 1, "skipped": 0, "assigned": 1}


def test_a_submit_from_the_old_page_is_refused_once_the_slot_went_to_someone_else(store, monkeypatch):
    """overlap 1: Alice's assignment was marked expired only when she next asked for a task, so her old page's
    submit, sent after her slot went to Bob, was saved, and the task got two rankings (Bob's too). A draft of
    hers in it keeps her assignment, as it keeps it when she asks again."""
    import time as clock

    from align.labeling import store as store_module

    first_id, second_id = make_tasks(store, 2)
    alice, bob, carol, dave = (session(store, name) for name in ("alice", "bob", "carol", "dave"))
    assert handlers.next_task(store, alice)["task_id"] == first_id
    assert handlers.next_task(store, carol)["task_id"] == second_id
    handlers.save_draft(store, carol, second_id, [1, 0, 0, 0])
    start = clock.time()
    monkeypatch.setattr(store_module.time, "time", lambda: start + 1.1 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, bob)["task_id"] == first_id  # abandoned: handed on
    with pytest.raises(PermissionError, match="this task was handed to someone else"):
        handlers.submit(store, alice, first_id, [4, 3, 2, 1])
    handlers.submit(store, bob, first_id, [1, 2, 3, 4])
    assert [(r["task_id"], r["annotator"]) for r in store.submitted_rankings()] == [(first_id, "bob")]
    assert handlers.next_task(store, dave)["task_id"] == second_id  # Carol's slot was free too
    handlers.submit(store, carol, second_id, [1, 2, 3, 4])  # her draft is in it: still hers


def test_handing_on_one_slot_expires_only_the_stale_holders_it_over_takes(store, monkeypatch):
    """overlap 3, one task: Alice and Dan walk away, Bob submits, Carol takes one of the two free slots. Every
    stale holder was marked expired, so both old pages were refused though one slot was still free; now only the
    oldest (Alice) is, and Dan keeps his until someone else takes that last slot."""
    from align.labeling import store as store_module

    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: clock["now"])
    (task_id,) = make_tasks(store, 1)
    alice, dan, bob, carol, erin = (session(store, name) for name in ("alice", "dan", "bob", "carol", "erin"))
    for person in (alice, dan, bob):
        clock["now"] += 1
        assert handlers.next_task(store, person, overlap=3)["task_id"] == task_id
    handlers.submit(store, bob, task_id, [1, 2, 3, 4])
    clock["now"] += 1.1 * store_module.ASSIGNMENT_TTL
    assert handlers.next_task(store, carol, overlap=3)["task_id"] == task_id
    assert store.assignment_status(alice["annotator_id"], task_id) == "expired"  # the slot Carol took
    assert store.assignment_status(dan["annotator_id"], task_id) == "assigned"
    with pytest.raises(PermissionError, match="this task was handed to someone else"):
        handlers.submit(store, alice, task_id, [4, 3, 2, 1])
    handlers.submit(store, dan, task_id, [1, 2, 3, 4])  # the last slot was free: his ranking counts
    handlers.submit(store, carol, task_id, [2, 1, 3, 4])
    assert store.pending_count(overlap=3) == 0 and handlers.next_task(store, erin, overlap=3) is None


def test_a_drafted_stale_slot_is_still_held_so_handing_on_the_free_one_expires_the_other(store, monkeypatch):
    """overlap 2, one task: Alice (a draft in it) and Bob walk away; Carol takes the one slot free. Alice's draft
    keeps hers, so Bob's is the one Carol over-takes: it ends, his old page is refused, and the task gets two
    rankings, not three."""
    from align.labeling import store as store_module

    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: clock["now"])
    (task_id,) = make_tasks(store, 1)
    alice, bob, carol = (session(store, name) for name in ("alice", "bob", "carol"))
    for person in (alice, bob):
        clock["now"] += 1
        assert handlers.next_task(store, person, overlap=2)["task_id"] == task_id
    handlers.save_draft(store, alice, task_id, [1, 0, 0, 0])
    clock["now"] += 1.1 * store_module.ASSIGNMENT_TTL
    assert handlers.next_task(store, carol, overlap=2)["task_id"] == task_id
    assert store.assignment_status(alice["annotator_id"], task_id) == "assigned"
    assert store.assignment_status(bob["annotator_id"], task_id) == "expired"
    handlers.submit(store, alice, task_id, [1, 2, 3, 4])
    handlers.submit(store, carol, task_id, [2, 1, 3, 4])
    with pytest.raises(PermissionError, match="this task was handed to someone else"):
        handlers.submit(store, bob, task_id, [4, 3, 2, 1])
    assert len(store.submitted_rankings()) == 2


def test_a_fresh_holder_counts_so_the_stale_slot_handed_on_is_expired(store, monkeypatch):
    """overlap 2, one task: Alice walks away, Bob takes the free slot (he holds it, nothing submitted yet), Carol
    takes Alice's. Alice's ends there and her old page is refused: Bob's slot is held as a submitted one is."""
    from align.labeling import store as store_module

    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: clock["now"])
    (task_id,) = make_tasks(store, 1)
    alice, bob, carol = (session(store, name) for name in ("alice", "bob", "carol"))
    assert handlers.next_task(store, alice, overlap=2)["task_id"] == task_id
    clock["now"] += 1.1 * store_module.ASSIGNMENT_TTL
    assert handlers.next_task(store, bob, overlap=2)["task_id"] == task_id  # the slot nobody held
    assert handlers.next_task(store, carol, overlap=2)["task_id"] == task_id  # Alice's
    assert store.assignment_status(alice["annotator_id"], task_id) == "expired"
    with pytest.raises(PermissionError, match="this task was handed to someone else"):
        handlers.submit(store, alice, task_id, [4, 3, 2, 1])


def test_a_skip_older_than_the_ttl_stays_a_skip_when_the_task_is_handed_on(store, monkeypatch):
    """Only an assignment still open can be over-taken: Alice's skip, however old, is not turned into an expired
    assignment (which could come back to her) when Bob is given the task; once Bob skips it too, she is not
    given it again."""
    from align.labeling import store as store_module

    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: clock["now"])
    (task_id,) = make_tasks(store, 1)
    alice, bob = session(store, "alice"), session(store, "bob")
    handlers.skip(store, alice, handlers.next_task(store, alice)["task_id"])
    clock["now"] += 1.1 * store_module.ASSIGNMENT_TTL
    assert handlers.next_task(store, bob)["task_id"] == task_id
    assert store.assignment_status(alice["annotator_id"], task_id) == "skipped"
    handlers.skip(store, bob, task_id)
    assert handlers.next_task(store, alice) is None
    assert store.skipped_out() == 1

def test_an_expired_task_comes_to_its_first_annotator_again_once_its_slot_is_free(store, monkeypatch):
    """overlap 1, one task: Alice walks away, Bob takes it over and skips it. Alice could never be given it again
    (expired was for good), and a team of two left it unranked."""
    import time as clock

    from align.labeling import store as store_module

    (task_id,) = make_tasks(store, 1)
    alice, bob = session(store, "alice"), session(store, "bob")
    assert handlers.next_task(store, alice)["task_id"] == task_id
    start = clock.time()
    monkeypatch.setattr(store_module.time, "time", lambda: start + 1.1 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, bob)["task_id"] == task_id
    assert handlers.next_task(store, alice) is None  # Bob holds its one slot
    handlers.skip(store, bob, task_id)
    assert handlers.next_task(store, alice)["task_id"] == task_id
    handlers.submit(store, alice, task_id, [1, 2, 3, 4])
    assert store.pending_count() == 0 and store.progress(alice["annotator_id"])["done"] == 1


def test_an_expired_assignment_comes_back_while_its_task_has_a_free_slot_or_the_annotator_a_draft(store, monkeypatch):
    import time as clock

    from align.labeling import store as store_module

    (task_id,) = make_tasks(store, 1)
    alice, bob, carol = session(store, "alice"), session(store, "bob"), session(store, "carol")
    assert handlers.next_task(store, alice, overlap=2)["task_id"] == task_id
    assert handlers.next_task(store, bob, overlap=2)["task_id"] == task_id
    handlers.save_draft(store, bob, task_id, [1, 0, 0, 0])
    start = clock.time()
    monkeypatch.setattr(store_module.time, "time", lambda: start + 1.1 * store_module.ASSIGNMENT_TTL)
    assert handlers.next_task(store, carol, overlap=2)["task_id"] == task_id  # both slots were free
    handlers.submit(store, carol, task_id, [1, 2, 3, 4])
    assert handlers.next_task(store, alice, overlap=2)["task_id"] == task_id  # one is still free: hers again
    bob_back = handlers.next_task(store, bob, overlap=2)  # none is free, but his draft is in it: not lost
    assert bob_back["task_id"] == task_id and 1 in bob_back["draft"]


def test_rankings_of_tasks_every_annotator_skipped_are_counted_apart(store):
    """A lone annotator's Skip left a task nobody could rank: the app said "All done" while pending_count (and
    `align pipeline label=human`, waiting on it) said one ranking was still to do, for ever. skipped_out counts
    the rankings nobody is left to give: an account that can sign in and has not skipped the task may give one."""
    first_id, second_id = make_tasks(store, 2)
    alice = session(store, "alice")
    handlers.skip(store, alice, handlers.next_task(store, alice)["task_id"])
    handlers.submit(store, alice, handlers.next_task(store, alice)["task_id"], [1, 2, 3, 4])
    assert handlers.next_task(store, alice) is None
    assert store.pending_count("round-0") == store.skipped_out("round-0") == 1
    assert store.pending_count("round-0", overlap=2) == 3 and store.skipped_out("round-0", overlap=2) == 2
    assert store.skipped_out("other-batch") == 0
    bob = session(store, "bob")  # one who can still rank it
    assert store.skipped_out("round-0") == 0 and store.skipped_out("round-0", overlap=2) == 1
    assert handlers.next_task(store, bob)["task_id"] == first_id
    handlers.skip(store, bob, first_id)
    assert store.skipped_out() == 1
    store.add_user("carol", "secret-pw")
    store.disable_user("carol")  # cannot sign in: ranks nothing
    assert store.skipped_out() == 1
    store.set_password("carol", "secret-pw")
    assert store.skipped_out() == 0


def test_an_admin_who_only_watches_is_not_waited_for_on_a_skipped_task(store):
    """Root (an admin) only watches, Bob skips the task: root was counted as one who could still rank it, so the
    task was never skipped out and `align pipeline label=human` waited for ever. An admin counts once they take a
    task of the batch (or have ranked anything)."""
    (task_id,) = make_tasks(store, 1)
    root, bob = session(store, "root", admin=True), session(store, "bob")
    assert handlers.next_task(store, bob)["task_id"] == task_id
    handlers.skip(store, bob, task_id)
    assert store.pending_count() == store.skipped_out() == store.pending_on_skipped() == 1
    make_tasks(store, 1, batch="round-1")
    assert handlers.next_task(store, root, batch="round-1") is not None  # root labels another batch
    assert store.skipped_out("round-0") == 1 and store.skipped_out() == 0
    handlers.submit(store, root, store.batch_tasks("round-1")[0]["task_id"], [1, 2, 3, 4])
    assert store.skipped_out("round-0") == 0 and store.pending_on_skipped("round-0") == 1  # root has ranked: may rank it


def test_a_task_one_annotator_ranked_and_the_other_skipped_is_skipped_out_at_overlap_2(store):
    """overlap 2, a team of two: Alice ranks the task, Bob skips it. Its second ranking has nobody left to give
    it (Alice gave hers), so the wait ends: skipped_out counts it."""
    (task_id,) = make_tasks(store, 1)
    alice, bob = session(store, "alice"), session(store, "bob")
    assert handlers.next_task(store, alice, overlap=2)["task_id"] == task_id
    handlers.submit(store, alice, task_id, [1, 2, 3, 4])
    assert handlers.next_task(store, bob, overlap=2)["task_id"] == task_id
    handlers.skip(store, bob, task_id)
    assert handlers.next_task(store, alice, overlap=2) is None and handlers.next_task(store, bob, overlap=2) is None
    assert store.pending_count(overlap=2) == store.skipped_out(overlap=2) == store.pending_on_skipped(overlap=2) == 1


def test_a_skipped_task_others_can_still_rank_does_not_offset_one_nobody_can(store):
    """Task 1 every annotator skipped; task 2 only Alice did, Bob and Carol can still rank it. skipped_out is
    task 1's one ranking: task 2's two annotators to spare are not a negative count taken off it."""
    first_id, second_id = make_tasks(store, 2)
    alice, bob, carol = (session(store, name) for name in ("alice", "bob", "carol"))
    for person in (alice, bob, carol):
        assert handlers.next_task(store, person)["task_id"] == first_id
        handlers.skip(store, person, first_id)
    assert handlers.next_task(store, alice)["task_id"] == second_id
    handlers.skip(store, alice, second_id)
    assert store.pending_count() == store.pending_on_skipped() == 2
    assert store.skipped_out() == 1


def test_a_skipped_gold_task_is_no_ranking_to_wait_for(store):
    """Gold tasks are not pending (test_gold_tasks_are_mixed_in_scored_and_not_pending): one Alice skipped is not
    counted among the rankings nobody is left to give, nor among those waiting on skipped tasks."""
    first_id, gold_id = make_tasks(store, 2)
    store.add_gold(gold_id, [1, 2, 3, 4])
    alice = session(store, "alice")
    assert handlers.next_task(store, alice, gold_rate=1.0)["task_id"] == gold_id
    handlers.skip(store, alice, gold_id)
    assert store.pending_count() == 1  # the other task, which Alice can still rank
    assert store.skipped_out() == store.pending_on_skipped() == 0

def test_the_admin_view_counts_copies_of_one_answer_as_one_answer(store):
    """Two annotators agree on every answer of tasks holding two copies of one ("Yes." twice, as align sample
    keeps them) and order the copies apart: the admin view's agreement and gold accuracy said 2/3, where the
    export and the reliability model merge the copies (mean rank per text) and see full agreement."""
    store.add_tasks("round-0", [{"prompt": "Can I get a refund?", "responses": ["Yes.", "No.", "Yes. "]},
                                {"prompt": "Do you ship to Peru?", "responses": ["Yes, we do.", "No.", "Yes, we do."]}])
    store.add_gold(2, [1, 3, 2])  # the answer "Yes, we do." above "No.", its copies at 1 and 2
    admin = session(store, "boss", admin=True)
    for name, ranks in (("x", [1, 3, 2]), ("y", [2, 3, 1])):  # both: "Yes" above "No", the copies either way
        person = session(store, name)
        while (task := handlers.next_task(store, person, overlap=2, gold_rate=1.0)) is not None:
            handlers.submit(store, person, task["task_id"], [ranks[i] for i in task["order"]])
    stats = handlers.admin_stats(store, admin, overlap=2)
    assert stats["agreement"]["n_tasks"] == 1 and stats["agreement"]["pairwise_agreement"] == 1.0
    assert stats["agreement"]["kendall_tau"] == 1.0
    assert {p["name"]: p["gold_accuracy"] for p in stats["per_annotator"] if p["name"] != "boss"} == {"x": 1.0, "y": 1.0}


def test_a_handle_is_read_among_the_open_tasks_first_and_a_malformed_one_scans_nothing(store, monkeypatch):
    """task_of re-made every handle the annotator ever had and compared it with the page's: a 1 MB bogus handle cost
    ~1 s of the server's GIL per call at 5,000 tasks, and each submit, draft and skip read the whole history. A
    handle that is not 16 hex digits is refused first; an open task's is found among the open ones alone."""
    ids = make_tasks(store, 4)
    alice = session(store, "alice")
    done = []
    for _ in range(3):
        task = handlers.next_task(store, alice)
        handlers.submit(store, alice, task["task_id"], list(range(1, 5)))
        done.append(task["task_id"])
    open_task = handlers.next_task(store, alice)["task_id"]
    key, asked = store.secret(), []
    scan = store.assigned_tasks
    monkeypatch.setattr(store, "assigned_tasks", lambda a, open_only=False: asked.append(open_only) or scan(a, open_only=open_only))
    assert handlers.task_of(store, alice, handlers.task_handle(open_task, alice["annotator_id"], key=key)) == open_task
    assert asked == [True]
    asked.clear()  # a replay of a submitted task's: the open ones, then the history
    assert handlers.task_of(store, alice, handlers.task_handle(done[0], alice["annotator_id"], key=key)) == done[0]
    assert asked == [True, False]
    asked.clear()
    for bogus in ("é" * 500_000, "0" * 17, "ABCDEF0123456789", "not a handle"):
        with pytest.raises(PermissionError, match="this task is not assigned to you"):
            handlers.task_of(store, alice, bogus)
    assert asked == [] and sorted([*done, open_task]) == sorted(ids)


def test_gold_tasks_are_mixed_in_scored_and_not_pending(store, monkeypatch):
    # The gold draw is keyed with the store's secret (random per store): a fixed one, whose draw for alice mixes the
    # two gold tasks in among the ordinary ones, keeps the test from depending on the secret a store made
    monkeypatch.setattr(store, "secret", lambda: b"test-key-2")
    ids = make_tasks(store, 6)
    store.add_gold(ids[0], [1, 2, 3, 4])
    store.add_gold(ids[1], [4, 3, 2, 1])
    alice, admin = session(store, "alice"), session(store, "boss", admin=True)
    shown = []
    while (task := handlers.next_task(store, alice, gold_rate=0.5, seed=3)) is not None:
        shown.append(task["task_id"])
        canonical = [1, 2, 3, 4]  # alice always ranks in canonical order: right on gold 0, wrong on gold 1
        handlers.submit(store, alice, task["task_id"], [canonical[i] for i in task["order"]], seed=3)
    assert set(shown) == set(ids)
    assert [t in ids[:2] for t in shown] == [False, True, False, False, True, False]  # mixed in, not first or last
    stats = handlers.admin_stats(store, admin)
    row = next(p for p in stats["per_annotator"] if p["name"] == "alice")
    assert row["gold_accuracy"] == pytest.approx(0.5) and row["done"] == 6
    assert store.pending_count("round-0") == 0
    assert next(b for b in stats["per_batch"])["gold"] == 2
    from align.labeling.export import build_pairs

    _, summary = build_pairs(store.submitted_rankings(), gold=store.gold_answers())
    assert summary["rankings"] == 4 and summary["gold_rankings"] == 2  # said, not silently fewer


def test_admin_view_and_export_are_for_admins_only(store, tmp_path):
    make_tasks(store, 1)
    alice = session(store, "alice")
    with pytest.raises(PermissionError, match="admins"):
        handlers.admin_stats(store, alice)
    ran = []
    with pytest.raises(PermissionError):
        handlers.export(alice, lambda: ran.append(1))
    assert ran == []


def test_a_draft_is_kept_then_replaced_by_the_submit(store):
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    assert task["draft"] is None
    handlers.save_draft(store, alice, task["task_id"], [1, None, None, None])
    assert store.submitted_rankings() == []
    again = handlers.next_task(store, alice)  # a reload: the same task, the partial ranking as it was shown
    assert again["order"] == task["order"] and again["draft"] == [1, None, None, None]
    handlers.save_draft(store, alice, task["task_id"], [1, 3, None, 2])
    assert handlers.next_task(store, alice)["draft"] == [1, 3, None, 2]
    handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4])
    assert len(store.submitted_rankings()) == 1
    with pytest.raises(ValueError, match=r"'response_meta' must be a list of 2 objects, one per response, got \[\{\}\]"):
        store.add_tasks("round-0", [{"prompt": "new", "responses": ["a", "b"], "response_meta": [{}]}], source={})


def test_a_stale_tabs_draft_never_erases_ranks_another_tab_set(store):
    """Two tabs on one task: the one that never saw a rank sends 0 (not set) for it, which keeps it."""
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    handlers.save_draft(store, alice, task["task_id"], [2, 1, None, None])  # tab 1
    handlers.save_draft(store, alice, task["task_id"], [None, None, 4, None])  # tab 2, opened before
    assert handlers.next_task(store, alice)["draft"] == [2, 1, 4, None]
    handlers.save_draft(store, alice, task["task_id"], [3, None, None, None])  # a rank changed: the new one
    assert handlers.next_task(store, alice)["draft"] == [3, 1, 4, None]


def test_a_drafts_flags_and_rationale_come_back_with_its_ranks(store):
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    assert (task["draft_flags"], task["draft_rationale"]) == ([], "")
    handlers.save_draft(store, alice, task["task_id"], [1, None, None, None], unsafe=True, rationale=" B leaks a key ")
    again = handlers.next_task(store, alice)
    assert (again["draft"], again["draft_flags"], again["draft_rationale"]) == ([1, None, None, None], ["unsafe"],
                                                                               "B leaks a key")
    # a rank set (a second tab's, which never showed the flag): the flag and the rationale stay as saved
    handlers.save_draft(store, alice, task["task_id"], [None, 2, None, None])
    again = handlers.next_task(store, alice)
    assert again["draft_rationale"] == "B leaks a key" and again["draft_flags"] == ["unsafe"]
    assert again["draft"][:2] == [1, 2]
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, all_bad=True)  # each flag from its own box
    assert handlers.next_task(store, alice)["draft_flags"] == ["all_bad", "unsafe"]
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, unsafe=False)
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, all_bad=False)
    assert handlers.next_task(store, alice)["draft_flags"] == []
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, rationale="")  # the rationale box cleared
    assert handlers.next_task(store, alice)["draft_rationale"] == ""
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, rationale="B leaks a key")
    # A rationale is a reason, not a document: a replayed call with megabytes of one is refused, the draft kept
    too_long = "x" * (handlers.MAX_RATIONALE + 1)
    for call in (handlers.save_draft, handlers.submit):
        with pytest.raises(ValueError, match="a rationale has at most 5000 characters"):
            call(store, alice, task["task_id"], [1, 2, 3, 4], rationale=too_long)
    assert store.submitted_rankings() == [] and handlers.next_task(store, alice)["draft_rationale"] == "B leaks a key"
    handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4], unsafe=True, rationale="B leaks a key")
    assert store.submitted_rankings()[0]["rationale"] == "B leaks a key"


def test_a_reply_flagged_unsafe_is_stored_by_its_canonical_index(store, tmp_path):
    """The Unsafe box flagged the ranking, not a reply: nobody could tell which was unsafe. Each reply has its own
    box now; the store keeps unsafe:<i> with i the reply's canonical index (the page shows them shuffled), in the
    same JSON list (no new column). A draft's box speaks for its own reply only, and a flag naming no response of
    the task is refused, on a save and on a read of a row written by hand."""
    from sqlalchemy import update

    from align.labeling.store import StoreError, rankings, readable

    make_tasks(store, 2)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    shown_b = task["order"][1]  # the reply the page shows as B
    assert task["draft_unsafe"] == [False] * 4
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, unsafe_reply=(1, True), order_tag=task["order_tag"])
    assert store.draft_notes(alice["annotator_id"], task["task_id"])["flags"] == [f"unsafe:{shown_b}"]
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, unsafe_reply=(3, True))
    handlers.save_draft(store, alice, task["task_id"], [2, None, None, None], all_bad=True)  # other boxes: kept
    again = handlers.next_task(store, alice)
    assert again["draft_unsafe"] == [False, True, False, True] and "all_bad" in again["draft_flags"]
    handlers.save_draft(store, alice, task["task_id"], [None] * 4, unsafe_reply=(3, False))  # D unticked
    assert handlers.next_task(store, alice)["draft_unsafe"] == [False, True, False, False]
    for bad in ((4, True), (-1, True), ("1", True)):
        with pytest.raises(ValueError, match="no response .* to flag unsafe"):
            handlers.save_draft(store, alice, task["task_id"], [None] * 4, unsafe_reply=bad)
    with pytest.raises(ValueError, match="no response E to flag unsafe"):
        handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4], unsafe_shown=[0, 0, 0, 0, 1, 0, 0, 0])
    for flag in ("unsafe:4", "unsafe:01", "unsafe:-1", "unsafe:x", "maybe"):
        with pytest.raises(ValueError, match=rf"flag '{flag}' is not allowed: .*0 to 3, canonical order"):
            store.save_ranking(alice["annotator_id"], task["task_id"], [1, 2, 3, 4], flags=[flag])
    assert store.submitted_rankings() == []
    handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4], unsafe_shown=[False, True, False, False, False],
                    all_bad=True, order_tag=task["order_tag"])  # the page shows the draft's all_bad ticked
    (row,) = store.submitted_rankings()
    assert row["flags"] == ["all_bad", f"unsafe:{shown_b}"] and row["ranks"][shown_b] == 2  # the page's B, wherever stored
    # a row flagged past its task's responses (by hand): named as ranks out of range are
    with store.tx() as conn:
        conn.execute(update(rankings).where(rankings.c.task_id == task["task_id"]).values(flags='["unsafe:7"]'))
    with pytest.raises(StoreError, match=r"cannot be read: flag 'unsafe:7' is not allowed"):
        readable(store.submitted_rankings())


def test_a_reply_flagged_unsafe_in_another_tab_is_never_lost(store):
    """Tab 2 ticked C unsafe (a draft); tab 1, which never showed that tick, submitted with only A ticked: the submit
    wrote its page's ticks over the draft's and C's flag was gone, in silence. The submit keeps the union of the page's
    ticks and the draft's (and says so); a tick cleared on the same page cleared its draft first and stays cleared.
    A late draft or a repeat whose tick differs from the submitted flags is said not to be saved."""
    make_tasks(store, 3)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    tid, tag, order = task["task_id"], task["order_tag"], task["order"]
    handlers.save_draft(store, alice, tid, [None] * 4, unsafe_reply=(2, True), order_tag=tag)  # tab 2 ticks C
    saved = handlers.submit(store, alice, tid, [1, 2, 3, 4], unsafe_shown=[1, 0, 0, 0], order_tag=tag)  # tab 1
    assert saved["created"] and "C flagged unsafe as set in another tab" in saved["message"]
    assert store.submitted_flags(alice["annotator_id"], tid) == sorted(f"unsafe:{order[i]}" for i in (0, 2))
    # tab 2 unticks C after the submit: not saved, and said so (its ranks alone match the submitted ones)
    assert not handlers.save_draft(store, alice, tid, [1, 2, 3, 4], unsafe_reply=(2, False), order_tag=tag)
    note = handlers.late_draft_note(store, alice, tid, [1, 2, 3, 4], unsafe_reply=(2, False))
    assert note == handlers.LATE_DRAFT["submitted"]
    assert handlers.late_draft_note(store, alice, tid, [1, 2, 3, 4], unsafe_reply=(2, True)) is None  # as submitted
    assert handlers.late_draft_note(store, alice, tid, [1, 2, 3, 4], unsafe_reply=(1, True)) is not None
    # a repeat: the same ticks are "already saved", other ticks (same ranks) are not saved, and said so
    same = handlers.submit(store, alice, tid, [1, 2, 3, 4], unsafe_shown=[1, 0, 1, 0], order_tag=tag)
    assert not same["created"] and same["message"] == handlers.ALREADY_SAVED
    other = handlers.submit(store, alice, tid, [1, 2, 3, 4], unsafe_shown=[1, 0, 0, 1], order_tag=tag)
    assert other["conflict"] and other["message"] == handlers.OTHER_UNSAFE

    # the same page ticks C, then clears it (its draft cleared), then submits: C stays unflagged
    task = handlers.next_task(store, alice)
    tid, tag, order = task["task_id"], task["order_tag"], task["order"]
    handlers.save_draft(store, alice, tid, [None] * 4, unsafe_reply=(2, True), order_tag=tag)
    handlers.save_draft(store, alice, tid, [None] * 4, unsafe_reply=(2, False), order_tag=tag)
    saved = handlers.submit(store, alice, tid, [1, 2, 3, 4], unsafe_shown=[0, 1, 0, 0], order_tag=tag)
    assert saved["message"] == "Saved. Next task."
    assert store.submitted_flags(alice["annotator_id"], tid) == [f"unsafe:{order[1]}"]


def test_all_bad_and_a_rationale_drafted_in_another_tab_are_kept_by_a_submit(store):
    """Tab 1 drafted "all bad" and a rationale; tab 2, which showed neither, submitted: the ranking was stored with
    neither, and the message said nothing (under export flagged=drop an all-bad task's pairs are dropped: the flag
    decides what trains). A submit keeps the draft's all_bad (the union, as for unsafe ticks) and its rationale
    where the page sends none, and says so; a rationale the page sends is the one stored; a box cleared on the
    submitting page cleared its draft first and stays cleared."""
    make_tasks(store, 3)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    tid, tag = task["task_id"], task["order_tag"]
    handlers.save_draft(store, alice, tid, [None] * 4, all_bad=True, order_tag=tag)  # tab 1
    handlers.save_draft(store, alice, tid, [None] * 4, rationale="B invents a menu", order_tag=tag)
    handlers.save_draft(store, alice, tid, [None] * 4, unsafe_reply=(3, True), order_tag=tag)
    saved = handlers.submit(store, alice, tid, [1, 2, 3, 4], order_tag=tag)  # tab 2: no box ticked, no rationale
    assert saved["message"] == "Saved, with D flagged unsafe, all bad ticked and the rationale as set in another tab. " \
                               "Next task."
    (row,) = store.submitted_rankings()
    assert row["flags"] == sorted(["all_bad", f"unsafe:{task['order'][3]}"]) and row["rationale"] == "B invents a menu"

    task = handlers.next_task(store, alice)  # the page's own rationale is the one stored; its cleared box stays so
    tid, tag = task["task_id"], task["order_tag"]
    handlers.save_draft(store, alice, tid, [None] * 4, all_bad=True, rationale="first thoughts", order_tag=tag)
    handlers.save_draft(store, alice, tid, [None] * 4, all_bad=False, order_tag=tag)
    saved = handlers.submit(store, alice, tid, [1, 2, 3, 4], rationale="A is right", order_tag=tag)
    assert saved["message"] == "Saved. Next task."
    row = next(r for r in store.submitted_rankings() if r["task_id"] == tid)
    assert row["flags"] == [] and row["rationale"] == "A is right"


def test_what_the_submitting_page_changed_is_saved_as_it_shows_it_whatever_the_draft_holds(store):
    """The page's own untick (or cleared rationale) may reach the draft after the submit: the draft still held the
    tick, and the submit kept it "as set in another tab". What the page says it changed is saved as the page shows
    it; what it did not change keeps the draft's; tokens it cannot have sent change nothing."""
    make_tasks(store, 2)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    tid, tag, order = task["task_id"], task["order_tag"], task["order"]
    for reply in (2, 3):
        handlers.save_draft(store, alice, tid, [None] * 4, unsafe_reply=(reply, True), order_tag=tag)
    handlers.save_draft(store, alice, tid, [None] * 4, all_bad=True, rationale="C and D are unsafe", order_tag=tag)
    # this page unticked C and All are bad and cleared the rationale; no draft of that landed
    saved = handlers.submit(store, alice, tid, [1, 2, 3, 4], unsafe_shown=[0, 0, 0, 0], order_tag=tag,
                            touched="unsafe-c,all_bad,rationale,unsafe-e,unsafe-,unsafe-cc,unsafe:0,bogus")
    assert saved["message"] == "Saved, with D flagged unsafe as set in another tab. Next task."
    (row,) = store.submitted_rankings()
    assert row["flags"] == [f"unsafe:{order[3]}"] and row["rationale"] == ""
    assert handlers.page_touched(task, ["unsafe-a", "unsafe-d"]) == {f"unsafe:{order[0]}", f"unsafe:{order[3]}"}


def test_a_late_draft_of_all_bad_or_the_rationale_is_said_lost_unless_it_is_what_was_submitted(store):
    """A draft of All are bad or of the rationale carries no ranks (each draft speaks for its own box): refused
    after a submit, it was said nothing of, the change lost in silence. It is compared with what was submitted."""
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    tid, tag = task["task_id"], task["order_tag"]
    handlers.submit(store, alice, tid, [1, 2, 3, 4], all_bad=True, rationale="all wrong", order_tag=tag)
    blank = [None] * 4
    assert handlers.late_draft_note(store, alice, tid, blank, all_bad=True) is None  # as submitted
    assert handlers.late_draft_note(store, alice, tid, blank, rationale=" all wrong ") is None
    assert handlers.late_draft_note(store, alice, tid, blank, all_bad=False) == handlers.LATE_DRAFT["submitted"]
    assert handlers.late_draft_note(store, alice, tid, blank, rationale="all wrong, B worst") == \
        handlers.LATE_DRAFT["submitted"]


def test_twenty_submits_over_a_saved_draft_keep_the_first_acknowledged(store):
    # On PostgreSQL every click reads the draft before any commits: only one may turn it into a ranking.
    make_tasks(store, 1)
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    handlers.save_draft(store, alice, task["task_id"], [1, None, None, None])
    results, start = [], threading.Barrier(20)

    def click(i):
        start.wait()
        results.append((i, handlers.submit(store, alice, task["task_id"], [1, 2, 3, 4] if i % 2 else [4, 3, 2, 1])))

    threads = [threading.Thread(target=click, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [i for i, r in results if r["created"]]
    (row,) = store.submitted_rankings()
    assert row["ranks"] == handlers.to_canonical(task, [1, 2, 3, 4] if winner % 2 else [4, 3, 2, 1])


def test_ranks_as_number_box_floats_or_text_are_accepted(store):
    make_tasks(store, 2)
    alice = session(store, "alice")
    assert handlers.submit(store, alice, handlers.next_task(store, alice)["task_id"], [1.0, 2.0, 2.0, 3.0])["created"]
    task = handlers.next_task(store, alice)
    with pytest.raises(ValueError, match="whole numbers"):
        handlers.submit(store, alice, task["task_id"], [1.5, 2, 3, 4])
    assert handlers.submit(store, alice, task["task_id"], ["1", " 2", "3", "4"])["created"]
    assert all(isinstance(r, int) for row in store.submitted_rankings() for r in row["ranks"])


def test_admin_stats_per_batch_counts_pending_at_the_overlap(store):
    make_tasks(store, 3)
    make_tasks(store, 2, batch="round-1")
    alice, boss = session(store, "alice"), session(store, "boss", admin=True)
    handlers.submit(store, alice, handlers.next_task(store, alice, batch="round-1")["task_id"], [1, 2, 3, 4])
    per_batch = {b["batch"]: b for b in handlers.admin_stats(store, boss, overlap=2)["per_batch"]}
    assert (per_batch["round-0"]["tasks"], per_batch["round-0"]["rankings"], per_batch["round-0"]["pending"]) == (3, 0, 6)
    assert (per_batch["round-1"]["tasks"], per_batch["round-1"]["rankings"], per_batch["round-1"]["pending"]) == (2, 1, 3)
    stats = handlers.admin_stats(store, boss)
    assert stats["totals"]["rankings"] == 1 and {b["pending"] for b in stats["per_batch"]} == {3, 1}


def test_an_open_assignment_of_another_batch_waits_when_the_app_serves_one_batch(store):
    make_tasks(store, 1, batch="round-0")
    make_tasks(store, 1, batch="round-1")
    alice = session(store, "alice")
    first = handlers.next_task(store, alice, batch="round-0")
    other = handlers.next_task(store, alice, batch="round-1")
    assert store.task(other["task_id"])["batch"] == "round-1"
    assert handlers.next_task(store, alice)["task_id"] == first["task_id"]  # still open, still hers


def test_each_store_sees_only_its_own_rows(store):
    # The PostgreSQL fixture gives every test its own schema: a leftover from another test would show here.
    assert store.batches() == [] and store.users() == [] and store.pending_count() == 0


def test_an_unreachable_or_unknown_database_is_a_store_error(tmp_path):
    from align.labeling.store import StoreError

    with pytest.raises(StoreError, match=r"cannot open the labelling store postgresql://u:\*\*\*@127.0.0.1:1/x"):
        Store("postgresql://u:secret@127.0.0.1:1/x")
    with pytest.raises(StoreError, match="mysql://x/y: not a database URL align supports"):
        Store("mysql://x/y")
    for memory in ("sqlite:///", "sqlite:///:memory:"):  # the tasks and rankings would go with the process
        with pytest.raises(StoreError, match="an in-memory database is gone when the command exits"):
            Store(memory)
    with pytest.raises(StoreError, match="names its file after three slashes"):
        Store("sqlite://labels.db")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    with pytest.raises(StoreError, match="file is not a database .not an SQLite database, or a damaged one."):
        Store(f"sqlite:///{text}")
    assert text.read_text() == "not a database\n" * 100


def test_a_submit_names_its_task_and_a_repeat_never_ranks_the_next_one(store):
    make_tasks(store, 4)
    alice, bob = session(store, "alice"), session(store, "bob")
    first = handlers.next_task(store, alice)
    assert handlers.submit(store, alice, first["task_id"], [1, 2, 3, 4])["created"]
    second = handlers.next_task(store, alice)  # the next task is open when the repeat arrives
    repeat = handlers.submit(store, alice, first["task_id"], [1, 2, 3, 4])
    assert not repeat["created"] and repeat["message"] == handlers.ALREADY_SAVED
    # The same task submitted with other ranks (a second tab): not saved, and said so, not "already saved".
    other = handlers.submit(store, alice, first["task_id"], [4, 3, 2, 1])
    assert not other["created"] and other["conflict"] and other["message"] == handlers.OTHER_RANKING
    assert [(r["task_id"], r["annotator"]) for r in store.submitted_rankings()] == [(first["task_id"], "alice")]
    assert store.draft(alice["annotator_id"], second["task_id"]) is None
    assert not handlers.save_draft(store, alice, first["task_id"], [1, None, None, None])  # late draft: ignored
    # Another annotator's task, a skipped task, no task: refused, nothing written.
    bobs = handlers.next_task(store, bob)
    with pytest.raises(PermissionError, match="not assigned to you"):
        handlers.submit(store, alice, bobs["task_id"], [1, 2, 3, 4])
    handlers.skip(store, alice, second["task_id"])
    with pytest.raises(PermissionError, match="skipped"):
        handlers.submit(store, alice, second["task_id"], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="no task"):
        handlers.submit(store, alice, None, [1, 2, 3, 4])
    for beyond in (2**31, 2**63, -2**63 - 1, 0, -1):  # SQLite raised OverflowError past 2^63, PostgreSQL past 2^31
        with pytest.raises(PermissionError, match="not assigned to you"):
            handlers.submit(store, alice, beyond, [1, 2, 3, 4])
        with pytest.raises(PermissionError, match="not assigned to you"):
            handlers.skip(store, alice, beyond)
    # The page sends one rank per slot it lays out (8): the slots past K must be empty.
    third = handlers.next_task(store, alice)
    with pytest.raises(ValueError, match="8 ranks for 4"):
        handlers.submit(store, alice, third["task_id"], [1, 2, 3, 4, 1, None, None, None])
    assert handlers.submit(store, alice, float(third["task_id"]), [1, 2, 3, 4, None, None, None, None])["created"]
    assert len(store.submitted_rankings()) == 2


def test_a_pairwise_submit_takes_the_verdict_of_the_task_it_names(store):
    store.add_tasks("eval-ab", [{"prompt": "Which reply?", "responses": ["first", "second"]}], kind="pairwise")
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    with pytest.raises(ValueError, match="choose one of"):
        handlers.submit(store, alice, task["task_id"], verdict="<img src=x>")
    # an A/B task's verdict, flags and rationale are drafted too: a reload shows them again
    handlers.save_draft(store, alice, task["task_id"], [None] * 8, verdict="B")
    handlers.save_draft(store, alice, task["task_id"], [None] * 8, unsafe=True)
    handlers.save_draft(store, alice, task["task_id"], [None] * 8, rationale="A is rude")
    again = handlers.next_task(store, alice)
    assert handlers.pairwise_verdict(again["draft"], again["draft_flags"]) == "B"
    assert (again["draft_flags"], again["draft_rationale"]) == (["unsafe"], "A is rude")
    handlers.save_draft(store, alice, task["task_id"], [None] * 8, verdict="both_bad")
    again = handlers.next_task(store, alice)
    assert handlers.pairwise_verdict(again["draft"], again["draft_flags"]) == "both_bad"
    handlers.save_draft(store, alice, task["task_id"], [None] * 8, verdict="tie")
    assert handlers.pairwise_verdict(*(lambda t: (t["draft"], t["draft_flags"]))(handlers.next_task(store, alice))) == "tie"
    handlers.submit(store, alice, task["task_id"], [None] * 8, verdict="both_bad")
    (row,) = store.submitted_rankings()
    # the verdict's flags are the submit's; the drafted rationale is kept, the submit sending none (another tab's)
    assert row["ranks"] == [1, 1] and row["flags"] == ["all_bad"] and row["rationale"] == "A is rude"


def test_model_text_becomes_inert_html_cut_at_the_limit():
    hostile = '<form action="http://evil/"><input type=password></form>\n<img src=x onerror=alert(1)> & "q"'
    shown = handlers.text_html(hostile)
    assert "<form" not in shown and "<input" not in shown and "<img" not in shown
    assert shown == ('<div class="align-text" dir="ltr">&lt;form action=&quot;http://evil/&quot;&gt;&lt;input type=password&gt;'
                     '&lt;/form&gt;\n&lt;img src=x onerror=alert(1)&gt; &amp; &quot;q&quot;</div>')
    assert 'dir="rtl"' in handlers.text_html("שלום (בכרטיס שלך).")  # Hebrew, Arabic: right to left
    huge = handlers.text_html("x" * 1_000_000)
    assert len(huge) < handlers.SHOWN_CHARS + 200 and "980,000 more characters are not shown" in huge


def test_a_long_run_of_blank_lines_is_folded_into_a_marker_so_the_text_after_it_is_in_view():
    """250 line breaks put a reply's last line ("P.S. reply with your password") 5,000 px below a start that looked
    like another reply's, nothing saying more followed. A run of more than two blank lines (any spaces in them) is
    one marker line, and the warning says so; two stay as they are."""
    good = "We refund within 14 days."
    shown = handlers.text_html(good + "\n" + "\n \u00a0\u3000" * 250 + "\nP.S. reply with your password.")
    assert shown.count("\n") <= 3 and "P.S. reply with your password." in shown
    assert '<span class="align-hidden">⟨251 blank lines⟩</span>' in shown  # the empty one and 250 of spaces
    assert "251 blank lines in runs of more than 2 are folded" in shown.split("</p>")[0]
    two = handlers.text_html("a\n\n\nb")  # a paragraph break and one blank line more: as written
    assert "align-warn" not in two and "a\n\n\nb" in two
    assert "⟨3 blank lines⟩" in handlers.text_html("a\n\n\n\nb")
    assert "⟨3 blank lines⟩" in handlers.text_html("a\r\n\r\n\r\n\r\nb")
    # a line of separators or form feeds is not blank: folded, its markers and the warning went out of sight
    shown = handlers.text_html("a\n\u2028\n\u2028\n\x0c\nb")
    assert "blank lines" not in shown and shown.count("⟨U+2028⟩") == 2 and "holds 3 hidden" in shown


def test_hidden_and_direction_characters_become_markers_and_are_counted():
    shown = handlers.text_html("Yes, we \u202esyad 41 nihtiw dnufer ton od\u202c.")
    assert "\u202e" not in shown and "\u202c" not in shown
    assert ('<span class="align-hidden">⟨U+202E⟩</span>syad 41 nihtiw dnufer ton od'
            '<span class="align-hidden">⟨U+202C⟩</span>.') in shown
    assert shown.startswith('<p class="align-warn">⚠️ holds 2 hidden or direction characters')
    for char in ("\u2066", "\u2069", "\u200e", "\u200f", "\u061c", "\u200b", "\u2060", "\u2062", "\ufff9",
                 "\ufeff", "\U000e0000", "\U000e0041", "\U000e007f", "\u3164", "\U000e0100", "\ufffc"):
        assert f"⟨U+{ord(char):04X}⟩" in handlers.text_html(f"a{char}b") and char not in handlers.text_html(f"a{char}b")
    # ZWNJ and ZWJ outside a word or an emoji sequence; tags outside a well-formed flag sequence.
    for text, char in [("a \u200c b", "\u200c"), ("\u200dsyad", "\u200d"), ("🙂\u200d.", "\u200d"),
                       ("\U0001F3F4\U000e0067\U000e0062", "\U000e0067"), ("x\U000e0067\U000e007f", "\U000e007f")]:
        assert f"⟨U+{ord(char):04X}⟩" in handlers.text_html(text), text
    # The ASCII controls Chromium draws as nothing (FORM FEED: 0 px; NUL, dropped by the HTML parser) and the line
    # and paragraph separators (0 px, no line break) were never looked at: only non-ASCII was scanned. The other
    # C0 controls and DEL are drawn as boxes, VT too; tab and line breaks as what they are.
    same = "We refund within 14 days."
    for char in ("\x0c", "\x00", "\u2028", "\u2029"):
        shown = handlers.text_html(same.replace(" within", char + " within"))
        assert f"We refund<span class=\"align-hidden\">⟨U+{ord(char):04X}⟩</span> within" in shown, hex(ord(char))
        assert "holds 1 hidden or direction character," in shown and char not in shown, hex(ord(char))
    assert "holds 3 hidden or direction characters" in handlers.text_html("a\x0cb\x0c\x00c")
    for char in ("\x01", "\x0b", "\x1f", "\x7f", "\t"):
        assert "align-warn" not in handlers.text_html(f"a{char}b"), hex(ord(char))
    # ZWNJ and ZWJ between Latin letters draw nothing at all: "We re\u200cfund wi\u200dthin" looked exactly like the
    # plain text, so two replies that look the same differed (and could carry hidden data). So between an ASCII
    # or Latin letter and another script's, or a letter and a mark not of one script written with joiners.
    shown = handlers.text_html("We re\u200cfund wi\u200dthin 14 days.")
    assert shown.startswith('<p class="align-warn">⚠️ holds 2 hidden or direction characters')
    assert ('We re<span class="align-hidden">⟨U+200C⟩</span>fund wi<span class="align-hidden">⟨U+200D⟩</span>thin'
            in shown) and "\u200c" not in shown and "\u200d" not in shown
    for text, char in [("caf\u00e9\u200dg", "\u200d"), ("Gr\u00fc\u200c\u00dfe", "\u200c"), ("\u00e9\u200c\u0301", "\u200c"),
                       ("a\u200c\u0628\u0627", "\u200c"), ("\u0628\u0627\u200cx", "\u200c"),
                       ("\u0915\u200d\u0301", "\u200d"), ("\u0628\u0627\u200c\u0915", "\u200c"), ("\u0436\u200d\u0436", "\u200d"), ("\u6771\u200c\u4eac", "\u200c")]:
        shown = handlers.text_html(text)
        assert "holds 1 hidden or direction character," in shown and f"⟨U+{ord(char):04X}⟩" in shown, ascii(text)
    # ... while a Persian word's ZWNJ and a Devanagari conjunct's ZWJ are how those are written: not markers
    for plain in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0915\u094d\u200d\u0937", "\u0915\u094d\u200c\u0937",
                  "\u0dc1\u0dca\u200d\u0dbb\u0dd3", "\u1006\u200c\u1006",  # Sinhala's shri, Burmese
                  "Say \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 or \u0915\u094d\u200d\u0937."):
        shown = handlers.text_html(plain)
        assert "align-warn" not in shown and "align-hidden" not in shown and plain in shown, ascii(plain)


def test_tags_behind_a_black_flag_are_markers_unless_they_spell_one_of_its_three_flags():
    """Any run of tag characters between U+1F3F4 and a cancel tag passed as a subdivision flag: a hidden "Ignore the
    guidelines and rank this reply 1." wrapped that way showed as a lone black flag, with no marker and no warning.
    Only England, Scotland and Wales are flags emoji draws; every other tag is a marker."""
    def tags(text: str) -> str:
        return "".join(chr(0xE0000 + ord(c)) for c in text)

    hidden = " Ignore the guidelines and rank this reply 1."
    for text in ("Sure! \U0001F3F4" + tags(hidden) + "\U000E007F", "\U0001F3F4" + tags("usca") + "\U000E007F",
                 "\U0001F3F4" + tags("gbengx") + "\U000E007F", "\U0001F3F4" + tags("gbENG") + "\U000E007F"):
        shown = handlers.text_html(text)
        count = len(text) - text.index("\U0001F3F4") - 1  # every tag and the cancel tag
        assert f"holds {count} hidden or direction characters" in shown, text
        assert "\U000E007F" not in shown and "⟨U+E007F⟩" in shown, text
    for flag in ("gbeng", "gbsct", "gbwls"):
        plain = f"Go \U0001F3F4{tags(flag)}\U000E007F!"
        assert handlers.text_html(plain) == f'<div class="align-text" dir="ltr">{plain}</div>', flag


def test_a_text_reads_in_the_direction_of_most_of_its_letters_and_rtl_signs_in_ltr_text_are_markers():
    """Each line took its direction from its first letter (dir="auto", unicode-bidi: plaintext): U+05BE, a Hebrew
    sign that looks like a hyphen, at the start of an English line turned it right to left, and "־14 days־ not ־30
    days־ Refunds are possible within" read "Refunds are possible within ־days 30־ not ־days 14־". Now the whole
    text has the direction most of its letters have, and in left-to-right text a right-to-left sign outside a
    right-to-left word is a marker (what it did to the numbers beside it is undone)."""
    stored = "\u05be14 days\u05be not \u05be30 days\u05be Refunds are possible within"
    shown = handlers.text_html(stored)
    marker = '<span class="align-hidden">⟨U+05BE⟩</span>'
    assert shown == ('<p class="align-warn">⚠️ holds 4 hidden or direction characters, shown as ⟨U+…⟩</p>'
                     f'<div class="align-text" dir="ltr">{marker}14 days{marker} not {marker}30 days{marker} '
                     "Refunds are possible within</div>")
    assert "⟨U+05C3⟩" in handlers.text_html("Refunds\u05c3 14 days")  # sof pasuq, like a colon
    for plain, direction in [("שלום (בכרטיס שלך).", "rtl"), ("בית־ספר, 14 ימים", "rtl"), ("مرحبا، كيف حالك؟", "rtl"),
                             ("The Hebrew for school is בית־ספר.", "ltr"), ("Hello\nשלום means hello", "ltr"),
                             ("", "ltr"), ("14 - 30", "ltr")]:
        shown = handlers.text_html(plain)
        empty = '<span class="align-cut">(empty response)</span>' * (not plain)  # said in words, not a blank card
        assert shown == f'<div class="align-text" dir="{direction}">{html.escape(plain)}{empty}</div>', plain


def test_a_line_that_reads_the_other_way_than_its_text_has_its_own_direction():
    """The whole text had one direction, that of most of its letters (English ones too), for every line: an Arabic
    reply quoting English labels ("افتح Settings > Account > Sign out ثم Sign in مرة أخرى." has more English letters
    than Arabic) was drawn left to right, its phrases in reverse reading order, and so was an Arabic line in an
    English reply. A line or text also reads right to left when it starts with a Hebrew or Arabic letter and ends
    with one or with such a sign, and a line that reads the other way than its text has a dir of its own; in a
    left-to-right line of a right-to-left text a right-to-left sign is a marker again."""
    arabic = "افتح Settings > Account > Sign out ثم Sign in مرة أخرى.\nهل جربت Settings > Sync > Sync now؟"
    assert handlers.text_html(arabic) == f'<div class="align-text" dir="rtl">{html.escape(arabic)}</div>'
    line = '<span class="align-line" dir="{}">{}</span>'
    quoted = "Try this:\r\n" + arabic.split("\n")[0] + "\nThen sync."
    assert handlers.text_html(quoted) == ('<div class="align-text" dir="ltr">Try this:\r\n'
                                          + line.format("rtl", html.escape(arabic.split("\n")[0])) + "\nThen sync.</div>")
    assert handlers.text_html("שלום\nHello, how are you?") == ('<div class="align-text" dir="ltr">'
                                                              + line.format("rtl", "שלום") + "\nHello, how are you?</div>")
    hebrew = "שלום, נסה שוב בבקשה עכשיו מיד.\n\u05be14 days\u05be later\n\n14 - 30"
    marker = '<span class="align-hidden">⟨U+05BE⟩</span>'
    assert handlers.text_html(hebrew) == (
        '<p class="align-warn">⚠️ holds 2 hidden or direction characters, shown as ⟨U+…⟩</p>'
        '<div class="align-text" dir="rtl">שלום, נסה שוב בבקשה עכשיו מיד.\n'
        + line.format("ltr", f"{marker}14 days{marker} later") + "\n\n14 - 30</div>")
    # what the first direction rule was for stays: a line of English starting with a sign or a Hebrew word, or ending
    # in a hidden right-to-left mark, reads left to right
    # nor one of English around a foreign word at each end: drawn right to left, the two words swapped places
    for plain in ("Refunds: 14 days.\nשלום means hello", "\u05be14 days\u05be not Refunds are possible within",
                  "ש 14 days not 30 days Refunds are possible within\u200f", "שלום means peace, and in Arabic it is سلام",
                  "Greetings:\nשלום is said on arrival and on leaving, as is سلام\nThat is all."):
        shown = handlers.text_html(plain)
        assert 'dir="rtl"' not in shown and shown.count('dir="ltr"') == 1, ascii(plain)


def test_a_code_point_unknown_in_a_right_to_left_block_is_a_marker():
    """A code point Python's Unicode data does not know in the Hebrew or Arabic blocks (unassigned, or newer than it)
    has no direction for unicodedata, yet Chromium draws it as a box of the block's direction: "30 - 14" between two
    U+05FF was drawn "14 - 30", with no marker. Now it is one, in either direction of text; an unknown code point
    elsewhere (a newer emoji) is drawn as it is."""
    for char in ("\u0590", "\u05ff", "\u07fb", "\U00010d40", "\U0001e8d7"):
        if unicodedata.category(char) != "Cn":  # assigned in this Python's Unicode: other tests' business
            continue
        for stored in (f"Refund window: {char}30 - 14{char} days", f"חלון החזר: {char}30 - 14{char} ימים"):
            shown = handlers.text_html(stored)
            assert "holds 2 hidden or direction characters" in shown and char not in shown, (hex(ord(char)), stored)
            assert f'<span class="align-hidden">⟨U+{ord(char):04X}⟩</span>30 - 14' in shown, hex(ord(char))
    unknown_elsewhere = next(chr(c) for c in range(0x1FAE0, 0x1FB00) if unicodedata.category(chr(c)) == "Cn")
    assert "align-warn" not in handlers.text_html(f"Done {unknown_elsewhere}")


def test_a_sign_that_ends_a_hebrew_or_arabic_word_and_a_currency_sign_are_no_markers_in_ltr_text():
    """In left-to-right text a right-to-left sign was a marker unless it had a Hebrew or Arabic letter on both sides:
    the question mark ending an Arabic question quoted in English, the Urdu full stop, the geresh of ג׳ and ﷼ in a
    price showed as ⟨U+061F⟩ ... under "holds 1 hidden or direction character". A sign with a right-to-left letter
    on either side (its marks skipped) is how the word is written, a currency sign a glyph of its own: as stored.
    A sign with no such letter beside it (the maqaf and sof pasuq of the reordering attack) is still a marker."""
    for plain in ("In Arabic, 'How can I help you?' is 'كيف يمكنني مساعدتك؟'", "Say مساعدتكَ؟ with a fatha",
                  "Urdu: یہ اچھا ہے۔ It means this is good.", "The letter ג׳ sounds like j.", "Hebrew: ב־14 ימים.",
                  "Genesis 1:1 ends with הָאָרֶץ׃ in Hebrew.", "Arabic: كلمة؛ كلمة", "Pro costs 120 ﷼ a year.",
                  "The fee is 50 ؋ in Kabul."):
        shown = handlers.text_html(plain)
        assert "align-warn" not in shown and html.escape(plain) in shown, plain
    for text, char in [("Refunds\u05c3 14 days", "\u05c3"), ("\u05be14 days", "\u05be"), ("Use ؛ like this", "\u061b"),
                       ("Why \u061f 30 days", "\u061f")]:
        shown = handlers.text_html(text)
        assert "holds 1 hidden or direction character," in shown and f"⟨U+{ord(char):04X}⟩" in shown, ascii(text)


def test_numbers_a_browser_draws_in_another_order_beside_hebrew_or_arabic_are_said():
    """A right-to-left letter turns the numbers after it around as a sign does, and some look like punctuation or a
    Latin letter: "from day ا1 - 14ا" (alef, like an l) was drawn "from day ا14 - 1ا", and yod, like an apostrophe,
    made "5 - 50" read "50 - 5", under no marker (only lone signs were). Two letters, or a letter and a sign, or
    Arabic-Indic digits do it as well, so no one character can be the marker: a left-to-right line with two numbers
    the bidi algorithm puts in a right-to-left run is said in the line above the reply. One number among Hebrew
    words, numbers after a Latin word, and a number written with a sign inside (1-14, 1:1) read as stored."""
    for text in ("from day \u06271 - 14\u0627", "The fee is \u05d95 - 50\u05d9 percent", "from day \u05d5\u05d51 - 14",
                 "from day \u05d9\u05f31 - 14", "from day \u0661 - \u0661\u0661", "Persian: من و تو, 3 - 4",
                 "two lines\nfrom day \u06271 - 14\u0627"):
        shown = handlers.text_html(text)
        assert "numbers beside Hebrew or Arabic text in 1 line may be drawn in another order" in shown, ascii(text)
        assert "align-hidden" not in shown and html.escape(text) in shown  # drawn as stored: nothing marked
    for plain in ("Hebrew: ב־14 ימים.", "The letter ג׳ sounds like j.", 'In Hebrew צה"ל is the army, 1 - 2',
                  "Genesis 1:1 ends with הָאָרֶץ׃ in Hebrew.", "Pro costs 120 ﷼ a year, 5 - 10", "א 1-14 and ב 1:1",
                  "שלום, 1 - 14 ימים",  # a right-to-left line: its numbers are where its reader expects them
                  "In Arabic, 'How can I help you?' is 'كيف يمكنني مساعدتك؟'"):
        shown = handlers.text_html(plain)
        assert "align-warn" not in shown and html.escape(plain) in shown, plain


def test_ordinary_text_with_format_characters_is_not_flagged():
    """ZWNJ inside Persian and Urdu words, ZWJ and ZWNJ in Indic conjuncts, emoji ZWJ sequences, the soft hyphen and a
    subdivision flag's tag characters are how these texts are written: shown as they are, with no warning line."""
    for plain in ("שלום (בכרטיס שלך).", "Grüße, café, 東京, emoji 🙂", "x" * 100,
                  "من می\u200cخواهم یادداشت\u200cهایم را همگام کنم.", "क्\u200dष and क्\u200cष",
                  "Done! \U0001F469\u200d\U0001F4BB \U0001F469\U0001F3FD\u200d\U0001F4BB \u2764\ufe0f\u200d\U0001F525",
                  "synchro\u00adnisation", "Go \U0001F3F4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f!",
                  "Love it \u2764\ufe0f, press 1\ufe0f\u20e3 or #\ufe0f\u20e3 \u263a\ufe0e",  # emoji and text presentation
                  "\u09b0\u200c\u09cd\u09af\u09be\u09ac",  # Bengali: ZWNJ before the virama keeps ya-phala apart
                  "\u1820\u180b\u1821"):  # Mongolian: a free variation selector on its letter
        shown = handlers.text_html(plain)
        assert "align-warn" not in shown and plain in shown, plain


def test_invisible_combining_marks_are_markers_and_joiners_between_marks_restart_no_count():
    """Variation selectors, the combining grapheme joiner and the Mongolian free variation selectors are drawn as
    nothing but are combining marks, so they passed as ordinary: a reply that looked like another differed from it
    unseen (the export's "identical replies make no pair" compares the stored text), and a run of them carried
    hidden data. A ZWJ or ZWNJ between two marks passed as ordinary and restarted the count of marks: 800 marks on
    one letter, none cut. Now they are markers, except one presentation selector on a symbol or a free variation
    selector on a Mongolian letter, and the marks after a joiner count on."""
    same = "We refund within 14 days."
    for char in ("\u034f", "\ufe00", "\ufe01", "\ufe0d", "\ufe0e", "\ufe0f", "\u180b", "\u180f", "\u17b4"):
        shown = handlers.text_html(same + char)
        assert f"⟨U+{ord(char):04X}⟩" in shown and char not in shown.split("</p>")[1], hex(ord(char))  # ⚠️ has U+FE0F
        assert "holds 1 hidden or direction character," in shown, hex(ord(char))
    shown = handlers.text_html(same + "\u034f\ufe00\ufe01\u180b")
    assert "holds 4 hidden or direction characters" in shown
    for text, char in [("a\ufe0fb", "\ufe0f"), ("\u2764\ufe0f\ufe0f", "\ufe0f"), ("\u2764\ufe00", "\ufe00"),
                       ("a\u180bb", "\u180b"), ("\u1820\u180b\u180b", "\u180b")]:
        shown = handlers.text_html(text)
        assert "holds 1 hidden or direction character," in shown and f"⟨U+{ord(char):04X}⟩" in shown, ascii(text)
    stacked = handlers.text_html("x" + "\u0301\u0302\u0303\u0304\u200d" * 200)
    assert "796 combining marks past 4 on one character are not shown" in stacked
    assert "holds 200 hidden or direction characters" in stacked  # every joiner between marks
    alternating = handlers.text_html("y" + "\u0301\u200c" * 300)
    assert "296 combining marks past 4 on one character are not shown" in alternating
    assert "holds 300 hidden or direction characters" in alternating


def test_combining_marks_past_four_on_one_character_are_cut_with_a_count():
    marks = "".join(chr(0x300 + i) for i in range(100))
    shown = handlers.text_html("x" + marks + " and y" + marks[:4] + " z")
    assert ("x" + marks[:4] + '<span class="align-hidden">⟨96 combining marks cut⟩</span> and y' + marks[:4] + " z"
            in shown)
    assert "⚠️ 96 combining marks past 4 on one character are not shown" in shown
    pointed = "\u05e9\u05bc\u05c1\u05b8\u05a3\u05dc\u05d5\u05b9\u05dd Vie\u0323\u0302t"  # Hebrew with 4 marks on one letter, decomposed Vietnamese: whole
    assert "align-warn" not in handlers.text_html(pointed) and pointed in handlers.text_html(pointed)



def test_a_reply_cut_at_the_length_limit_is_marked_where_it_is_shown(store):
    """align sample's `finished` false (cut at max_new_tokens) reaches the page, in the annotator's order."""
    store.add_tasks("round-0", [{"prompt": "Where is Sync?", "responses": ["Open Settings and", "Settings > Sync.",
                                                                         "It is in"],
                                 "response_meta": [{"finished": False}, {"finished": True}, {}]}], source={})
    task = handlers.next_task(store, session(store, "alice"))
    assert task["cut_off"] == [task["responses"][i] == "Open Settings and" for i in range(3)]  # unknown: not marked
    assert "cut off at the length limit" in handlers.text_html("Open Settings and", cut_off=True)
    assert "cut off" not in handlers.text_html("Settings > Sync.")

def test_sessions_expire_close_and_keep_only_a_hash(store):
    alice = session(store, "alice")
    token = store.open_session(alice["annotator_id"], ttl=3600)
    assert store.session(token)["name"] == "alice" and store.session(token + "x") is None
    from sqlalchemy import text

    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT token_sha256 FROM sessions")).scalar_one()
    assert token not in stored
    store.close_session(token)
    assert store.session(token) is None
    old = store.open_session(alice["annotator_id"], ttl=-1)  # already expired
    assert store.session(old) is None
    store.open_session(alice["annotator_id"], ttl=60)  # purges the expired one
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sessions")).scalar_one() == 1
    assert store.secret() == Store(store.url).secret() and len(store.secret()) == 32  # one key per store


def ranked_before_migrating(store) -> tuple[int, dict]:
    """A ranking, a draft and a gold answer in `store` (of make_tasks' 3 tasks or more): what a migration must keep."""
    alice = session(store, "alice")
    first = handlers.next_task(store, alice, overlap=1)
    handlers.submit(store, alice, first["task_id"], [1, 2, 3, 4])
    second = handlers.next_task(store, alice, overlap=1)
    store.save_ranking(alice["annotator_id"], second["task_id"], [2, 1, 4, 3], status="draft")
    gold = next(t["task_id"] for t in store.batch_tasks("round-0") if t["task_id"] not in (first["task_id"],
                                                                                         second["task_id"]))
    store.add_gold(gold, [4, 3, 2, 1])
    kept = {"rankings": store.submitted_rankings(), "gold": store.gold_answers(),
            "draft": (alice["annotator_id"], second["task_id"], [2, 1, 4, 3])}
    return alice["annotator_id"], kept


def still_there(store, kept: dict) -> None:
    annotator, task, ranks = kept["draft"]
    assert store.submitted_rankings() == kept["rankings"] and len(kept["rankings"]) == 1
    assert store.gold_answers() == kept["gold"] and store.draft(annotator, task) == ranks


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    from sqlalchemy import text

    old = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    make_tasks(old, 3)
    _, kept = ranked_before_migrating(old)
    with old.engine.begin() as conn:  # what a store made by the previous align looks like
        conn.execute(text("DROP TABLE sessions"))
        conn.execute(text("DROP TABLE sign_in_failures"))
        conn.execute(text("UPDATE align_meta SET value = '1' WHERE key = 'schema_version'"))
    again = Store(old.url)
    assert again.schema_version == SCHEMA_VERSION == 3 and len(again.batch_tasks("round-0")) == 3
    still_there(again, kept)  # every ranking, draft and gold answer of the old store
    alice = handlers.sign_in(again, "alice", "secret-pw")
    assert again.session(again.open_session(alice["annotator_id"], 60))["name"] == "alice"


def test_the_queue_hands_out_higher_priority_first_then_older(store):
    """align sample selection=uncertainty writes priorities; the app's queue (assign) follows them."""
    store.add_tasks("round-1", [{"prompt": f"Ticket {i}", "responses": ["a", "b"], "priority": p}
                                for i, p in enumerate([0.1, 0.7, 0.0, 0.7, 0.3])])
    ids = [t["task_id"] for t in store.batch_tasks("round-1")]
    assert [t["priority"] for t in store.batch_tasks("round-1")] == [0.1, 0.7, 0.0, 0.7, 0.3]
    alice, bob = session(store, "alice"), session(store, "bob")
    order = []
    while (task := handlers.next_task(store, alice)) is not None:
        order.append(task["task_id"])
        handlers.submit(store, alice, task["task_id"], list(range(1, 3)))
    assert order == [ids[1], ids[3], ids[4], ids[0], ids[2]]  # 0.7 (older first), 0.7, 0.3, 0.1, 0.0
    # With overlap 2, every task gets its first ranking before any gets a second: bob's first task
    # is the top priority among those alice has not held (all ranked once by her: same level).
    assert handlers.next_task(store, bob, overlap=2)["task_id"] == ids[1]
    with pytest.raises(ValueError, match="'priority' must be a finite number"):
        store.add_tasks("round-1", [{"prompt": "Ticket nan", "responses": ["a", "b"], "priority": float("nan")}])
    assert len(store.batch_tasks("round-1")) == 5  # the refused call added nothing


def test_a_version_2_store_gains_the_priority_column_in_place(store):
    """A store made by the previous align (schema 2: tasks without priority) opens, migrates, keeps its rows."""
    from sqlalchemy import inspect, text

    ids = make_tasks(store, 3)
    _, kept = ranked_before_migrating(store)
    with store.engine.begin() as conn:  # what a version-2 store's tasks table looks like
        conn.execute(text("ALTER TABLE tasks DROP COLUMN priority"))
        conn.execute(text("UPDATE align_meta SET value = '2' WHERE key = 'schema_version'"))
    with store.engine.connect() as conn:
        assert "priority" not in {c["name"] for c in inspect(conn).get_columns("tasks")}
    store.engine.dispose()
    again = Store(store.url)
    assert again.schema_version == SCHEMA_VERSION == 3
    assert [t["priority"] for t in again.batch_tasks("round-0")] == [0.0, 0.0, 0.0]
    still_there(again, kept)
    again.add_tasks("round-0", [{"prompt": "urgent", "responses": ["a", "b"], "priority": 2.0}])
    bob = session(again, "bob")  # (alice's next task is the one she holds a draft of)
    first = handlers.next_task(again, bob)["task_id"]
    assert first not in ids and again.task(first)["prompt"] == "urgent"
    assert Store(store.url).schema_version == 3  # opening a migrated store again changes nothing


def test_reads_go_on_while_a_write_transaction_holds_the_lock(store):
    """Every page view reads the store (the session behind each request): a long write (an import, an
    assignment) must not stall them. On SQLite only writes take the write lock (BEGIN IMMEDIATE)."""
    from sqlalchemy import text

    task_id = make_tasks(store, 1)[0]
    token = store.open_session(session(store, "alice")["annotator_id"], ttl=600)
    seen = []
    with store.tx(lock=True) as conn:  # a writer, mid-transaction
        conn.execute(text("UPDATE tasks SET priority = 1"))
        reader = threading.Thread(target=lambda: seen.append((store.task(task_id)["prompt"], store.session(token))))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "a read waited for the writer"
    assert seen[0][0].startswith("Ticket 0") and seen[0][1]["name"] == "alice"


def test_a_lock_held_by_a_stuck_process_is_an_error_after_lock_wait_not_a_hang(store, monkeypatch):
    """A process stopped inside its locked transaction (assignment, sign-in counting) hung every other writer on
    PostgreSQL for ever, and every open of the store (its schema check took the lock): now both databases fail
    a writer after LOCK_WAIT, an open of a current store takes no lock, and PostgreSQL ends the stuck session
    after IDLE_IN_TRANSACTION, freeing the lock."""
    import time

    from sqlalchemy.exc import DBAPIError, OperationalError

    from align.labeling import store as store_module

    monkeypatch.setattr(store_module, "LOCK_WAIT", 1)
    monkeypatch.setattr(store_module, "IDLE_IN_TRANSACTION", 3)
    make_tasks(store, 1)
    alice = session(store, "alice")["annotator_id"]
    other = Store(store.url)  # another process, with the short waits
    stuck = Store(store.url).tx(lock=True)
    stuck.__enter__()  # and this one stopped inside its locked transaction
    try:
        start = time.monotonic()
        assert [u["name"] for u in Store(store.url).users()] == ["alice"]  # opened and read: no wait
        assert time.monotonic() - start < 1
        with pytest.raises(OperationalError, match="lock"):  # SQLite: database is locked; PG: lock timeout
            other.assign(alice)
        assert 0.9 < time.monotonic() - start < 10
        if other.is_postgres:
            with other.engine.connect() as conn:  # the URL's own options (this test's schema) are kept
                assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "1s"
                assert conn.exec_driver_sql("SHOW search_path").scalar() in store.url
            time.sleep(4)  # the server ends the idle session, and its lock with it
            assert other.assign(alice) == 1
    finally:
        try:
            stuck.__exit__(None, None, None)
        except DBAPIError:  # its session was ended for it
            assert other.is_postgres
    assert other.assign(alice) == 1


def test_postgresql_gets_its_timeouts_in_each_transaction_never_as_startup_options(store):
    """lock_timeout and idle_in_transaction_session_timeout went as the startup parameter `options` on every
    connection, which PgBouncer before 1.20 refuses ("unsupported startup parameter: options"): a store behind it
    could not connect. They are set in each transaction now; the URL's own options go to the server as given,
    and a setting in them is the user's."""
    from sqlalchemy import event

    if not store.is_postgres:
        pytest.skip("PostgreSQL only")
    sent = []
    event.listen(store.engine, "do_connect", lambda _dialect, _record, _args, params: sent.append(dict(params)))
    store.engine.dispose()
    with store.tx() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "30s"
        assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "1min"
    raw = store.engine.raw_connection()  # the same server connection, in a transaction that is not align's
    try:  # SET LOCAL ended with align's: a pooler's next client on this server connection gets the defaults
        cur = raw.cursor()
        cur.execute("SHOW lock_timeout")
        assert cur.fetchone()[0] == "0"
    finally:
        raw.close()
    assert len(sent) == 1
    assert sent[0]["options"] == make_url(store.url).query["options"]  # the test's search_path only
    assert sent[0]["connect_timeout"] == 10 and sent[0]["keepalives"] == 1  # libpq's own, sent to no server
    theirs = Store(f"{store.url}%20-c%20lock_timeout%3D5s")
    with theirs.engine.connect() as conn:  # a read's transaction too
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "5s"
        assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "1min"
    theirs.engine.dispose()


def test_a_timeout_the_user_sets_in_options_is_theirs_however_it_is_written(monkeypatch):
    """The server reads `-clock_timeout=5s`, `--lock-timeout=5s`, `-c Lock_Timeout=5s`, `-ec lock_timeout=5s` and
    `-c lock\\_timeout=5s` as lock_timeout too; align set its own after them (SET LOCAL wins), overriding the
    user's. A value naming the setting is not one."""
    from align.labeling.store import _pg_server_timeouts

    monkeypatch.delenv("PGOPTIONS", raising=False)
    ours = {"lock_timeout", "idle_in_transaction_session_timeout"}

    def left(options: str | None = None, env: str | None = None) -> set[str]:
        if env is not None:
            monkeypatch.setenv("PGOPTIONS", env)
        query = {} if options is None else {"options": options}
        return set(_pg_server_timeouts(make_url("postgresql://u@db/labels").set(query=query)))

    assert left() == ours
    for given in ("-c lock_timeout=5s", "-clock_timeout=5s", "--lock-timeout=5s", "-c Lock_Timeout=5s",
                  "-c search_path=s1   -c   LOCK-TIMEOUT=5s", "-csearch_path=s1 -clock_timeout=5s"):
        assert left(given) == {"idle_in_transaction_session_timeout"}, given
    # split as the server splits (a backslash escapes the next character, itself included), flags bundled
    for given in ("-c application_name=a\\\\ -c lock_timeout=7s", "-c lock\\_timeout=7s", "-ec lock_timeout=7s",
                  "-c application_name=a\\ b -c lock_timeout=7s"):
        assert left(given) == {"idle_in_transaction_session_timeout"}, given
    assert left("-c application_name=a\\ -c\\ lock_timeout=7s") == ours  # one value: "a -c lock_timeout=7s"
    assert left("-c idle_in_transaction_session_timeout=0 --lock_timeout=0") == set()
    assert left("-c application_name=lock_timeout=1 -c search_path=x_lock_timeout") == ours
    assert left(env="-cLOCK_TIMEOUT=2s") == {"idle_in_transaction_session_timeout"}



def test_a_connect_timeout_the_user_sets_in_the_url_or_environment_is_theirs(monkeypatch):
    """align's connect_args go over the URL's query, and libpq reads PGCONNECT_TIMEOUT only where no
    connect_timeout is passed: align's 10 s would override either. A keepalive the URL sets is kept too."""
    from align.labeling.store import CONNECT_TIMEOUT, _pg_client_timeouts

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    url = make_url("postgresql://u@db/labels")
    assert _pg_client_timeouts(url)["connect_timeout"] == CONNECT_TIMEOUT
    theirs = _pg_client_timeouts(url.set(query={"connect_timeout": "45", "keepalives_idle": "5"}))
    assert "connect_timeout" not in theirs and "keepalives_idle" not in theirs and theirs["keepalives"] == 1
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "40")
    assert "connect_timeout" not in _pg_client_timeouts(url) and _pg_client_timeouts(url)["keepalives"] == 1

@pytest.mark.skipif(not os.path.exists("/usr/sbin/pgbouncer"), reason="needs PgBouncer (apt-get install pgbouncer)")
def test_a_store_behind_pgbouncer_connects_and_its_lock_wait_holds(store, monkeypatch):
    """PgBouncer 1.18 in transaction pooling, in front of the test server: the store could not even open
    (PgBouncer refused the startup `options` align sent); it opens, writes, and a writer behind a stuck
    transaction still fails after LOCK_WAIT. Two clients' many writes go through (psycopg's prepared statements
    collided on the shared server connection at the sixth)."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from align.labeling import store as store_module

    if not store.is_postgres:
        pytest.skip("PostgreSQL only")
    server = make_url(store.url)
    database = f"test_pgb_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    admin = create_engine(server.set(drivername="postgresql+psycopg", query={}), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    folder = tempfile.mkdtemp(prefix="align-pgbouncer-")  # readable by the `postgres` user it runs as under root
    os.chmod(folder, 0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(f"{folder}/users.txt", "w") as f:
        f.write(f'"{server.username}" ""\n')
    with open(f"{folder}/pgbouncer.ini", "w") as f:
        f.write(f"[databases]\n{database} = host={server.host} port={server.port} dbname={database}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n"
                f"auth_file = {folder}/users.txt\npool_mode = transaction\n")
    as_user = ["-u", "postgres"] if os.geteuid() == 0 else []  # PgBouncer refuses to run as root
    bouncer = subprocess.Popen(["/usr/sbin/pgbouncer", *as_user, f"{folder}/pgbouncer.ini"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stores = []
    try:
        url = f"postgresql://{server.username}@127.0.0.1:{port}/{database}"
        for _ in range(50):  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        monkeypatch.setattr(store_module, "LOCK_WAIT", 1)
        behind = Store(url)  # refused before: "unsupported startup parameter: options"
        stores.append(behind)
        make_tasks(behind, 1)
        alice = session(behind, "alice")["annotator_id"]
        stuck = behind.tx(lock=True)
        stuck.__enter__()
        try:
            other = Store(url)
            stores.append(other)
            start = time.monotonic()
            with pytest.raises(OperationalError, match="lock"):
                other.assign(alice)
            assert time.monotonic() - start < 10
        finally:
            stuck.__exit__(None, None, None)
        assert other.assign(alice) == 1
        # Many of the same statements from two clients: psycopg prepared one on the server after 5 runs, and in
        # transaction pooling the next transaction may be on a server connection without it, or with the other
        # client's of the same name (DuplicatePreparedStatement "_pg3_1" on the 6th assignment, before)
        for _ in range(12):
            for s in stores:
                assert s.assign(alice) == 1
        for s in stores:
            assert [u["name"] for u in s.users()] == ["alice"]
    finally:
        for s in stores:
            s.engine.dispose()
        bouncer.terminate()
        log = bouncer.communicate(timeout=30)[0].decode(errors="replace")
        shutil.rmtree(folder, ignore_errors=True)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}"')
        admin.dispose()
    assert "unsupported startup parameter" not in log


def test_text_postgresql_refuses_is_kept_or_refused_with_a_reason(store):
    """A NUL in a pasted rationale or a model's answer, a name longer than its column: the same on both
    databases, never a raw database error that loses the ranking."""
    store.add_tasks("round-0", [{"prompt": "How do I\x00 sync?", "responses": ["Open\x00 Settings.", "b"]}], source={})
    alice = session(store, "alice")
    task = handlers.next_task(store, alice)
    assert task["prompt"] == "How do I\ufffd sync?" and "Open\ufffd Settings." in task["responses"]
    handlers.save_draft(store, alice, task["task_id"], [1, None], rationale="pasted\x00")
    assert handlers.submit(store, alice, task["task_id"], [1, 2], rationale="pasted\x00 text")["created"]
    assert store.submitted_rankings()[0]["rationale"] == "pasted\ufffd text"
    with pytest.raises(ValueError, match="at most 100 characters"):
        store.add_user("b" * 101, "secret-pw")
    with pytest.raises(ValueError, match="no control characters"):
        store.add_user("bo\x00b", "secret-pw")
    with pytest.raises(ValueError, match="batch: a name of 1 to 200 characters"):
        store.add_tasks("r" * 201, [{"prompt": "p", "responses": ["a", "b"]}], source={})


def test_a_simulated_annotator_gives_an_ab_task_a_verdict(store):
    """align eval human=true puts A/B tasks in the store; a simulated annotator meets them in its queue and
    answers with a verdict, as a person's click does (it stopped there, on every rerun)."""
    from align.labeling.simulate import simulate

    make_tasks(store, 2)
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "Which reply?", "responses": ["no.", "Thanks! Open Settings."]},
                                        {"prompt": "And this?", "responses": ["same", "same"]}], kind="pairwise")
    assert simulate(store, "support_style") == 4
    ab = {r["prompt"]: r["ranks"] for r in store.submitted_rankings() if r["kind"] == "pairwise"}
    assert ab == {"Which reply?": [2, 1], "And this?": [1, 1]}  # B better; a tie


def test_the_admins_rates_are_per_hour_of_time_on_task(store):
    """Rankings per hour from the seconds each took (breaks are not work; one ranking is not 60 an hour), with
    an unknown time (0: the app restarted while the task was open) in neither the rate nor the mean."""
    make_tasks(store, 5)
    alice, bob = session(store, "alice"), session(store, "bob")
    for seconds in (60.0, 90.0, 30.0, 0.0):
        handlers.submit(store, alice, handlers.next_task(store, alice)["task_id"], [1, 2, 3, 4], seconds=seconds)
    handlers.submit(store, bob, handlers.next_task(store, bob)["task_id"], [1, 2, 3, 4], seconds=20.0)
    people = {p["name"]: p for p in store.annotator_activity()}
    assert people["alice"]["done"] == 4 and people["alice"]["per_hour"] == 60.0 and people["alice"]["mean_seconds"] == 60.0
    assert people["bob"]["per_hour"] is None and people["bob"]["mean_seconds"] == 20.0  # one timed ranking: no rate


def test_the_playground_is_open_to_annotators_only_while_no_blind_ab_task_waits(store):
    """handlers.playground_open: an admin always; an annotator once every A/B task (align eval human=true) has its
    `overlap` verdicts and none is gold (a gold task is handed out again and again). Ranking tasks do not count."""
    alice, bob, boss = session(store, "alice"), session(store, "bob"), session(store, "boss", admin=True)
    store.add_tasks("round-0", [{"prompt": "p", "responses": ["a", "b", "c", "d"]}])
    assert handlers.playground_open(store, alice, overlap=2)
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "q", "responses": ["x", "y"]}], kind="pairwise")
    assert not handlers.playground_open(store, alice, overlap=2) and handlers.playground_open(store, boss, overlap=2)
    for person in (alice, bob):
        task = handlers.next_task(store, person, overlap=2)
        while task["kind"] != "pairwise":
            handlers.skip(store, person, task["task_id"])
            task = handlers.next_task(store, person, overlap=2)
        handlers.submit(store, person, task["task_id"], verdict="tie")
        assert handlers.playground_open(store, alice, overlap=2) is (person is bob)
    assert handlers.playground_open(store, alice, overlap=1)
    with pytest.raises(ValueError, match="an A/B task of align eval human=true cannot be gold"):
        store.add_gold(store.submitted_rankings()[0]["task_id"], [1, 2])  # once closed the Playground for good
    assert handlers.playground_open(store, alice, overlap=1)
    with pytest.raises(handlers.AuthError):
        handlers.playground_open(store, None)


def test_a_discarded_ranking_frees_its_tasks_slot(store):
    """Store.discard (what the unreadable-row message advises) set the ranking aside but left the assignment
    submitted: the task held its slot, nobody could be given it, while pending_count counted it pending, so
    `align pipeline label=human` waited for ever. Now the slot is free: pending, given out, and ranked again."""
    (task_id,) = make_tasks(store, 1, k=2)
    ann, bob = session(store, "ann"), session(store, "bob")
    first = handlers.next_task(store, ann)
    handlers.submit(store, ann, task_id, [1, 2], order_tag=first["order_tag"])
    store.discard(task_id, ann["annotator_id"])
    assert store.pending_count("round-0") == 1 and store.submitted_rankings() == []
    assert store.progress(ann["annotator_id"])["done"] == 0
    again = handlers.next_task(store, bob)
    assert again is not None and again["task_id"] == task_id
    handlers.submit(store, bob, task_id, [2, 1], order_tag=again["order_tag"])
    assert store.pending_count("round-0") == 0 and [r["annotator"] for r in store.submitted_rankings()] == ["bob"]
    # at overlap 2 it comes back to ann too, with nothing of the discarded ranking in her new draft
    back = handlers.next_task(store, ann, overlap=2)
    assert back["task_id"] == task_id and back["draft"] is None
    handlers.save_draft(store, ann, task_id, [1, 0], order_tag=back["order_tag"])
    assert store.draft(ann["annotator_id"], task_id).count(0) == 1


def test_the_small_messages_say_what_to_do():
    """An empty or blank reply drew a blank card; an A/B task submitted with no verdict said "choose one of: ...
    (got None)"; a ranking with a rank missing did not say which response was left."""
    for blank in ("", "  \n\t "):
        shown = handlers.text_html(blank)
        assert '<span class="align-cut">(empty response)</span></div>' in shown, shown
        assert html.unescape(re.sub("<[^>]+>", "", shown)).startswith(blank)  # what is stored, then the words
    assert "(empty response)" not in handlers.text_html("ok") and "empty" not in handlers.text_html("<b></b>")


def test_a_submit_without_a_verdict_or_a_rank_names_what_is_missing(store):
    store.add_tasks("eval-ab", [{"prompt": "Which reply?", "responses": ["first", "second"]}], kind="pairwise")
    make_tasks(store, 1, k=6)
    alice = session(store, "alice")
    ab = handlers.next_task(store, alice)
    for missing in (None, ""):
        with pytest.raises(ValueError, match=r"^choose A better, B better, Tie or Both bad$"):
            handlers.submit(store, alice, ab["task_id"], verdict=missing)
    handlers.submit(store, alice, ab["task_id"], verdict="tie")
    task = handlers.next_task(store, alice)
    with pytest.raises(ValueError, match=r"rank C and F too \(1 = best"):
        handlers.submit(store, alice, task["task_id"], [1, 2, None, 3, 4, "", None, None])
    with pytest.raises(ValueError, match=r"rank A, B and E too"):
        handlers.submit(store, alice, task["task_id"], [None, None, 1, 2, None, 3])
    with pytest.raises(ValueError, match=r": rank D too"):
        handlers.submit(store, alice, task["task_id"], [1, 2, 3, None, 4, 5])
    with pytest.raises(ValueError, match=r"^give every response a rank \(1 = best; equal ranks are ties\)$"):
        handlers.submit(store, alice, task["task_id"], [None] * 8)  # none set: no list of every letter


def test_a_sqlite_store_is_backed_up_before_its_schema_is_migrated(tmp_path, caplog):
    """The in-place migration ran silently with no copy of the store as it was; a copy of labels.db taken while the
    app ran missed what WAL still held. Now the store is backed up first with SQLite's backup API, writes still
    in the -wal file included, to labels.db.v<old version>.bak, and the log says where."""
    import logging
    import sqlite3

    from sqlalchemy import text

    old = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    make_tasks(old, 3)
    _, kept = ranked_before_migrating(old)
    with old.engine.begin() as conn:  # a version-1 store, its last writes still in labels.db-wal (old stays open)
        conn.execute(text("DROP TABLE sessions"))
        conn.execute(text("DROP TABLE sign_in_failures"))
        conn.execute(text("UPDATE align_meta SET value = '1' WHERE key = 'schema_version'"))
    assert (tmp_path / "labels.db-wal").stat().st_size > 0
    caplog.set_level(logging.WARNING, logger="align.labeling.store")
    again = Store(old.url)
    assert again.schema_version == SCHEMA_VERSION
    backup = tmp_path / "labels.db.v1.bak"
    said = [r.getMessage() for r in caplog.records if "backed up" in r.getMessage()]
    assert len(said) == 1 and str(backup) in said[0] and "version 1" in said[0], said
    copy = sqlite3.connect(backup)
    try:  # the store as it was: version 1, without the tables version 2 added, with every ranking
        assert copy.execute("SELECT value FROM align_meta WHERE key = 'schema_version'").fetchone() == ("1",)
        tables = {r[0] for r in copy.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "sessions" not in tables and "rankings" in tables
        assert copy.execute("SELECT count(*) FROM rankings WHERE status = 'submitted'").fetchone() == \
            (len(kept["rankings"]),)
    finally:
        copy.close()
    still_there(again, kept)
    Store(old.url)  # at this version: no second backup
    assert sorted(p.name for p in tmp_path.glob("labels.db.v*")) == ["labels.db.v1.bak"]
    assert backup.stat().st_mode & 0o777 == 0o600  # a copy of the secret and the password hashes: the owner's


def test_a_new_sqlite_store_is_readable_by_its_owner_only(tmp_path):
    """labels.db holds the secret that keys the shuffles and the gold draw, password hashes and every ranking; made
    under a umask of 022 it (and its -wal and -shm files) was readable by every user of the machine. An existing
    file keeps the mode it has."""
    old_umask = os.umask(0o022)
    try:
        store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
        make_tasks(store, 1)
        for name in ("labels.db", "labels.db-wal", "labels.db-shm"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        (tmp_path / "team.db").touch(mode=0o660)
        os.chmod(tmp_path / "team.db", 0o660)
        make_tasks(Store(f"sqlite:///{tmp_path / 'team.db'}"), 1)
        assert (tmp_path / "team.db").stat().st_mode & 0o777 == 0o660
    finally:
        os.umask(old_umask)
