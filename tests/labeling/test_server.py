"""The labelling app's web server (align/labeling/server.py) over real HTTP, without a browser: what a hostile
signed-in client or another site's page can send, and what the server answers.

    python -m pytest tests/labeling/test_server.py -q
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from gradio_queue import fn_index, queued

PASSWORD = "correct horse"
JSON = {"content-type": "application/json"}


@contextmanager
def served(store, **kwargs) -> Iterator[str]:
    """The real web app on `store` with an admin `boss` and annotators `alice`, `bob`, `carol`; yields its URL."""
    from align.labeling.server import create_app, running

    store.add_user("boss", PASSWORD, admin=True)
    for name in ("alice", "bob", "carol"):
        store.add_user(name, PASSWORD)
    with running(create_app(store, **kwargs)) as url:
        yield url


def signed_in(url: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/login", data={"name": name, "password": PASSWORD}).status_code == 303
    return client


def call(client: httpx.Client, session_hash: str, api_name: str = "do_refresh"):
    """A call of the page's as its page session `session_hash`, through the queue as the page makes it (do_refresh:
    the admin tab's, refused to others)."""
    return queued(client, api_name, [], session_hash)


def raw(client: httpx.Client, session_hash: str, path: str) -> httpx.Response:
    """A bare body naming `session_hash` to one of Gradio's page-state routes (no event stream read)."""
    return client.post(path, json={"data": [], "session_hash": session_hash})


def test_a_session_hash_is_checked_in_any_body_gradio_would_read(store):
    """A body with whitespace before its JSON, or naming the hash twice, is read by Gradio all the same: it
    used to skip the check (the check read only bodies starting with "{"), so another account drove the
    victim's page session. A body Gradio could not read either is refused."""
    with served(store) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        assert call(alice, "alices-page").status_code == 200
        theirs = {"data": [], "session_hash": "alices-page"}
        for body in (" " + json.dumps(theirs), "\r\n\t" + json.dumps(theirs) + "\n",
                     '{"session_hash": "bobs-page", "data": [], "session_hash": "alices-page"}'):
            for path in ("/gradio_api/queue/join", "/gradio_api/cancel"):
                for headers in (JSON, {"content-type": "text/plain"}):
                    answer = bob.post(path, content=body, headers=headers)
                    assert answer.status_code == 403 and "another account" in answer.text, (body, path)
        assert bob.get("/gradio_api/queue/data?session_hash=bobs-page&session_hash=alices-page").status_code == 403
        for body in (b"", b"{", b"data=1&session_hash=alices-page", b"\xff{}", b"[" * 100_000):
            for path in ("/gradio_api/queue/join", "/gradio_api/cancel"):
                answer = bob.post(path, content=body, headers=JSON)
                assert answer.status_code == 400 and "not JSON" in answer.text, (body[:20], path)
        # a handler is run through the queue only: a direct call is no route, whoever's hash it names
        assert bob.post("/gradio_api/run/do_refresh", json={"data": [], "session_hash": "bobs-page"}).status_code == 404
        assert call(alice, "alices-page").status_code == 200  # hers still


def test_no_account_can_push_another_accounts_session_hash_out(store, monkeypatch):
    """Owners used to be one list of 100,000 hashes, oldest dropped first, and any URL naming a new hash (even
    /robots.txt?session_hash=...) added one: an account could flush the list and take over another's page
    session. Now only Gradio's page-state routes record a hash, and an account past its cap forgets its own
    oldest."""
    from align.labeling import server

    monkeypatch.setattr(server, "HASHES_PER_ACCOUNT", 5)
    with served(store) as url:
        alice, bob, carol = signed_in(url, "alice"), signed_in(url, "bob"), signed_in(url, "carol")
        assert call(alice, "alices-page").status_code == 200
        for i in range(20):  # URLs that do not touch page state record nothing
            assert bob.get(f"/robots.txt?session_hash=junk{i}").status_code == 200
        assert call(carol, "junk0").status_code == 200  # not bob's: no one owned it
        for i in range(20):  # four times bob's cap of hashes
            assert call(bob, f"bobs-page-{i}").status_code == 200
        assert call(bob, "alices-page").status_code == 403  # refused at queue/join
        for path in ("/gradio_api/queue/join", "/gradio_api/cancel"):
            assert raw(bob, "alices-page", path).status_code == 403
        assert bob.get("/gradio_api/queue/data", params={"session_hash": "alices-page"}).status_code == 403
        assert call(alice, "alices-page").status_code == 200
        assert call(bob, "bobs-page-19").status_code == 200 and call(alice, "bobs-page-19").status_code == 403
        assert call(alice, "bobs-page-0").status_code == 200  # bob's oldest, forgotten by bob's own newer ones


def test_a_page_state_request_without_a_session_hash_is_refused_and_the_queue_keeps_running(store):
    """A join naming the session hash "" was let through uncounted and unowned; Gradio filed its event under a
    fresh key while its messages waited under "", and its first queue broadcast raised: the queue stopped for
    every account ("Queue is stopped.") after 12 such joins by one annotator. Each page-state request names a
    hash of the page's kind now (a null, a number, "", one too long or of other characters: 400)."""
    with served(store) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        index = fn_index(alice, "do_refresh")
        for hash_ in ("", None, 7, "a" * 65, "x y", "../x", ["a"]):
            body = {"data": [], "fn_index": index, "session_hash": hash_, "event_data": None, "trigger_id": None}
            for _ in range(2 if hash_ == "" else 1):
                answer = alice.post("/gradio_api/queue/join", json=body)
                assert answer.status_code == 400 and "session_hash" in answer.text, (hash_, answer.text)
            assert alice.post("/gradio_api/cancel", json={"event_id": "e", "session_hash": hash_}).status_code == 400
        answer = alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": index})  # none at all
        assert answer.status_code == 400
        assert alice.get("/gradio_api/queue/data").status_code == 400
        assert alice.get("/gradio_api/queue/data", params={"session_hash": ""}).status_code == 400
        for _ in range(12):
            alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": index, "session_hash": "",
                                                      "event_data": None, "trigger_id": None})
        assert call(bob, "bobs-page").status_code == 200  # the queue runs on, for every account
        assert call(alice, "alices-page").status_code == 200


