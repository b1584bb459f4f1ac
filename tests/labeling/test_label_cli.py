"""`align label` subcommands through `alignment.cli.main`: accounts, simulation, status, errors."""

from __future__ import annotations

from alignment.cli import main as align
from labeling.store import Store


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
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style"]) == 0
    assert len(store.submitted_rankings()) == 3
    assert align(["label", "--run-dir", str(tmp_path), "status"]) == 0
    assert "round-0: 3 tasks (0 gold), 3 rankings, 0 unranked" in capsys.readouterr().out
    assert align(["label", "--run-dir", str(tmp_path), "gold", "1", "1,2"]) == 0
    assert store.gold_answers() == {1: [1, 2]}


def test_a_database_that_cannot_be_opened_is_a_clear_error(capsys):
    assert align(["label", "--db", "postgresql://someone:hunter2@127.0.0.1:1/labels", "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the labelling store postgresql://someone:***@127.0.0.1:1/labels" in err
    assert "hunter2" not in err
    assert align(["label", "--db", "mysql://x/y", "users", "list"]) == 2
    assert "unsupported database URL" in capsys.readouterr().err

