"""`align label` subcommands through `align.cli.main`: accounts, simulation, status, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.cli import main as align
from align.labeling.store import Store


def test_users_simulate_status_and_errors(tmp_path, capsys):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(3)],
                    source={})
    assert align(["label", "--run-dir", str(tmp_path), "users", "add", "alice", "--admin", "--password", "pw-1234"]) == 0
    assert align(["label", "--run-dir", str(tmp_path), "users", "add", "alice", "--password", "pw-1234"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert align(["label", "--run-dir", str(tmp_path), "users", "list"]) == 0
    assert "alice  (admin)" in capsys.readouterr().out
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "no-such-scorer"]) == 2
    assert "not a built-in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:  # infinite noise: every ranking a coin toss, written as labels
        align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--noise", "inf"])
    assert bad.value.code == 2 and "--noise: must be >= 0, got inf" in capsys.readouterr().err
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    assert len(store.submitted_rankings()) == 3
    assert align(["label", "--run-dir", str(tmp_path), "status"]) == 0
    assert "round-0: 3 tasks (0 gold), 3 rankings, 0 unranked" in capsys.readouterr().out
    assert align(["label", "--run-dir", str(tmp_path), "gold", "1", "1,2"]) == 0
    assert store.gold_answers() == {1: [1, 2]}


def test_gold_refuses_an_ab_task_and_an_answer_that_ties_every_response(tmp_path, capsys):
    """`align label gold` took an A/B task of align eval human=true: it became every annotator's gold turn, left
    the eval's pending count, and kept the Playground closed to annotators for good (a gold A/B task is always
    open). It also took ranks that tie every response: no pair to score anyone on, 0.0 accuracy in the admin."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "q", "responses": ["a", "b", "c"]}], source={})
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "e", "responses": ["x", "y"]}], kind="pairwise")
    ab = store.batch_tasks("eval-dpo-vs-sft")[0]["task_id"]
    ranked = store.batch_tasks("round-0")[0]["task_id"]
    run = ["label", "--run-dir", str(tmp_path)]
    assert align([*run, "gold", str(ab), "1,2"]) == 2
    assert "an A/B task of align eval human=true cannot be gold" in capsys.readouterr().err
    assert align([*run, "gold", str(ranked), "2,2,2"]) == 2
    assert "tie every response" in capsys.readouterr().err
    assert store.gold_answers() == {} and store.pending_count("eval-dpo-vs-sft", 1) == 1
    assert align([*run, "gold", str(ranked), "1,1,2"]) == 0  # a tie, but one pair to score on
    assert store.gold_answers() == {ranked: [1, 1, 2]}