def test_a_deep_link_is_never_served(store, tmp_path):
    """Gradio draws a page from <its temp folder>/deep_links/<name>/state.json when the URL asks for it, a folder
    every Gradio process on the machine shares: a file planted there replaced the page and its script ran, as
    the annotator who opened the link. Any request naming a deep link is refused."""
    with served(store) as url:
        alice = signed_in(url, "alice")
        for path in ("/", "/config", "/gradio_api/info"):
            answer = alice.get(path, params={"deep_link": "planted"})
            assert answer.status_code == 400 and "deep link" in answer.text, path
        assert alice.get("/config").status_code == 200


def test_one_account_flooding_the_queue_is_refused_not_everyone_else(store, monkeypatch):
    """Gradio's queue is one line for every account, with no limit: 1,500 joins from one signed-in annotator in 7 s
    held another annotator's submit for 53 s. Now an account with MAX_PENDING calls queued or running is refused
    at once (429), before Gradio queues anything, another account's calls go through, and once its calls have
    run the account may call again. (Her calls are held until the test lets them go.)"""
    from align.labeling import handlers, server

    release = threading.Event()

    def slow(store, session, *args, **kwargs):
        if session and session.get("name") == "alice":  # hers wait while the test sends the rest
            release.wait(60)
        raise PermissionError("admins only")

    monkeypatch.setattr(handlers, "admin_stats", slow)
    monkeypatch.setattr(server, "MAX_PENDING", 5)
    with served(store) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        index = fn_index(alice, "do_refresh")
        flood = [alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": index, "session_hash": f"page-{i % 3}",
                                                           "event_data": None, "trigger_id": None})
                 for i in range(12)]
        codes = [r.status_code for r in flood]
        assert codes[:5] == [200] * 5 and codes.count(429) >= 5, codes  # her pages' calls counted together
        refused = next(r for r in flood if r.status_code == 429)
        assert "too many calls from this account at once (5 waiting or running)" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        # page-state requests naming new hashes (a heartbeat's GET records one) push her old hashes out of the
        # session-hash map: her waiting calls still count
        monkeypatch.setattr(server, "HASHES_PER_ACCOUNT", 3)
        for i in range(6):
            raw(alice, f"fresh-{i}", "/gradio_api/cancel")
        assert alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": index, "session_hash": "fresh-9",
                                                          "event_data": None, "trigger_id": None}).status_code == 429
        started = time.monotonic()
        assert call(bob, "bobs-page").status_code == 200  # another account's call runs meanwhile
        assert time.monotonic() - started < 8  # beside hers (8 run at once), not after them
        release.set()
        deadline = time.monotonic() + 30  # her calls run, and then she may call again
        while (answer := call(alice, "page-0")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 200


def test_only_this_servers_own_pages_can_sign_a_browser_in_or_out(store):
    """Login CSRF: the sign-in was refused only when Sec-Fetch-Site said "cross-site", so a form on another port
    of the same host ("same-site"), or one whose browser sent no such header, signed the annotator's browser in as
    the attacker's account. Now a form counts only from this server's own origin; a client that sends neither
    Sec-Fetch-Site nor Origin nor Referer (curl, this test) is no browser's cross-origin form."""
    with served(store) as url:
        form = {"name": "bob", "password": PASSWORD}
        other_port = url.rsplit(":", 1)[0] + ":9999"
        refused = [{"sec-fetch-site": "same-site"}, {"sec-fetch-site": "cross-site"},
                   {"sec-fetch-site": "same-site", "origin": url}, {"origin": other_port}, {"origin": "null"},
                   {"origin": url.replace("http:", "https:")}, {"origin": "http://evil.example"},
                   {"referer": f"{other_port}/"}, {"origin": other_port, "referer": f"{url}/login"}]
        accepted = [{"sec-fetch-site": "same-origin", "origin": "null"}, {"sec-fetch-site": "none"},
                    {"origin": url}, {"referer": f"{url}/login"}, {}]
        for headers in refused:
            answer = httpx.post(f"{url}/login", data=form, headers=headers)
            assert answer.status_code == 403 and "set-cookie" not in answer.headers, headers
            assert "sign in and out on this server&#x27;s own pages" in answer.text
        for headers in accepted:
            answer = httpx.post(f"{url}/login", data=form, headers=headers)
            assert answer.status_code == 303 and "align_session=" in answer.headers["set-cookie"], headers

        alice = signed_in(url, "alice")
        for headers in refused:
            answer = alice.post("/logout", headers=headers)
            assert answer.status_code == 403 and "own pages" in answer.json()["detail"], headers
        assert alice.get("/gradio_api/info").status_code == 200  # still signed in
        assert alice.post("/logout", headers={"sec-fetch-site": "same-origin"}).status_code == 303
        assert alice.get("/gradio_api/info").status_code == 401

    from align.labeling.server import _origin

    assert _origin("https://labels.example.org") == _origin("HTTPS://Labels.Example.org:443/login")
    assert _origin("http://labels.example.org") != _origin("https://labels.example.org")
    assert _origin("null") is None and _origin("http://host:99999") is None


def test_an_annotators_config_holds_no_server_path(store, tmp_path):
    """The Admin tab is hidden from annotators, but its contents were in /config, which every signed-in page
    fetches: the server's absolute export path among them. Now the page load fills it in for admins only."""
    folder = str(tmp_path / "runs" / "secret-run" / "preferences")
    with served(store, export=lambda: {}, export_dir=folder) as url:
        alice, boss = signed_in(url, "alice"), signed_in(url, "boss")
        for client in (alice, boss):
            config = client.get("/config")
            assert config.status_code == 200 and "secret-run" not in config.text and str(tmp_path) not in config.text
        # the load call, as each page makes it: the path in the admin's answer only
        for client, shown in ((alice, False), (boss, True)):
            answer = queued(client, "do_load", [], f"{shown}-page")
            assert answer.status_code == 200 and ("secret-run" in answer.text) is shown, answer.text[:300]


def test_the_pages_reconnect_poll_is_answered_to_a_signed_in_page_only(store):
    """Gradio's page polls /gradio_api/app_id after a call failed in transit, and reloads once it answers: the
    server answered 404, and the page stayed dead. It answers a signed-in client the app's id (which /config
    holds too), and nothing else; a client without a session gets 401."""
    with served(store) as url:
        alice = signed_in(url, "alice")
        for path in ("/gradio_api/app_id", "/gradio_api/app_id/"):
            answer = alice.get(path)
            assert answer.status_code == 200 and list(answer.json()) == ["app_id"], path
            assert answer.json()["app_id"] == alice.get("/config").json()["app_id"]
            assert httpx.get(url + path).status_code == 401


def test_a_page_drawn_for_one_account_refuses_to_rank_as_another(store):
    """The cookie is the browser's: once another tab of it signs in as bob, alice's open page makes bob's calls.
    The server's record of page sessions' owners refused those, but it is in memory: after a restart, alice's
    page submitted her ranks as bob's, mapped through bob's shuffle. Now the page carries the account it was
    drawn for, and submit, drafts and skip refuse another's cookie, saying whose page it is."""
    from align.labeling import handlers

    store.add_tasks("b", [{"prompt": "a prompt", "responses": ["one", "two", "three", "four"]}])
    with served(store, overlap=2) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        bob_id = handlers.sign_in(store, "bob", PASSWORD)["annotator_id"]
        pages = {}
        for name, client in (("alice", alice), ("bob", bob)):  # who, admin tab, folder, message, task, account,
            pages[name] = queued(client, "do_load", [], f"{name}s-page").json()["data"][4:7]  # the order's tag, ...
        (task, _, alice_tag), bobs_handle = pages["alice"], pages["bob"][0]
        assert [p[1] for p in pages.values()] == ["alice", "bob"]  # one task, both assigned it (named by a handle
        task_id = store.batch_tasks("b")[0]["task_id"]              # of each annotator's own: handlers.task_handle)
        assert store.assignment_status(bob_id, task_id) == "assigned"
        ranks = ["1", "2", "3", "4", *[None] * 4]
        refused = "this page was opened by alice; you are signed in as bob: reload to rank as bob"
        # bob's cookie on alice's page, as after a restart: a page session nobody owns any more
        for path, data in (("do_submit", [task, "alice", alice_tag, 0.0, *ranks, None, False, *[False] * 8, "mine", "", ""]),
                           ("do_draft", [task, "alice", alice_tag, *ranks, ranks[0], ""]), ("do_skip", [task, "alice"])):
            answer = queued(bob, path, data, "restarted")
            assert answer.status_code == 200 and refused in answer.text, (path, answer.text[:300])
        assert store.draft(bob_id, task_id) is None and store.assignment_status(bob_id, task_id) == "assigned"
        assert store.submitted_rankings() == []
        answer = queued(bob, "do_submit", [bobs_handle, "bob", pages["bob"][2], 0.0, *ranks, None, False, *[False] * 8, "", "", ""],
                        "bobs-page")  # bob's own page
        assert "Saved" in answer.text and [r["annotator"] for r in store.submitted_rankings()] == ["bob"]


def test_an_annotators_page_does_not_tell_gold_tasks_apart(store, monkeypatch):
    """The progress line said "task 30" and the hidden field held the id: ordinary tasks come in id order and gold
    ones from a fixed set, so alice saw task 1, task 30, task 31, task 2, ... and knew which to rank with care.
    Now the page shows her own counter and names each task by a handle of hers (handlers.task_handle): no task id
    anywhere in what the page is sent, and another account's page cannot use her handle."""
    from align.labeling import handlers

    # Gold turns are keyed with the store's secret: with a new one per run, alice's 12 tasks missed a gold one
    # about 1 run in 300 (fewer than 2 gold turns in 12 at 0.5). A fixed secret makes the draw the same every run.
    monkeypatch.setattr(store, "secret", lambda: b"server-test-key-0123456789abcdef")
    store.add_tasks("b", [{"prompt": f"p{i}", "responses": ["x", "y"]} for i in range(40)])
    gold = [t["task_id"] for t in store.batch_tasks("b")][29:31]
    for task_id in gold:
        store.add_gold(task_id, [1, 2])
    with served(store, gold_rate=0.5) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        her = handlers.sign_in(store, "alice", PASSWORD)
        out = queued(alice, "do_load", [], "page").json()["data"][4:]
        shown = []
        for n in range(12):
            handle, _, tag, _, progress = out[:5]
            assert re.fullmatch(r"[0-9a-f]{16}", handle) and not re.search(r"(?i)task \d", progress), (handle, progress)
            assert progress.startswith(f"**Progress:** {n} / {n + 1} done")
            shown.append(handlers.task_of(store, her, handle))
            if n == 0:
                theirs = queued(bob, "do_submit", [handle, "bob", tag, 0.0, "1", "2", *[None] * 6, None, False, *[False] * 8, "", "", ""],
                                "bobs-page")
                said = theirs.json()["data"][0]
                assert "this task is not assigned to you" in said and not re.search(r"\d", said), said
            answer = queued(alice, "do_submit", [handle, "alice", tag, 0.0, "1", "2", *[None] * 6, None, False, *[False] * 8, "", "", ""],
                            "page")
            assert "Saved" in answer.text
            out = answer.json()["data"][1:]
        assert set(gold) <= set(shown)  # the gold tasks came up, and nothing on the page said which they were
        boss = signed_in(url, "boss")  # an admin's page is held no task until asked (Skip), then shows its id
        admins = queued(boss, "do_skip", ["", "boss"], "boss-page").json()["data"][1:]
        boss_session = handlers.sign_in(store, "boss", PASSWORD)
        assert f" · task {handlers.task_of(store, boss_session, admins[0])} · " in admins[4], admins[4]
        # the same submit again: "already saved", whatever task the page shows by now
        assert "Already saved" in queued(alice, "do_submit", [handle, "alice", tag, 0.0, "1", "2", *[None] * 6, None,
                                                              False, *[False] * 8, "", "", ""], "page").text


def test_a_store_that_cannot_answer_is_said_in_plain_words_and_logged(store, monkeypatch, caplog):
    """SQLite's write lock held past its busy timeout by another process (or PostgreSQL gone): the handlers
    caught only the app's own errors, and the annotator read SQLAlchemy's text, "(sqlite3.OperationalError)
    database is locked [SQL: BEGIN IMMEDIATE] ...". Now the page says the store is busy or unreachable and what
    to do, and the detail goes to the server's log."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def locked(*args, **kwargs):
        raise OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))

    store.add_tasks("b", [{"prompt": "a prompt", "responses": ["one", "two", "three", "four"]}])
    with served(store) as url:
        alice = signed_in(url, "alice")
        task, _, tag = queued(alice, "do_load", [], "page").json()["data"][4:7]
        ranks = ["1", "2", "3", "4", *[None] * 4]
        submit = [task, "alice", tag, 0.0, *ranks, None, False, *[False] * 8, "", "", ""]
        for method in ("save_ranking", "skip", "assign"):
            monkeypatch.setattr(store, method, locked)
        not_saved = ("Not saved: the store is busy or unreachable. Your ranks are still on this page; "
                     "press Submit again in a moment.")
        for path, data, said in (("do_submit", submit, not_saved), ("do_draft", [task, "alice", tag, *ranks, ranks[0], ""], not_saved),
                                 ("do_skip", [task, "alice"], "Not skipped: the store is busy or unreachable"),
                                 ("do_load", [], "no task could be fetched: reload the page in a moment")):
            answer = queued(alice, path, data, "page")
            assert answer.status_code == 200 and said in answer.text, (path, answer.text[:300])
            assert not re.search(r"(?i)sqlite|SQL:|OperationalError|locked", answer.text), (path, answer.text[:300])
        logged = [r.getMessage() for r in caplog.records if r.exc_info and "database is locked" in str(r.exc_info[1])]
        assert len(logged) == 4 and all("the store failed" in m for m in logged)
        monkeypatch.undo()
        answer = queued(alice, "do_submit", submit, "page")
        assert "Saved" in answer.text and len(store.submitted_rankings()) == 1


def test_the_admin_tab_says_a_failed_store_in_plain_words(store, monkeypatch, caplog):
    """The admin tab's refresh and export caught only refusals: a store that failed under them (SQLite's lock
    held, PostgreSQL gone) showed a bare "Error" where the annotators' calls say what happened."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from align.labeling import handlers

    def locked(*args, **kwargs):
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))

    with served(store, export=lambda url, run_dir: {}) as url:
        boss = signed_in(url, "boss")
        monkeypatch.setattr(handlers, "admin_stats", locked)
        monkeypatch.setattr(handlers, "export", locked)
        for path, said in (("do_refresh", "The store is busy or unreachable: refresh again in a moment."),
                           ("do_export", "The export could not run (the store busy or unreachable")):
            answer = call(boss, "admin-page", path)
            assert answer.status_code == 200 and said in answer.text, (path, answer.text[:300])
            assert not re.search(r"(?i)sqlite|SQL:|OperationalError|locked", answer.text), (path, answer.text[:300])
    assert sum("database is locked" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 2


def test_a_store_gone_before_the_session_check_is_a_503_in_plain_words(tmp_path, caplog):
    """The server checks every request's session in the store before any handler runs, and that check was not
    guarded: with the store unreachable (here SQLite's folder gone; PostgreSQL down is the same error) the page
    load, /config, a submit and a sign-in all answered a bare 500. Now a 503 in plain words (a short page for
    a page load and the sign-in form, JSON for the page's calls), the detail in the log; back once it is."""
    from align.labeling import server
    from align.labeling.store import Store

    folder = tmp_path / "db"
    store = Store(f"sqlite:///{folder / 'labels.db'}")
    store.add_tasks("b", [{"prompt": "a prompt", "responses": ["one", "two", "three", "four"]}])
    with served(store) as url:
        alice, carol = signed_in(url, "alice"), signed_in(url, "carol")
        task, _, tag = queued(alice, "do_load", [], "page").json()["data"][4:7]
        submit = {"data": [task, "alice", tag, 0.0, "1", "2", "3", "4", *[None] * 4, None, False, *[False] * 8, "", "", ""],
                  "session_hash": "page"}
        do_submit = fn_index(alice, "do_submit")  # /config too is 503 while the store is gone
        store.engine.dispose()
        folder.rename(tmp_path / "gone")
        # The page's event stream and heartbeat go on for a session the store confirmed under a minute ago (a
        # stream answered 503 made Gradio's page drop its connection and send nothing more); carol's, never
        # confirmed by a call, does not; nor does any other route (below).
        for path in ("/gradio_api/queue/data?session_hash=page", "/gradio_api/heartbeat/page"):
            with alice.stream("GET", path) as stream:
                assert stream.status_code == 200, path
            with carol.stream("GET", path.replace("page", "carols-page")) as stream:
                assert stream.status_code == 503, path
        page = alice.get("/", headers={"accept": "text/html"})
        assert page.status_code == 503 and "The store is busy or unreachable" in page.text
        for answer in (alice.get("/config"), alice.post("/gradio_api/queue/join", json=submit),
                       queued(alice, do_submit, submit["data"], "page")):
            assert answer.status_code == 503 and answer.json()["detail"] == server.STORE_DOWN, answer.text[:300]
        assert alice.get("/login").status_code == 200  # the form: signing in says whether the store answers
        bob = httpx.Client(base_url=url, timeout=30)
        signing_in = bob.post("/login", data={"name": "bob", "password": PASSWORD})
        assert signing_in.status_code == 503 and server.NOT_SIGNED_IN in signing_in.text
        signing_out = alice.post("/logout")
        assert signing_out.status_code == 503 and server.NOT_SIGNED_OUT in signing_out.text
        for shown in (page, signing_in, signing_out):
            assert not re.search(r"(?i)sqlite|SQL|OperationalError|unable to open", shown.text)
        assert any(r.exc_info and "unable to open database file" in str(r.exc_info[1]) for r in caplog.records)
        (tmp_path / "gone").rename(folder)
        assert alice.get("/", headers={"accept": "text/html"}).status_code == 200
        assert "Saved" in queued(alice, "do_submit", submit["data"], "page").text
        assert len(store.submitted_rankings()) == 1


def test_an_unexpected_error_shows_the_page_no_detail(store, monkeypatch):
    """A handler's uncaught exception (here the admin's statistics) reached the page with its own text under
    show_error=True: a path, SQL, model text quoted in a message. The page gets Gradio's bare error; the text
    stays in the server's log."""
    from align.labeling import handlers

    def broken(*args, **kwargs):
        raise RuntimeError("detail of /srv/secret/labels.db")

    monkeypatch.setattr(handlers, "admin_stats", broken)
    with served(store) as url:
        boss = signed_in(url, "boss")
        answer = call(boss, "admin-page")
        assert answer.status_code >= 400 or '"error"' in answer.text, answer.text[:300]
        assert "secret" not in answer.text and "RuntimeError" not in answer.text, answer.text[:300]


def test_a_session_cookie_planted_by_another_site_signs_nobody_in(store):
    """Login CSRF by cookie: a sibling subdomain sets the attacker's own cookie (carol's here) for the parent
    domain, and the browser sends it along with the app's own; Starlette kept the last of the two, and the
    annotator ranked as the attacker. Now two session cookies sign nobody in, and the sign-in page says why. Over HTTPS (here a
    proxy on this machine says so) the cookie is `__Host-align_session`, which a browser keeps only from this
    host itself, and a plain `align_session` is another site's: ignored. Plain HTTP keeps the plain name."""
    from align.labeling import auth

    store.add_tasks("b", [{"prompt": "a prompt", "responses": ["one", "two", "three", "four"]}])
    with served(store) as url:
        do_load = fn_index(signed_in(url, "bob"), "do_load")

        def who(cookie: str, **headers: str) -> int | str:
            with httpx.Client(base_url=url, timeout=30, headers={"cookie": cookie, **headers}) as client:
                answer = queued(client, do_load, [], uuid.uuid4().hex)
            return answer.json()["data"][5] if answer.status_code == 200 else answer.status_code

        plain = {}
        for name in ("alice", "carol"):
            answer = httpx.post(f"{url}/login", data={"name": name, "password": PASSWORD})
            assert answer.status_code == 303 and "secure" not in answer.headers["set-cookie"].lower()
            plain[name] = answer.cookies[auth.COOKIE]
        alice, carol = (f"{auth.COOKIE}={plain[n]}" for n in ("alice", "carol"))
        assert who(alice) == "alice" and who(f"other=1; {alice}") == "alice"
        for both in (f"{alice}; {carol}", f"{carol}; {alice}"):
            assert who(both) == 401
            page = httpx.get(url, headers={"cookie": both, "accept": "text/html"})
            assert page.status_code == 303 and page.headers["location"] == "login"
            page = httpx.get(f"{url}/login", headers={"cookie": both})
            assert "two session cookies" in page.text and "align-signin" in page.text

        https = {"x-forwarded-proto": "https"}
        answer = httpx.post(f"{url}/login", data={"name": "alice", "password": PASSWORD}, headers=https)
        set_cookie = answer.headers["set-cookie"]
        assert set_cookie.startswith(f"{auth.HTTPS_COOKIE}=") and "; secure" in set_cookie.lower()
        assert "path=/;" in set_cookie.lower() and "domain" not in set_cookie.lower()
        secured = f"{auth.HTTPS_COOKIE}={answer.cookies[auth.HTTPS_COOKIE]}"
        assert who(secured, **https) == "alice" and who(f"{secured}; {carol}", **https) == "alice"
        assert who(f"{carol}; {secured}", **https) == "alice"  # the app's handlers see the checked cookie only
        assert who(carol, **https) == 401  # a plain cookie over HTTPS: any site on the domain could have set it
        out = httpx.post(f"{url}/logout", headers={**https, "cookie": secured})
        assert out.status_code == 303 and out.headers["set-cookie"].startswith(f'{auth.HTTPS_COOKIE}=""')
        assert "; secure" in out.headers["set-cookie"].lower()  # else a browser ignores the removal
        assert who(secured, **https) == 401


def test_a_sign_in_or_sign_out_form_is_small_and_the_sign_in_url_encoded(store):
    """/login and /logout are open to anyone, and the 1 MiB cap applied only after the session check: FastAPI
    parsed a sign-in form of any size, a multipart one into temp files (1 GB spooled to disk, then 401). Now
    either form is at most FORM_BODY bytes (413, said by Content-Length or found reading a chunked body), and
    the sign-in must be URL-encoded, as the page's form is (415): none of these counts as a failed sign-in."""
    from urllib.parse import urlencode

    from align.labeling.server import FORM_BODY

    with served(store) as url:
        form = {"name": "alice", "password": PASSWORD}
        multipart = [{"files": {"f": ("big.bin", b"x" * (3 << 20))}, "data": form},
                     {"files": {"name": (None, "alice"), "password": (None, PASSWORD)}}]
        for kwargs in multipart + [{"json": form}, {"content": urlencode(form)},
                                   {"content": urlencode(form), "headers": {"content-type": "text/plain"}}]:
            answer = httpx.post(f"{url}/login", **kwargs)
            assert answer.status_code == 415 and "set-cookie" not in answer.headers, (answer.text, kwargs.keys())

        def streamed():  # chunked: no Content-Length to refuse up front
            yield b"name=alice&password="
            for _ in range(64):
                yield b"x" * FORM_BODY

        for path, kwargs in (("/login", {"data": {**form, "password": "x" * FORM_BODY}}),
                             ("/login", {"content": streamed()}), ("/logout", {"content": b"x" * (FORM_BODY + 1)})):
            answer = httpx.post(f"{url}{path}", headers={"content-type": "application/x-www-form-urlencoded"},
                                **kwargs)
            assert answer.status_code == 413 and "set-cookie" not in answer.headers, (path, answer.text)

        for content_type in ("application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=UTF-8"):
            answer = httpx.post(f"{url}/login", content=urlencode(form), headers={"content-type": content_type})
            assert answer.status_code == 303 and "align_session=" in answer.headers["set-cookie"], content_type
        assert httpx.post(f"{url}/logout", headers={"cookie": answer.headers["set-cookie"].split(";")[0]}
                          ).status_code == 303


def test_the_playground_is_for_admins_while_blind_ab_tasks_are_open(store):
    """An A/B task's answers are its models' own (align eval's greedy ones), and the Playground served every
    signed-in annotator the same models: its prompt asked there at temperature 0 gave the task's answers back and
    named each side of the blind comparison. While an A/B task waits for verdicts the tab is hidden from
    annotators, its calls are refused to them (the tab is only hidden), and their /config holds no endpoint URL;
    an admin keeps it, and annotators get it back once every A/B task has its verdicts."""
    from align.labeling import handlers
    from align.labeling.playground import ServeClient

    asked = []

    class Served(ServeClient):
        def models(self):
            return ["base", "dpo", "sft"]

        def stream(self, model, messages, *, temperature):
            asked.append(model)
            yield f"{model} says hi"
            return "stop"

    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "How do I sync?", "responses": ["Open Settings.", "No idea."]}],
                    kind="pairwise")
    assert store.blind_tasks_open(overlap=1)
    with served(store, playground=Served("http://127.0.0.1:9/serve-secret/v1"), overlap=1) as url:
        alice, boss = signed_in(url, "alice"), signed_in(url, "boss")

        def page(client, name):  # the page's load: (Playground tab's update, its intro)
            return queued(client, "do_load", [], name).json()["data"][-2:]

        def ask(client, name):
            data = ["dpo", "sft", "How do I sync?", 0.0, [[], []]]
            return queued(client, "pg_ask", data, name).text

        assert "serve-secret" not in alice.get("/config").text
        (tab, intro), (boss_tab, boss_intro) = page(alice, "alice-1"), page(boss, "boss-1")
        assert tab["visible"] is False and intro == "" and boss_tab["visible"] is True and "serve-secret" in boss_intro
        models = queued(alice, "pg_models", [None, None], "alice-1").text
        assert "closed to annotators" in models and "dpo" not in models
        assert "closed to annotators" in ask(alice, "alice-1") and asked == []
        assert "dpo says hi" in ask(boss, "boss-1") and sorted(asked) == ["dpo", "sft"]

        her = handlers.sign_in(store, "alice", PASSWORD)  # her page's load was handed the task
        handlers.submit(store, her, handlers.next_task(store, her)["task_id"], verdict="A")
        assert not store.blind_tasks_open(overlap=1)
        tab, intro = page(alice, "alice-2")
        assert tab["visible"] is True and "serve-secret" in intro
        assert "dpo says hi" in ask(alice, "alice-2")


def test_a_handler_runs_through_the_queue_only(store, monkeypatch):
    """POST /gradio_api/run/<api_name> ran any handler directly, outside Gradio's queue and past its concurrency
    limits: a signed-in annotator's 16 threads posting /gradio_api/run/pg_ask held 32 streams open to the serve
    endpoint, where the Playground promises 4 conversations at once (concurrency_limit=4). Now that route is
    not let through (404), and Gradio would refuse it too (api_open=False); the page's queue still runs it."""
    from align.labeling import server
    from align.labeling.playground import ServeClient

    asked = []

    class Served(ServeClient):
        def models(self):
            return ["dpo", "sft"]

        def stream(self, model, messages, *, temperature):
            asked.append(model)
            yield f"{model} says hi"
            return "stop"

    with served(store, playground=Served("http://127.0.0.1:9/v1"), overlap=1) as url:
        alice = signed_in(url, "alice")
        data = ["dpo", "sft", "How do I sync?", 0.0, [[], []]]
        ask = fn_index(alice, "pg_ask")
        for path, body in (("/gradio_api/run/pg_ask", {"data": data, "session_hash": "alice-1"}),
                           ("/gradio_api/run/pg_ask/", {"data": data, "session_hash": "alice-1"}),
                           ("/gradio_api/run/predict", {"data": data, "fn_index": ask, "session_hash": "alice-1"})):
            answer = alice.post(path, json=body)
            assert answer.status_code == 404 and "says hi" not in answer.text, (path, answer.text[:300])
        assert asked == []
        assert "dpo says hi" in queued(alice, "pg_ask", data, "alice-1").text and sorted(asked) == ["dpo", "sft"]

        # Behind the server's own refusal, Gradio's: a route list that let run/ through again runs nothing.
        monkeypatch.setitem(server.ROUTES, "POST", re.compile(r"/gradio_api/(queue/join|run/[^/]+/?|cancel)"))
        answer = alice.post("/gradio_api/run/pg_ask", json={"data": data, "session_hash": "alice-2"})
        assert answer.status_code == 404 and "join the queue" in answer.text, answer.text[:300]
        assert sorted(asked) == ["dpo", "sft"]