def test_simulated_annotators_honour_an_explicit_overlap(tmp_path, capsys):
    """`--annotators 3 --overlap 1` ranks each task once, shared among the three; without --overlap each of the
    three ranks every task (the overlap defaults to the number of annotators)."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(6)],
                    source={})
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--annotators", "3",
                  "--overlap", "1"]) == 0
    assert len(store.submitted_rankings()) == 6
    assert "6 rankings submitted by 3 simulated annotator(s)" in capsys.readouterr().out
    store.add_tasks("round-1", [{"prompt": f"r{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(2)],
                    source={})
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--annotators", "3",
                  "--batch", "round-1"]) == 0
    assert sum(r["batch"] == "round-1" for r in store.submitted_rankings()) == 6


def test_a_database_that_cannot_be_opened_is_a_clear_error(capsys):
    assert align(["label", "--db", "postgresql://someone:hunter2@127.0.0.1:1/labels", "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the labelling store postgresql://someone:***@127.0.0.1:1/labels" in err
    assert "hunter2" not in err
    assert align(["label", "--db", "mysql://x/y", "users", "list"]) == 2
    assert "--db mysql://x/y: not a database URL align supports" in capsys.readouterr().err



def test_a_postgresql_server_that_never_answers_is_an_error_within_the_connect_timeout(capsys, monkeypatch):
    """A listener that takes the connection and never replies (a hung server, a firewall that black-holes):
    `align label status` waited for ever; now the connection gives up after CONNECT_TIMEOUT (here libpq's
    least, 2 s), and the store says so."""
    import socket
    import time

    pytest.importorskip("psycopg")
    from align.labeling import store as store_module

    monkeypatch.setattr(store_module, "CONNECT_TIMEOUT", 2)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://someone:hunter2@127.0.0.1:{silent.getsockname()[1]}/labels"
        start = time.monotonic()
        assert align(["label", "--db", url, "status"]) == 2
        assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "cannot open the labelling store postgresql://someone:***@" in err and "timeout" in err, err


def test_a_store_locked_past_lock_wait_is_said_in_one_line(tmp_path, capsys, monkeypatch):
    """Another process stuck inside its locked transaction: a command that writes fails after LOCK_WAIT with
    a line saying the store is busy, not a traceback."""
    from align.labeling import store as store_module

    monkeypatch.setattr(store_module, "LOCK_WAIT", 1)
    store = Store(store_module.sqlite_url(tmp_path / "labels.db"))
    store.add_user("ann", "pw-1234", admin=True)
    store.add_user("bob", "pw-1234")
    with store.tx(lock=True):
        assert align(["label", "--db", store.url, "users", "admin", "bob", "on"]) == 1
    assert "align label: the store is busy or unreachable (sqlite:" in capsys.readouterr().err
    assert align(["label", "--db", store.url, "users", "admin", "bob", "on"]) == 0


def test_a_run_dir_with_a_question_mark_or_percent_sign_keeps_its_store_in_it(tmp_path, capsys):
    """sqlite:///<path> read `?` as the start of a query and `%41` as "A": the store of run dir `what?` was a file
    `what` beside it, that of `100%41` was refused. The URL quotes the path now, and every reader unquotes it."""
    from align.artifacts import store_url
    from align.labeling.store import sqlite_path
    from align.preflight import check_store

    for name in ("what?", "100%41", "hash#1", "with space"):
        run = tmp_path / name
        assert align(["label", "--run-dir", str(run), "users", "add", "lena", "--password", "pw-1234"]) == 0
        assert (run / "labels.db").is_file(), sorted(p.name for p in tmp_path.iterdir())
        url = store_url(None, run)
        assert sqlite_path(url) == str(run.resolve() / "labels.db")
        Store(url).add_tasks("round-0", [{"prompt": "q", "responses": ["a", "b"]}])
        assert align(["label", "--run-dir", str(run), "status"]) == 0
        assert align(["label", "--db", url, "status"]) == 0  # --db: the file as SQLAlchemy reads the URL
        assert "round-0: 1 tasks" in capsys.readouterr().out
        check_store("store", None, str(run), must_exist=True)  # align export's preflight finds it too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100%41", "hash#1", "what?", "with space"]


def test_a_postgresql_password_is_masked_however_it_is_given(capsys):
    """A password after an empty user name, or in a `password` query parameter (libpq reads it there), was
    printed as it is; an @ in it not percent-encoded sent the rest of it to the host (psycopg's "failed to
    resolve host" quoted it): refused, saying how to write it."""
    from align.labeling.store import safe_url

    for url in ("postgresql://:hunter2@127.0.0.1:1/labels",
                "postgresql://someone@127.0.0.1:1/labels?password=hunter2&connect_timeout=2"):
        assert align(["label", "--db", url, "status"]) == 2
        err = capsys.readouterr().err
        assert "cannot open the labelling store postgresql://" in err and "***" in err and "hunter2" not in err
    for url in ("postgresql://someone:Kx7@Qz9@db.internal/labels", "postgresql://someone:Kx7@Qz:9@db.internal/labels",
                "postgresql://:Kx7@Qz9@db.internal/labels"):
        assert align(["label", "--db", url, "status"]) == 2
        err = capsys.readouterr().err
        assert "more than one @ before the host: percent-encode the password (an @ in it as %40" in err
        assert "Kx7" not in err and "Qz" not in err, err
    assert safe_url("postgresql://someone:p%40ss@db/labels?password=x&sslmode=require") == \
        "postgresql://someone:***@db/labels?password=***&sslmode=require"


def test_align_label_hands_the_export_recipe_to_the_app(tmp_path, monkeypatch):
    """The admin's Export button is `align export` (manifest and config included), wired in by align's CLI."""
    from align.labeling import server

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(3)])
    store.add_user("boss", "pw-1234", admin=True)
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    built: dict = {}
    monkeypatch.setattr(server, "create_app", lambda store, **kwargs: built.update(kwargs) or "app")
    monkeypatch.setattr(server, "listen", lambda host, port: NoSocket(host, port))
    monkeypatch.setattr(server, "serve", lambda app, listener: built.update(served=(app, listener.address)))
    assert align(["label", "--run-dir", str(tmp_path), "--session-hours", "2"]) == 0
    assert built["served"] == ("app", ("127.0.0.1", 7860)) and built["session_hours"] == 2.0
    assert built["export_dir"] == str(tmp_path / "preferences")
    summary = built["export"]()  # what the button runs
    assert summary["pairs"] == 3
    manifest = json.loads((tmp_path / "preferences" / "align.json").read_text())
    assert manifest["stage"] == "export" and (tmp_path / "preferences" / "config.yaml").is_file()
    # a new batch after a command-line export of one batch: the button exports every batch, not that one
    assert align(["export", f"run.dir={tmp_path}", "batches=[round-0]", "run.wandb=disabled"]) == 0
    store.add_tasks("round-1", [{"prompt": f"r1 q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(2)])
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    assert built["export"]()["pairs"] == 5


def test_serve_url_adds_the_playground_with_the_key_from_the_environment(tmp_path, monkeypatch, capsys):
    from align.labeling import server

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("boss", "pw-1234", admin=True)
    built: dict = {}
    monkeypatch.setattr(server, "create_app", lambda store, **kwargs: built.update(kwargs) or "app")
    monkeypatch.setattr(server, "listen", NoSocket)
    monkeypatch.setattr(server, "serve", lambda app, listener: None)
    for bad in ("ftp://127.0.0.1/v1", "http://me:secret@127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1?model=x"):
        assert align(["label", "--run-dir", str(tmp_path), "--serve-url", bad]) == 2
        assert "--serve-url" in capsys.readouterr().err and not built
    monkeypatch.setenv("ALIGN_SERVE_API_KEY", "key-from-the-environment")
    assert align(["label", "--run-dir", str(tmp_path), "--serve-url", "http://127.0.0.1:9/v1/"]) == 0
    playground = built["playground"]
    assert playground.url == "http://127.0.0.1:9/v1" and playground.max_tokens is None  # the server's default
    assert playground.http.headers["Authorization"] == "Bearer key-from-the-environment"
    out = capsys.readouterr().out
    assert "Playground tab: the models server at http://127.0.0.1:9/v1 is not answering" in out  # nothing there yet
    assert "key-from-the-environment" not in out
    assert align(["label", "--run-dir", str(tmp_path)]) == 0 and built["playground"] is None


def test_align_export_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(3)])
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    mine = tmp_path / "preferences"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert align(["export", f"run.dir={tmp_path}"]) == 1
    assert "preferences is not a preferences export (it holds notes.txt)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"


def test_align_export_says_when_the_only_rankings_are_ab_verdicts_or_gold(tmp_path, capsys):
    """With only A/B verdicts of align eval human=true and gold rankings in the store, export counted them as
    rankings, then refused with "no preference pairs came out of the rankings (summary: {...1.3 KB of JSON}); were
    all responses tied...": neither was the reason. Now it says what the rankings are, without the JSON."""
    from align.labeling import handlers

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "q", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "e", "responses": ["x", "y"]}], kind="pairwise")
    store.add_gold(store.batch_tasks("round-0")[0]["task_id"], [1, 2])
    store.add_user("alice", "pw-1234")
    alice = handlers.sign_in(store, "alice", "pw-1234")
    for rate in (1.0, 0.0):
        task = handlers.next_task(store, alice, gold_rate=rate)
        if task["kind"] == "pairwise":
            handlers.submit(store, alice, task["task_id"], verdict="A")
        else:
            handlers.submit(store, alice, task["task_id"], [1, 2])
    assert {(r["kind"], r["is_gold"]) for r in store.submitted_rankings()} == {("pairwise", False), ("ranking", True)}
    assert align(["export", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
    err = capsys.readouterr().err
    assert "the only submitted rankings are A/B verdicts of align eval human=true" in err and "{" not in err
    store.add_tasks("round-1", [{"prompt": "q2", "responses": ["same", "same"]}], source={})  # copies: no pair
    handlers.submit(store, alice, handlers.next_task(store, alice)["task_id"], [1, 2])
    assert align(["export", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
    err = capsys.readouterr().err
    assert "no preference pairs came out of 1 rankings of 1 tasks (dropped: " in err and "{" not in err


class NoSocket:
    """What a faked server.listen returns: the address asked for, and nothing bound."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)

    def close(self) -> None:
        pass


def test_an_address_that_cannot_be_listened_on_is_said_in_one_line_before_any_url(tmp_path, capsys, monkeypatch):
    """A port in use, an address of another machine, a name that does not resolve: the app printed its URL, then
    uvicorn's "ERROR: [Errno 98] error while attempting to bind ..." (exit 3), and the URL was another program's.
    Now the address is taken first: a refusal names the flag to change and why, and no URL is printed."""
    import errno
    import os
    import socket

    from align.labeling import server

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("boss", "pw-1234", admin=True)
    monkeypatch.setattr(server, "create_app", lambda store, **kwargs: pytest.fail("the app was built"))
    monkeypatch.setattr(server, "serve", lambda *args: pytest.fail("the app was served"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert align(["label", "--run-dir", str(tmp_path), "--port", str(port)]) == 2
        out, err = capsys.readouterr()
    assert err.strip() == (f"align label: --port {port}: cannot listen on 127.0.0.1:{port} "
                           f"({os.strerror(errno.EADDRINUSE)}): choose another --port") and out == ""
    hosts = [("nosuchhost.invalid", "")]  # .invalid: a name that never resolves (RFC 6761)
    with socket.socket() as probe:
        try:
            probe.bind(("192.0.2.1", 0))  # TEST-NET-1: no machine's own address
        except OSError:
            hosts.append(("192.0.2.1", os.strerror(errno.EADDRNOTAVAIL)))
    for host, reason in hosts:
        assert align(["label", "--run-dir", str(tmp_path), "--host", host]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"align label: --host {host}: cannot listen there ({reason}") and out == "", err
        assert err.rstrip().endswith("): give an address of this machine (127.0.0.1, 0.0.0.0)") and \
            len(err.strip().splitlines()) == 1 and "warning" not in err, err


def test_the_app_is_served_on_the_socket_taken_for_it(tmp_path, capsys, monkeypatch):
    """The URL is printed once the address is the app's (listening: a browser that opens it at once waits),
    the app is served on that very socket, and the socket is closed when the app stops."""
    import socket

    from align.labeling import server

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("boss", "pw-1234", admin=True)
    served: list = []

    def serve(app, listener):
        with socket.create_connection(listener.getsockname(), timeout=5):  # in the backlog: it listens
            served.append((listener, capsys.readouterr().out))

    monkeypatch.setattr(server, "create_app", lambda store, **kwargs: "app")
    monkeypatch.setattr(server, "serve", serve)
    with server.listen("127.0.0.1", 0) as free:  # a port free now, for the app to take
        port = free.getsockname()[1]
    assert align(["label", "--run-dir", str(tmp_path), "--port", str(port)]) == 0
    (listener, out), = served
    assert f"labelling app for sqlite:///{tmp_path / 'labels.db'}: http://127.0.0.1:{port}  (Ctrl-C" in out
    assert listener.family == socket.AF_INET and listener.fileno() == -1  # closed


def test_labeling_imports_nothing_else_of_align_nor_torch():
    """The boundary DESIGN.md keeps: the app and its store run without the training stack. align.labeling
    imports nothing of align outside it but the package itself, whose __init__.py imports only os."""
    import ast

    code = ("import sys, align.labeling.cli, align.labeling.server, align.labeling.export, "
            "align.labeling.simulate, align.labeling.playground; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or "
            "m.startswith('align.') and m != 'align.labeling' and not m.startswith('align.labeling.')))")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]"
    imports = [node for node in ast.walk(ast.parse((repo / "align" / "__init__.py").read_text()))
               if isinstance(node, ast.Import | ast.ImportFrom)]
    imported = [(type(node).__name__, [alias.name for alias in node.names]) for node in imports]
    assert imported == [("Import", ["os"])], imported


def test_a_lead_manages_accounts_from_the_command_line(tmp_path, capsys):
    """A departed annotator loses access (sessions end now) and keeps their rankings; a forgotten password is
    reset; admin rights move, never leaving the store without an admin."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("lead", "pw-1234", admin=True)
    store.add_user("bob", "pw-bob1")
    bob = store.authenticate("bob", "pw-bob1")
    token = store.open_session(bob["annotator_id"], ttl=3600)
    label = ["label", "--run-dir", str(tmp_path)]

    assert align([*label, "users", "disable", "bob"]) == 0
    assert store.authenticate("bob", "pw-bob1") is None and store.session(token) is None
    assert align([*label, "users", "list"]) == 0 and "bob  (disabled)" in capsys.readouterr().out
    assert align([*label, "users", "passwd", "bob", "--password", "new-pw-2"]) == 0  # enabled again
    assert store.authenticate("bob", "new-pw-2")["name"] == "bob" and store.authenticate("bob", "pw-bob1") is None

    assert align([*label, "users", "admin", "lead", "off"]) == 2
    assert "'lead' is the last admin" in capsys.readouterr().err
    assert align([*label, "users", "disable", "lead"]) == 2
    assert align([*label, "users", "admin", "bob", "on"]) == 0 and align([*label, "users", "admin", "lead", "off"]) == 0
    assert {u["name"]: u["is_admin"] for u in store.users()} == {"bob": True, "lead": False}
    assert all(set(u) == {"id", "name", "is_admin", "disabled"} for u in store.users())  # no password hash
    assert align([*label, "users", "passwd", "nobody", "--password", "x-1234"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    assert align([*label, "users", "admin", "bob", "maybe"]) == 2  # on or off
    assert align([*label, "users", "disable", "lead"]) == 0 and align([*label, "users", "disable", "bob"]) == 2
    store.add_user("carol", "pw-carol", admin=True)
    assert align([*label, "users", "disable", "bob"]) == 0 and align([*label, "users", "disable", "carol"]) == 2
    assert align([*label, "users", "admin", "bob", "off"]) == 0  # a disabled admin is not the last admin
    from align.preflight import _has_accounts

    assert _has_accounts(None, str(tmp_path))  # carol
    solo = Store(f"sqlite:///{tmp_path / 'solo' / 'labels.db'}")
    solo.add_user("x", "pw-xxxx")
    solo.disable_user("x")  # no admin to keep: every account disabled is no account to sign in with
    assert not _has_accounts(None, str(tmp_path / "solo"))
    assert align(["label", "--run-dir", str(tmp_path / "solo")]) == 2
    assert "no accounts to sign in with yet" in capsys.readouterr().err


def test_status_of_a_batch_the_store_lacks_names_its_batches_and_a_user_is_echoed_as_stored(tmp_path, capsys):
    """`status --batch nope` printed "pending rankings: 0" for a batch that is not there; `users add "  lena  "`
    said it added '  lena  ', stored as 'lena'."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "q", "responses": ["a", "b"]}])
    store.add_tasks("round-1", [{"prompt": "q", "responses": ["a", "b"]}])
    label = ["label", "--run-dir", str(tmp_path)]
    assert align([*label, "status", "--batch", "nope"]) == 2
    assert "--batch 'nope' is not in the store; its batches: round-0, round-1" in capsys.readouterr().err
    assert align([*label, "status", "--batch", "round-1"]) == 0
    assert "pending rankings (overlap 1, --overlap's default: no labelling has run on this store yet)" in \
        capsys.readouterr().out
    assert align([*label, "users", "add", "  lena  ", "--password", "pw-1234"]) == 0
    assert "user 'lena' added to" in capsys.readouterr().out and [u["name"] for u in store.users()] == ["lena"]
    lena = store.authenticate("lena", "pw-1234")["annotator_id"]
    store.skip(lena, store.assign(lena, batch="round-1"))  # the only annotator skips it: nobody left to rank it
    assert align([*label, "status", "--batch", "round-1"]) == 0
    assert ("run on this store yet): 1, 1 of them on tasks someone skipped: 1 on tasks every annotator "
            "skipped" in capsys.readouterr().out)
    store.add_user("mo", "pw-5678")  # one who has not skipped it: the ranking waits for them
    assert align([*label, "status", "--batch", "round-1"]) == 0
    assert align([*label, "status", "--batch", "round-1", "--overlap", "1"]) == 0
    assert ("pending rankings (overlap 1): 1, 1 of them on tasks someone skipped: 1 waiting for an annotator who has "
            "not skipped the task") in capsys.readouterr().out


def test_a_batch_the_store_lacks_is_refused_by_simulate_and_the_app_too(tmp_path, capsys, monkeypatch):
    """`--simulate ... --batch nosuch` ranked nothing and `align label --batch nosuch` served no task, both
    accepted as if the batch were done; `status` refused it already."""
    from align.labeling import cli

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "q", "responses": ["a", "b"]}])
    store.add_user("lead", "pw-1234", admin=True)
    monkeypatch.setattr(cli, "serve", lambda *a, **k: 0)  # the app itself is not started here
    label = ["label", "--run-dir", str(tmp_path), "--batch", "nosuch"]
    for command in ([*label, "--simulate", "support_style"], label):
        assert align(command) == 2
        assert "--batch 'nosuch' is not in the store; its batches: round-0" in capsys.readouterr().err
    assert not store.submitted_rankings()
    assert align(["label", "--run-dir", str(tmp_path), "--batch", "round-0"]) == 0  # a batch it has: the app


def test_status_shows_only_the_batch_asked_for_and_counts_against_the_overlap_given(tmp_path, capsys, monkeypatch):
    """`status --batch b2` printed every batch's line; after labelling at overlap 2, status counted pending at
    --overlap's default 1, without saying so; the store did not record the overlap labelling ran with: now it
    does, and status counts against it unless given another."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for batch in ("b1", "b2"):
        store.add_tasks(batch, [{"prompt": f"{batch} q{i}", "responses": ["Thanks! Open Settings.", "no"]}
                                for i in range(3)])
    label = ["label", "--run-dir", str(tmp_path)]
    assert align([*label, "--simulate", "support_style", "--annotators", "2", "--batch", "b2", "--overlap", "1"]) == 0
    capsys.readouterr()
    assert align([*label, "status", "--batch", "b2"]) == 0
    out = capsys.readouterr().out
    assert "b2: 3 tasks (0 gold), 3 rankings, 0 unranked" in out and "b1:" not in out
    assert "pending rankings (overlap 1, as labelling last ran with; --overlap counts another): 0" in out
    assert align([*label, "status", "--batch", "b2", "--overlap", "2"]) == 0
    out = capsys.readouterr().out
    assert "b2: 3 tasks (0 gold), 3 rankings, 0 unranked, 3 pending" in out and "pending rankings (overlap 2): 3" in out
    assert align([*label, "status", "--overlap", "2"]) == 0  # pending per batch, as docs/labeling.md says, not one sum
    out = capsys.readouterr().out
    assert "b1: 3 tasks (0 gold), 0 rankings, 3 unranked, 6 pending" in out
    assert "b2: 3 tasks (0 gold), 3 rankings, 0 unranked, 3 pending" in out and "pending rankings (overlap 2): 9" in out
    # The app started at overlap 2 (not served here): status counts against that from then on
    from align.labeling import cli

    monkeypatch.setattr(cli, "serve", lambda *a, **k: 0)
    assert align([*label, "--overlap", "2"]) == 0 and store.recorded_overlap() == 2
    capsys.readouterr()
    assert align([*label, "status", "--batch", "b2"]) == 0
    assert "pending rankings (overlap 2, as labelling last ran with; --overlap counts another): 3" in \
        capsys.readouterr().out


def test_the_next_hint_follows_what_was_ranked_and_a_missing_password_is_one_line(tmp_path, capsys, monkeypatch):
    """Simulated rankings of eval's A/B tasks (batch eval-*) are read by align eval human=true, not by export;
    `users add` with no terminal to ask on (or Ctrl-D) ended in a traceback."""
    import getpass

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "q", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    out = capsys.readouterr().out
    assert "human=true" in out and "align export" not in out
    store.add_tasks("round-0", [{"prompt": "q2", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--batch", "round-0"]) == 0
    out = capsys.readouterr().out
    assert "next: align export" in out and "human=true" not in out

    def no_terminal(prompt):
        raise EOFError

    monkeypatch.setattr(getpass, "getpass", no_terminal)
    assert align(["label", "--run-dir", str(tmp_path), "users", "add", "lena"]) == 2
    assert "no password given for 'lena'; give one with --password" in capsys.readouterr().err
    store.add_user("lena", "pw-1234")
    assert align(["label", "--run-dir", str(tmp_path), "users", "passwd", "lena"]) == 2  # a traceback too
    assert "no password given for 'lena'; give one with --password" in capsys.readouterr().err
    assert align(["label", "--run-dir", str(tmp_path), "users", "passwd", "nobody"]) == 2  # said before asking
    assert "no user 'nobody'" in capsys.readouterr().err
    # a PostgreSQL URL's password stays out of the hint (logs keep it): masked (the store itself: this SQLite one)
    store.add_tasks("round-1", [{"prompt": "q3", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    monkeypatch.setattr("align.labeling.store.Store", lambda url: store)
    assert align(["label", "--run-dir", str(tmp_path), "--db", "postgresql://ann:S3cret@db.example/labels",
                  "--simulate", "support_style", "--batch", "round-1"]) == 0
    out = capsys.readouterr().out
    assert "store='postgresql://ann:***@db.example/labels'" in out and "S3cret" not in out


def test_the_apps_export_runs_align_export_past_a_users_own_align_folder(tmp_path, monkeypatch):
    """`python -m` puts the working directory first on sys.path: an align/ folder of the user's there would stand
    in for align's in the child (a recipes/ one did, when that was a package of its own, and the Export button said
    "align export: not built yet")."""
    from align.cli import export_for_label_app

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": ["Thanks! Open Settings.", "no"]} for i in range(3)])
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    work = tmp_path / "work"
    (work / "align").mkdir(parents=True)
    (work / "align" / "__init__.py").write_text("raise ImportError(\"a user's own package, not align's\")\n")
    monkeypatch.chdir(work)
    assert export_for_label_app(store.url, str(tmp_path))["pairs"] == 3


def test_an_app_on_every_interface_is_warned_of_and_named_by_a_url_one_can_open(tmp_path, monkeypatch, capsys):
    """`--host 0.0.0.0` served passwords over plain HTTP without a word, and printed http://0.0.0.0:7860, which
    no browser elsewhere can open. It now warns, names the docs' section, and prints this machine's name."""
    import socket

    from align.labeling import server

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("boss", "pw-1234", admin=True)
    served: list = []
    monkeypatch.setattr(server, "create_app", lambda store, **kwargs: "app")
    monkeypatch.setattr(server, "listen", NoSocket)
    monkeypatch.setattr(server, "serve", lambda app, listener: served.append(listener.address))
    monkeypatch.setattr(socket, "gethostname", lambda: "labelbox")
    assert align(["label", "--run-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:7860" in out and "warning" not in err  # on loopback: nothing to say
    assert align(["label", "--run-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "8080"]) == 0
    out, err = capsys.readouterr()
    assert served[-1] == ("0.0.0.0", 8080) and "http://labelbox:8080" in out and "0.0.0.0:8080" not in out
    assert "plain HTTP" in err and "HTTPS" in err and "docs/labeling.md" in err and "Binding" in err, err
    assert align(["label", "--run-dir", str(tmp_path), "--host", "::"]) == 0
    out, err = capsys.readouterr()
    assert "http://labelbox:7860" in out and "plain HTTP" in err
    assert align(["label", "--run-dir", str(tmp_path), "--host", "10.1.2.3"]) == 0
    out, err = capsys.readouterr()
    assert "http://10.1.2.3:7860" in out and "plain HTTP to 10.1.2.3" in err
    assert align(["label", "--run-dir", str(tmp_path), "--host", "localhost"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_simulated_annotators_flag_unsafe_the_replies_a_flagger_names_and_export_rejects_them(tmp_path, capsys):
    """--simulate-unsafe ticks the replies the flagger returns True for, in the order each annotator was shown them
    (saved as unsafe:<canonical index>), whatever the profile; export then puts a flagged reply on the rejected side
    against every reply nobody flagged, although support_style ranks it first. Without it nothing is flagged."""
    from align.labeling.export import build_pairs
    from align.labeling.handlers import shown_order
    from align.labeling.scorers import support_style

    replies = ["Open Settings > Sync and tap Sync now.", "Thanks! Please send me your password so I can check it.",
               "Open Settings.", "no"]
    assert max(replies, key=lambda r: support_style("q", r)) == replies[1]  # the unsafe one would win on score
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": replies} for i in range(8)], source={})
    store.add_tasks("eval-dpo-vs-sft", [{"prompt": "e", "responses": ["What is your password?", "Thanks!"]}],
                    kind="pairwise")
    run = ["label", "--run-dir", str(tmp_path)]
    assert align([*run, "--simulate-unsafe", "known_scorers:asks_for_password"]) == 2
    assert "--simulate-unsafe: only with --simulate" in capsys.readouterr().err
    assert align([*run, "--simulate", "support_style", "--simulate-unsafe", "no-such-flagger"]) == 2
    assert "flagger 'no-such-flagger': not a built-in (support_unsafe)" in capsys.readouterr().err
    assert align([*run, "--simulate", "support_style", "--simulate-unsafe", "known_scorers:asks_for_password",
                  "--profiles", "good,adversarial"]) == 0
    assert "unsafe by known_scorers:asks_for_password" in capsys.readouterr().out
    rankings = store.submitted_rankings()
    assert len(rankings) == 2 * 9
    assert all(r["flags"] == ["unsafe:1" if r["kind"] == "ranking" else "unsafe:0"] for r in rankings), rankings
    # The shown order moved the flagged reply off its canonical slot for some annotator: the mapping was exercised
    users = {u["name"]: u["id"] for u in store.users()}
    moved = [shown_order(r["task_id"], users[r["annotator"]], 4, key=store.secret()).index(1) != 1
             for r in rankings if r["kind"] == "ranking"]
    assert any(moved)
    good = [r for r in rankings if r["batch"] == "round-0" and r["annotator"].endswith("-good")]
    pairs, summary = build_pairs(good, flagged="keep")
    sides = [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]
    assert replies[1] not in {chosen for chosen, _ in sides}
    assert sum(rejected == replies[1] for _, rejected in sides) == summary["unsafe_overridden"] == 3 * 8
    dropped = build_pairs(good, flagged="drop")[0]
    assert dropped and not any(replies[1] in (p["chosen"][-1]["content"], p["rejected"][-1]["content"])
                               for p in dropped)


def test_without_a_flagger_simulated_annotators_flag_nothing(tmp_path, capsys):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "q", "responses": ["Send me your password.", "Thanks! Open Settings."]}],
                    source={})
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    assert [r["flags"] for r in store.submitted_rankings()] == [[]]
    assert store.submitted_rankings()[0]["rationale"] == "simulated: support_style"


@pytest.mark.parametrize("scorer, said", [
    ("known_scorers:returns_none", "returned None for task 1 ('How do I sync?'): a scorer returns a number (int or "
                                   "float)"),
    ("known_scorers:returns_list", "returned list [4.0, 9.0] for task 1 ('How do I sync?'): a scorer returns a number"),
    ("known_scorers:parses_the_reply", "raised ValueError: could not convert string to float: 'Open Settings.' (at "),
])
def test_a_scorer_that_fails_is_named_and_its_task_goes_back_to_the_store(tmp_path, capsys, scorer, said):
    """A scorer that returns no number (None, a list) ended in float()'s traceback; one that raised a ValueError was
    said as `align label`'s own error ("could not convert string to float"), naming neither scorer nor task. And the
    task stayed assigned to the simulated annotator: another scorer's annotators were handed nothing until it
    expired (30 minutes), and status counted it pending. Now one line names them, and the task is given back."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": p, "responses": ["Open Settings.", "Thanks! Open Settings > Sync."]}
                                for p in ("How do I sync?", "Where is export?")], source={})
    run = ["label", "--run-dir", str(tmp_path)]
    assert align([*run, "--simulate", scorer]) == 2
    err = capsys.readouterr().err
    assert f"align label: scorer '{scorer}' {said}" in err and "Traceback" not in err
    failed = next(u["id"] for u in store.users() if u["name"].startswith("sim-"))
    assert store.assigned_tasks(failed, open_only=True) == [] and store.assignment_status(failed, 1) == "expired"
    assert store.submitted_rankings() == []
    # Another scorer's annotator is given both tasks now, not one
    assert align([*run, "--simulate", "support_style"]) == 0
    assert "2 rankings submitted" in capsys.readouterr().out
    assert align([*run, "status"]) == 0
    assert "round-0: 2 tasks (0 gold), 2 rankings, 0 unranked, 0 pending" in capsys.readouterr().out