def test_a_rank_set_on_a_task_no_longer_open_is_said_at_once(store):
    """alice read a task for 31 minutes; it went to bob, and the ranks she then set were dropped without a word
    (save_draft returned False, the page ignored it) until her submit was refused. The page says it now, and what
    to do; a rank set just before her own submit, whose draft lands after it, says nothing."""
    from sqlalchemy import update

    from align.labeling.store import assignments

    store.add_tasks("b", [{"prompt": "q", "responses": ["a", "b", "c"]}, {"prompt": "q2", "responses": ["d", "e", "f"]}])
    with served(store) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        task, _, tag = queued(alice, "do_load", [], "alices-page").json()["data"][4:7]
        with store.tx() as conn:  # read for 31 minutes, no rank set
            conn.execute(update(assignments).values(assigned_at=assignments.c.assigned_at - 31 * 60))
        queued(bob, "do_load", [], "bobs-page")  # bob is given the task that stood open
        said = queued(alice, "do_draft", [task, "alice", tag, "1", *[None] * 7, "1", "p1:0"], "alices-page").text
        assert "handed to someone else" in said and "Press Skip" in said, said
        second, _, tag2 = queued(alice, "do_skip", [task, "alice"], "alices-page").json()["data"][1:4]
        quiet = queued(alice, "do_draft", [second, "alice", tag2, "1", *[None] * 7, "1", "p1:0"], "alices-page")
        assert quiet.json()["data"][0]["__type__"] == "update", quiet.text  # open: saved, nothing said
        queued(alice, "do_submit", [second, "alice", tag2, 0.0, "1", "2", "3", *[None] * 5, None, False, *[False] * 8, "",
                                    "", "p1:1"], "alices-page")
        # the same ranks (the last one set just before the submit): nothing to say; other ranks: not saved, said;
        # unless the draft was sent by the page before its submit (its stamp: the same page, fewer submits sent)
        # (do_draft_2: the draft of C's rank radios; do_draft: A's)
        late = queued(alice, "do_draft_2", [second, "alice", tag2, None, None, "3", *[None] * 5, "3", ""], "alices-page")
        assert late.json()["data"][0]["__type__"] == "update", late.text
        for stamp in ("", "p1:1", "p2:0", "p1", "p1:x", ":0"):
            said = queued(alice, "do_draft", [second, "alice", tag2, "3", "2", "1", *[None] * 5, "3", stamp],
                          "alices-page").text
            assert "already submitted" in said and "Reload the page" in said, (stamp, said)
        before = queued(alice, "do_draft", [second, "alice", tag2, "3", "2", "1", *[None] * 5, "3", "p1:0"],
                        "alices-page")
        assert before.json()["data"][0]["__type__"] == "update", before.text


def test_a_submit_on_a_task_handed_on_shows_the_next_and_does_not_say_skip(store):
    """alice's task went to bob after 31 minutes; her submit moves her page on to her next task, and its note told
    her to press Skip, which would have skipped that fresh task for good."""
    from sqlalchemy import update

    from align.labeling.store import assignments

    store.add_tasks("b", [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(3)])
    with served(store) as url:
        alice, bob = signed_in(url, "alice"), signed_in(url, "bob")
        task, _, tag = queued(alice, "do_load", [], "alices-page").json()["data"][4:7]
        with store.tx() as conn:
            conn.execute(update(assignments).values(assigned_at=assignments.c.assigned_at - 31 * 60))
        queued(bob, "do_load", [], "bobs-page")
        said = queued(alice, "do_submit", [task, "alice", tag, 0.0, "1", "2", "3", *[None] * 5, None, False, *[False] * 8, "", "", ""],
                      "alices-page").json()["data"]
        assert "handed to someone else" in said[0] and "your next task is below" in said[0], said[0]
        assert "Skip" not in said[0] and said[1] not in ("", task), said[:2]


def test_a_second_tab_left_on_a_task_submitted_or_skipped_moves_on(store):
    """Two tabs of alice on one task: the first submits it, and the second's Submit said "already saved" and left
    the page on that task, again at every press; skipped in the first, the second's Submit was refused and stayed
    there too. Both now say so and show her next task."""
    store.add_tasks("b", [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(3)])
    with served(store) as url:
        alice = signed_in(url, "alice")
        pages = {p: queued(alice, "do_load", [], p).json()["data"][4:7] for p in ("tab-1", "tab-2")}
        (task, _, tag), (same, _, tag2) = pages["tab-1"], pages["tab-2"]
        assert task == same
        ranks = ["1", "2", "3", *[None] * 5]
        first = queued(alice, "do_submit", [task, "alice", tag, 0.0, *ranks, None, False, *[False] * 8, "", "", ""], "tab-1").json()
        second = queued(alice, "do_submit", [task, "alice", tag2, 0.0, *ranks, None, False, *[False] * 8, "", "", ""], "tab-2").json()
        assert "Already saved" in second["data"][0] and second["data"][1] == first["data"][1] != task, second["data"][:2]
        task = first["data"][1]  # both tabs on the next task now; the first skips it, the second submits it
        queued(alice, "do_skip", [task, "alice"], "tab-1")
        said = queued(alice, "do_submit", [task, "alice", second["data"][3], 0.0, *ranks, None, False, *[False] * 8, "", "", ""],
                      "tab-2").json()["data"]
        assert "this task was skipped" in said[0] and said[1] not in ("", task), said[:2]
        assert len(store.submitted_rankings()) == 1


def test_a_proxy_that_sends_no_forwarded_for_is_warned_of_once(store, monkeypatch, caplog):
    """Behind a proxy that sends no X-Forwarded-For (a plain nginx `proxy_pass`), every annotator was the proxy's
    address, silently: twenty wrong passwords from anyone locked the whole team out. A request from a trusted
    peer without it, asking for a host name that is not this machine's, now says so in the log, once."""
    import logging

    from align.labeling import server

    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.setattr(server, "_proxy_warned", set(), raising=False)
    caplog.set_level(logging.WARNING, logger="align.labeling.server")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]

    with served(store) as url, httpx.Client(base_url=url, timeout=30) as client:
        port = url.rsplit(":", 1)[1]
        assert client.get("/login").status_code == 200  # a browser on this machine, straight to the app
        assert client.get("/login", headers={"referer": "https://wiki.example.org/", "sec-fetch-site": "cross-site"})
        assert client.get("/login", headers={"host": "labels.example.org", "x-forwarded-for": "198.51.100.7",
                                             "x-forwarded-proto": "https"}).status_code == 200  # a proxy done right
        assert warnings() == []
        # nginx's default: Host is the upstream's own, but the browser's same-origin request says where it was
        nginx = {"host": f"127.0.0.1:{port}", "referer": "https://labels.example.org/login",
                 "sec-fetch-site": "same-origin"}
        assert client.post("/login", data={"name": "alice", "password": "wrong"}, headers=nginx).status_code == 401
        for _ in range(3):  # Host kept (Caddy's way, FORWARDED_ALLOW_IPS aside): the same, said no more
            client.get("/login", headers={"host": "labels.example.org"})
        said = warnings()
        assert len(said) == 1 and "'labels.example.org'" in said[0] and "127.0.0.1" in said[0], said
        assert "lock the whole team out" in said[0] and "docs/labeling.md" in said[0]


def test_forwarded_for_from_a_proxy_not_trusted_is_warned_of_once(store, monkeypatch, caplog):
    """A proxy in another container sends X-Forwarded-For from an address FORWARDED_ALLOW_IPS does not name:
    uvicorn ignores it, and every annotator is the proxy's address. The log says which address to trust."""
    import logging

    from align.labeling import server

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.9")  # read by uvicorn as `running` starts it, as `serve`
    monkeypatch.setattr(server, "_proxy_warned", set(), raising=False)
    caplog.set_level(logging.WARNING, logger="align.labeling.server")
    with served(store) as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(3):
            client.get("/login", headers={"host": "labels.example.org", "x-forwarded-for": f"198.51.100.{i}"})
    said = [r.getMessage() for r in caplog.records if "FORWARDED_ALLOW_IPS" in r.getMessage()]
    assert len(said) == 1 and "from 127.0.0.1" in said[0], said


def test_the_export_summary_says_it_kept_flagged_rankings_pairs():
    """flagged=keep (the default) puts the pairs of rankings flagged "all are bad" / "unsafe" in the export: the
    Export button's summary said nothing of them, though summary.json counts them."""
    from align.labeling.app import _export_summary

    summary = {"pairs": 30, "train_pairs": 24, "test_pairs": 6, "rankings": 6, "tasks": 5, "mean_agreement": 1.0,
               "flagged_rankings": 1, "flagged_pairs": 6, "dropped_flagged": 0}
    assert "kept 6 pairs from 1 rankings flagged all are bad (export.flagged=keep;" in _export_summary("/tmp/p", summary)
    dropped = {**summary, "flagged_pairs": 0, "dropped_flagged": 1}  # flagged=drop: said among the dropped
    assert "rankings flagged all are bad" not in _export_summary("/tmp/p", dropped)
    assert "dropped: flagged 1" in _export_summary("/tmp/p", dropped)
    # a reply flagged unsafe: its pairs are said, and how many went against the ranks (drop: among the dropped)
    ruled = {**summary, "unsafe_replies": 1, "unsafe_pairs": 3, "unsafe_overridden": 2}
    assert "3 pairs put a reply flagged unsafe on the rejected side (2 against the ranks)" in _export_summary("/tmp/p", ruled)
    assert "dropped: unsafe 3" in _export_summary("/tmp/p", {**summary, "dropped_unsafe": 3})


def test_a_submit_that_saved_nothing_of_its_page_gives_the_stamp_before_it_back():
    """The submit's stamp is recorded before it commits (a draft of the page refused in between was said lost);
    a submit refused, failed or answered with another tab's ranking puts the one before it back."""
    from align.labeling.app import PageSubmits

    submits = PageSubmits()
    assert submits.sent(1, 7, "p1:1") is None
    assert submits.sent_before(1, 7, "p1:0") and not submits.sent_before(1, 7, "p1:1")
    assert not submits.sent_before(1, 7, "p2:0")  # another page's draft
    previous = submits.sent(1, 7, "p2:1")  # another tab's submit, refused
    assert previous == "p1:1"
    submits.put_back(1, 7, "p2:1", previous)
    assert submits.sent_before(1, 7, "p1:0") and not submits.sent_before(1, 7, "p2:0")
    submits.put_back(1, 7, "p3:1", None)  # not the latest: nothing changes
    assert submits.sent_before(1, 7, "p1:0")
    submits.sent(1, 8, "p1:2")
    submits.put_back(1, 8, "p1:2", None)
    assert not submits.sent_before(1, 8, "p1:1")
    assert submits.sent(1, 9, "junk") is None and not submits.sent_before(1, 9, "p1:0")
    submits.put_back(1, 9, None, None)  # a stamp of null (a forged call) recorded nothing: nothing to put back
    submits.put_back(1, 9, "junk", None)
    assert submits.sent_before(1, 7, "p1:0")
    # what is kept of a stamp is what is read of it: one padded to 900 kB kept that much a task, 10,000 tasks kept
    padded = "p" * 54 + ":" + "1" * 9 + "x" * 900_000
    submits.sent(1, 10, padded)
    assert max(len(stamp) for stamp in submits._stamps.values()) == 64
    assert submits.sent_before(1, 10, "p" * 54 + ":0")
    submits.put_back(1, 10, padded, None)  # the same stamp, as the failed submit has it: put back
    assert not submits.sent_before(1, 10, "p" * 54 + ":0")
