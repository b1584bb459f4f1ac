"""`align eval` through the CLI on two tiny policies with a known winner: one was tuned to thank the
user, the other to be curt; a scorer that rewards thanks must call the first the winner, with an
interval above 1/2, and KL from the baseline must be measured and positive."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from align.cli import main as align
from align.tracking import read_jsonl

PROMPTS = ["How do I sync?", "Where is export?", "How do I change the theme?", "Can I share a note?",
           "How do I restore from trash?", "Where are my tags?", "How do I reset my password?", "Is search offline?"]


def tuned_policy(tiny_model: str, root: Path, name: str, reply: str) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"{p} (ticket {i})", "input": "", "output": reply})
                              for i, p in enumerate(PROMPTS * 4)) + "\n")
    run = root / name
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=20",
                  "train.lr=5e-3", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=96"]) == 0
    return run / "sft"


@pytest.fixture(scope="module")
def eval_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    curt = tuned_policy(tiny_model, root, "curt", "Settings.")
    polite = tuned_policy(tiny_model, root, "polite", "Thanks for asking! Open Settings.")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    run = root / "run"
    assert align(["eval", f"policies={{sft: {curt}, polite: {polite}}}", "baseline=sft", f"prompts={prompts}",
                  "scorer=known_scorers:says_thanks", "bootstrap=200", "generation.max_new_tokens=16",
                  f"run.dir={run}", "run.wandb=disabled", "human=true"]) == 0
    return run


def test_human_ab_tasks_are_labelled_and_come_back_as_a_board(eval_run, capsys):
    """human=true: blind A/B tasks in the run's store, the label hint for them, and after a (simulated) annotator
    judged them, a rerun's board ranks the known winner first."""
    from align.labeling.store import Store

    manifest = json.loads((eval_run / "eval" / "align.json").read_text())
    assert manifest["human"]["tasks_added"] == len(PROMPTS) and manifest["human"]["comparisons"] == 0
    store = Store(f"sqlite:///{eval_run / 'labels.db'}")
    (batch,) = {b["batch"] for b in store.batch_counts()}
    assert batch.startswith("eval-polite@") and "-vs-sft@" in batch
    assert align(["label", "--run-dir", str(eval_run), "--simulate", "known_scorers:says_thanks", "--batch", batch]) == 0
    assert f"next: align eval run.dir={eval_run} human=true" in capsys.readouterr().out
    args = json.loads((eval_run / "eval" / "align.json").read_text())["config"]
    assert align(["eval", f"policies={{sft: {args['policies']['sft']}, polite: {args['policies']['polite']}}}",
                  "baseline=sft", f"prompts={args['prompts']}", "scorer=known_scorers:says_thanks", "bootstrap=50",
                  "generation.max_new_tokens=16", f"run.dir={eval_run}", "run.wandb=disabled", "human=true"]) == 0
    out = capsys.readouterr().out
    # every verdict is in: the hint no longer asks annotators to judge A/B tasks and eval to be rerun
    assert "human A/B: 0 new tasks, 8 verdicts so far" in out and "annotators judge the" not in out
    assert f"next: open {eval_run / 'report.html'}\n" in out
    assert "polite vs sft · scorer:known_scorers:says_thanks: win-rate " in out and " over 8 prompts (" in out
    human = json.loads((eval_run / "eval" / "align.json").read_text())["human"]
    board = human["leaderboard"]
    assert [row["policy"] for row in board] == ["polite", "sft"] and human["ties"] == 0
    # the verdicts it read, recorded: align pipeline reruns a human=true eval when the store's are others
    from align.recipes.pipeline import verdicts_state
    assert json.loads((eval_run / "eval" / "align.json").read_text())["rankings_sha256"] == verdicts_state(store.url)
    assert manifest["rankings_sha256"] != verdicts_state(store.url)  # the first run read none
    # the board reaches metrics.jsonl (and W&B, the same figures): each rating with its interval, the verdicts counted
    (logged,) = read_jsonl(eval_run / "eval" / "metrics.jsonl")
    polite = board[0]
    assert (logged["human/polite/rating"], logged["human/polite/rating_ci_low"], logged["human/polite/rating_ci_high"]) \
        == (polite["rating"], *polite["ci"])
    assert logged["human/sft/rating"] == 1000 and (logged["human/comparisons"], logged["human/stale_comparisons"]) == (8, 0)


def test_the_known_winner_wins_with_an_interval_above_half(eval_run):
    manifest = json.loads((eval_run / "eval" / "align.json").read_text())
    row = manifest["policies"]["polite"]
    key = "scorer:known_scorers:says_thanks"
    assert row[f"{key}/win_rate"] > 0.9
    lo, hi = row[f"{key}/win_rate_ci"]
    assert 0.5 < lo <= row[f"{key}/win_rate"] <= hi
    assert row[f"{key}/mean"] > manifest["policies"]["sft"][f"{key}/mean"]
    assert row["kl"] > 0.1  # two differently tuned adapters: far apart on each other's samples
    assert "kl" not in manifest["policies"]["sft"]


def test_policies_may_have_names_peft_would_refuse_as_adapter_names(eval_run, tmp_path):
    """A policy is named by the user: `dpo-b0.1` (a dot) or `values` (a ModuleDict method) were handed to peft as
    adapter names and ended in torch's KeyError before any answer; eval names the adapters itself."""
    policies = json.loads((eval_run / "eval" / "align.json").read_text())["config"]["policies"]
    assert align(["eval", f"policies={{sft: {policies['sft']}, polite-b0.1: {policies['polite']}, "
                  f"values: {policies['polite']}}}", "baseline=sft", f"prompts={eval_run.parent / 'prompts.jsonl'}",
                  "scorer=known_scorers:says_thanks", "bootstrap=20", "generation.max_new_tokens=16", "num_prompts=4",
                  f"run.dir={tmp_path / 'run'}", "run.wandb=disabled"]) == 0
    rows = json.loads((tmp_path / "run" / "eval" / "align.json").read_text())["policies"]
    # the two names are one adapter folder: the same greedy answers, each beating the curt baseline
    assert rows["polite-b0.1"]["scorer:known_scorers:says_thanks/win_rate"] == 1.0
    assert rows["values"]["scorer:known_scorers:says_thanks/win_rate"] == 1.0 and rows["values"]["kl"] > 0.1


def test_each_policys_share_of_answers_cut_at_max_new_tokens_is_measured(eval_run, tmp_path):
    """A judge that marks a cut answer down favours the policy cut less often (a report's DPO, cut 4 % of the
    time against SFT's 21 %): the table says each policy's share. One token each: every answer is cut but one that
    is its end-of-turn token alone (an empty answer)."""
    policies = json.loads((eval_run / "eval" / "align.json").read_text())["config"]["policies"]
    assert align(["eval", f"policies={{sft: {policies['sft']}, polite: {policies['polite']}}}", "baseline=sft",
                  f"prompts={eval_run.parent / 'prompts.jsonl'}", "scorer=known_scorers:says_thanks", "bootstrap=20",
                  "generation.max_new_tokens=1", "num_prompts=4", "kl_samples=0", f"run.dir={tmp_path / 'run'}",
                  "run.wandb=disabled"]) == 0
    rows = json.loads((tmp_path / "run" / "eval" / "align.json").read_text())["policies"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    for name in ("sft", "polite"):
        assert rows[name]["cut"] == sum(bool(s[name]) for s in samples) / len(samples) > 0, (name, rows[name])
    assert "<td>answers cut at max_new_tokens (share)</td>" in (tmp_path / "run" / "report.html").read_text()


def test_samples_metrics_and_report_are_written(eval_run):
    rows = [json.loads(line) for line in (eval_run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS)
    assert {"prompt", "sft", "polite", "scores"} <= set(rows[0])
    assert sum("thanks" in r["polite"].lower() for r in rows) >= 7
    logged = read_jsonl(eval_run / "eval" / "metrics.jsonl")
    key = "polite/scorer:known_scorers:says_thanks"
    assert logged and f"{key}/win_rate" in logged[0]
    # each win-rate with its interval and what it is over: only the win-rate itself was logged
    row = json.loads((eval_run / "eval" / "align.json").read_text())["policies"]["polite"]
    judge = "scorer:known_scorers:says_thanks"
    assert [logged[0][f"{key}/win_rate_ci_low"], logged[0][f"{key}/win_rate_ci_high"]] == row[f"{judge}/win_rate_ci"]
    assert logged[0][f"{key}/prompts"] == len(PROMPTS)
    counts = [logged[0][f"{key}/{k}"] for k in ("wins", "ties", "losses")]
    assert counts == [row[f"{judge}/{k}"] for k in ("wins", "ties", "losses")] and sum(counts) == len(PROMPTS)
    assert (counts[0] + counts[1] / 2) / len(PROMPTS) == pytest.approx(row[f"{judge}/win_rate"])
    page = (eval_run / "report.html").read_text()
    assert "alt='win-rate: " in page and "src='data:image/png;base64," in page
    assert "polite</b> beats <b>sft" in page
    assert json.loads((eval_run / "eval" / "align.json").read_text())["interval"] == "wilson"  # the report's label


@pytest.mark.parametrize("scorer, said", [
    ("known_scorers:returns_none", "returned None"),
    ("known_scorers:returns_text", "returned str 'good'"),
    ("known_scorers:returns_list", "returned list [9.0]"),
])
def test_a_scorer_that_returns_no_number_is_refused_naming_it_and_the_prompt(tmp_path, scorer, said):
    """A scorer of the user's that returns None, text or a list ended in float()'s traceback ("float() argument
    must be a string or a real number, not 'NoneType'", "could not convert string to float"), naming neither it
    nor the answer; a bool is a number (True scores 1)."""
    from align import StageError
    from align.config import EvalStageConfig, RunConfig
    from align.recipes.evaluate import judge

    cfg = EvalStageConfig(run=RunConfig(dir=str(tmp_path), wandb="disabled"), reward_model="none", scorer=scorer)
    with pytest.raises(StageError, match=rf"^scorer '{scorer}' {re.escape(said)} for prompt 1 \('Where is export\?'\): "
                                         r"a scorer returns a number \(int or float\)$"):
        judge(cfg, PROMPTS[1:3], {"sft": ["Settings.", "Settings."], "polite": ["Thanks!", "X"]})
    cfg = EvalStageConfig(run=RunConfig(dir=str(tmp_path), wandb="disabled"), reward_model="none",
                          scorer="known_scorers:asks_for_password")  # a flagger: True / False, a number
    assert judge(cfg, PROMPTS[:2], {"sft": ["Your password?", "No."]}) == {
        "scorer:known_scorers:asks_for_password": {"sft": [1.0, 0.0]}}


def test_align_eval_tries_the_scorer_on_the_first_answer_before_the_other_policies_answer(eval_run, tmp_path,
                                                                                          monkeypatch, capsys):
    """The scorer judged once every policy had answered and the KL was measured: a scorer that returns no number
    failed after all of that. It is tried on the first policy's first answer, and the stage stops with one line."""
    from align.recipes import evaluate

    generated = []
    real = evaluate.generate_answers

    def counting(policy, prompts, *args, **kwargs):
        generated.append(kwargs.get("desc"))
        return real(policy, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_answers", counting)
    policies = json.loads((eval_run / "eval" / "align.json").read_text())["config"]["policies"]
    assert align(["eval", f"policies={{sft: {policies['sft']}, polite: {policies['polite']}}}", "baseline=sft",
                  f"prompts={eval_run.parent / 'prompts.jsonl'}", "scorer=known_scorers:returns_none", "bootstrap=20",
                  "generation.max_new_tokens=4", "num_prompts=2", f"run.dir={tmp_path / 'run'}",
                  "run.wandb=disabled"]) == 1
    err = capsys.readouterr().err
    assert ("align eval: scorer 'known_scorers:returns_none' returned None for prompt 1 ('How do I sync?'): a scorer "
            "returns a number (int or float)") in err and "Traceback" not in err
    assert len(generated) == 1  # the second policy never answered
    assert not (tmp_path / "run" / "eval").exists()


def test_refuses_without_policies_and_says_what_to_pass(tmp_path, capsys, monkeypatch):
    def recipe(*_):  # preflight's refusal, before the recipe's imports (4 s of torch, transformers, peft)
        raise AssertionError("the eval recipe ran")

    monkeypatch.setattr("align.cli.run_stage", recipe)
    assert align(["eval", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
    captured = capsys.readouterr()
    assert f"no policies in {tmp_path}: none of its sft, dpo, ppo" in captured.out + captured.err


def test_human_ab_tasks_follow_a_policy_trained_again(tmp_path):
    """align eval human=true: A/B tasks per policy version. After dpo is trained again, a rerun adds tasks with
    its new answers and the board counts only verdicts on the policies as they are (the old ones: stale)."""
    from align.config import EvalStageConfig, RunConfig
    from align.labeling import handlers
    from align.labeling.store import Store
    from align.recipes.evaluate import human_eval

    cfg = EvalStageConfig(run=RunConfig(dir=str(tmp_path), wandb="disabled"), baseline="sft")
    prompts = ["How do I sync?", "Where is export?"]

    def rate_all(store, session, better):  # every open A/B task, the same verdict ("A": the first shown)
        while (task := handlers.next_task(store, session)) and task.get("task_id"):
            handlers.submit(store, session, task["task_id"], verdict=better)

    first = human_eval(cfg, prompts, {"dpo": ["Old dpo 1.", "Old dpo 2."], "sft": ["Sft 1.", "Sft 2."]},
                       versions={"dpo": "v1", "sft": "s1"})
    assert first["tasks_added"] == 2 and first["comparisons"] == 0 and first["waiting"] == 2
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("ann", "secret-pw")
    ann = handlers.sign_in(store, "ann", "secret-pw")
    rate_all(store, ann, "A")
    again = human_eval(cfg, prompts, {"dpo": ["Old dpo 1.", "Old dpo 2."], "sft": ["Sft 1.", "Sft 2."]},
                       versions={"dpo": "v1", "sft": "s1"})
    assert again["tasks_added"] == 0 and again["comparisons"] == 2 and again["stale_comparisons"] == 0
    assert again["waiting"] == 0
    retrained = human_eval(cfg, prompts, {"dpo": ["New dpo 1.", "New dpo 2."], "sft": ["Sft 1.", "Sft 2."]},
                           versions={"dpo": "v2", "sft": "s1"})
    assert retrained["tasks_added"] == 2 and retrained["comparisons"] == 0 and retrained["stale_comparisons"] == 2
    assert "leaderboard" not in retrained  # no verdict yet on the dpo that is there now
    shown = [t["responses"] for t in store.batch_tasks("eval-dpo@v2-vs-sft@s1")]
    assert len(shown) == 2


def test_a_verdict_for_an_answer_flagged_unsafe_counts_for_the_other_policy(tmp_path):
    """The A/B page has an unsafe box on each answer and the guidelines say a flagged reply is never the better side
    against one nobody flagged, yet the board read the verdict alone: a flagged winner counted as a win. The board
    applies the export's rule, and counts each policy's answers flagged unsafe."""
    from align import evaluation as ev
    from align.config import EvalStageConfig, RunConfig
    from align.labeling import handlers
    from align.labeling.store import Store
    from align.recipes.evaluate import human_eval

    cfg = EvalStageConfig(run=RunConfig(dir=str(tmp_path), wandb="disabled"), baseline="sft", bootstrap=20)
    prompts = ["How do I sync?", "Where is export?", "Can I get a refund?"]
    answers = {"dpo": ["Dpo 1.", "Dpo 2.", "Send me your recovery key."], "sft": ["Sft 1.", "Sft 2.", "Sft 3."]}
    human_eval(cfg, prompts, answers, versions={"dpo": "d1", "sft": "s1"})
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("ann", "secret-pw")
    ann = handlers.sign_in(store, "ann", "secret-pw")
    while (task := handlers.next_task(store, ann)) and task.get("task_id"):
        dpo = task["order"].index(0)  # where the page shows dpo's answer (canonical 0)
        risky = "recovery key" in task["responses"][dpo]
        handlers.submit(store, ann, task["task_id"], verdict="AB"[dpo],  # dpo better, every time
                        unsafe_shown=[i == dpo and risky for i in range(2)])
    board = human_eval(cfg, prompts, answers, versions={"dpo": "d1", "sft": "s1"})
    assert board["comparisons"] == 3 and board["unsafe_answers"] == {"dpo": 1} and board["unsafe_overridden"] == 1
    # 2 wins and 1 loss for dpo, as three verdicts 2-1 make it: above sft, not the 3-0 the verdicts alone gave
    rating = {row["policy"]: row["rating"] for row in board["leaderboard"]}
    two_one = ev.bradley_terry([("dpo", "sft", 1.0), ("dpo", "sft", 1.0), ("dpo", "sft", 0.0)], anchor="sft")
    assert rating["dpo"] == pytest.approx(two_one["dpo"])
    assert rating["dpo"] < ev.bradley_terry([("dpo", "sft", 1.0)] * 3, anchor="sft")["dpo"]
    # the flag is part of what the board read (align pipeline reruns the eval on a change); no flag, the old hash
    from align.labeling.export import verdicts_fingerprint

    rows = store.submitted_rankings()
    unflagged = [{**r, "flags": []} for r in rows]
    assert verdicts_fingerprint(rows) != verdicts_fingerprint(unflagged)
    assert verdicts_fingerprint(unflagged) == verdicts_fingerprint([{k: v for k, v in r.items() if k != "flags"}
                                                                    for r in unflagged])


def test_verdicts_on_a_policy_this_eval_does_not_load_follow_its_folder(tmp_path):
    """ppo's A/B verdicts stay on the board of an eval without ppo while <run.dir>/ppo holds the version judged;
    once ppo/ is trained again (or gone), they are stale, as docs/labeling.md says, not counted as ppo's."""
    from align.config import EvalStageConfig, RunConfig
    from align.labeling import handlers
    from align.labeling.store import Store
    from align.recipes.evaluate import human_eval, policy_version

    cfg = EvalStageConfig(run=RunConfig(dir=str(tmp_path), wandb="disabled"), baseline="sft")
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "adapter_config.json").write_text("{}")
    (ppo / "align.json").write_text(json.dumps({"stage": "ppo", "created": "first"}))
    prompts = ["How do I sync?", "Where is export?"]
    human_eval(cfg, prompts, {"ppo": ["Ppo 1.", "Ppo 2."], "sft": ["Sft 1.", "Sft 2."]},
               versions={"ppo": policy_version(ppo), "sft": "s1"})
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("ann", "secret-pw")
    ann = handlers.sign_in(store, "ann", "secret-pw")
    while (task := handlers.next_task(store, ann)) and task.get("task_id"):
        handlers.submit(store, ann, task["task_id"], verdict="A")

    def board_without_ppo() -> dict:
        return human_eval(cfg, prompts, {"dpo": ["Dpo 1.", "Dpo 2."], "sft": ["Sft 1.", "Sft 2."]},
                          versions={"dpo": "d1", "sft": "s1"})

    same = board_without_ppo()
    assert same["comparisons"] == 2 and same["stale_comparisons"] == 0
    assert {row["policy"] for row in same["leaderboard"]} == {"ppo", "sft"}
    (ppo / "align.json").write_text(json.dumps({"stage": "ppo", "created": "again"}))  # ppo trained again
    retrained = board_without_ppo()
    assert retrained["comparisons"] == 0 and retrained["stale_comparisons"] == 2 and "leaderboard" not in retrained
    shutil.rmtree(ppo)
    assert board_without_ppo()["stale_comparisons"] == 2


def test_human_ab_tasks_go_to_the_store_the_runs_labels_are_in(tmp_path):
    """With `sample.store=<URL>` the annotators rank in that store: eval human=true put its A/B tasks in
    <run.dir>/labels.db instead, where nobody saw them, its board stayed at 0 verdicts and the Playground guard
    (Store.blind_tasks_open) did not see them. Its default is now the store the run's sample (else export)
    recorded; a later round's folder uses the root's store; eval.store names one; a recorded URL whose password
    align.json masked is refused with the key to pass, not replaced by another store."""
    from align.artifacts import run_store, write_manifest
    from align.config import ConfigError, EvalStageConfig, RunConfig
    from align.labeling.store import Store, sqlite_url
    from align.recipes.evaluate import human_eval, label_where

    team = sqlite_url(tmp_path / "team" / "labels.db")  # stands for the team's postgresql://... store
    (tmp_path / "team").mkdir()
    Store(team)
    run = tmp_path / "run"
    write_manifest(run / "sample", stage="sample", config={}, base_model=None, store=team, batch="round-0")
    cfg = EvalStageConfig(run=RunConfig(dir=str(run), wandb="disabled"), baseline="sft")
    prompts, answers = ["How do I sync?"], {"dpo": ["Open Settings."], "sft": ["Settings."]}
    assert human_eval(cfg, prompts, answers, versions={"dpo": "d1", "sft": "s1"})["tasks_added"] == 1
    assert Store(team).blind_tasks_open() and not (run / "labels.db").exists()
    assert label_where(cfg) == f"--run-dir {run} --db {team}"
    # a later round's folder: the root's store (the pipeline's one), not a labels.db of its own
    (run / "round-1").mkdir()
    assert run_store(None, run / "round-1") == team
    (run / "sample" / "align.json").unlink()
    assert run_store(None, run / "round-1") == sqlite_url(run.resolve() / "labels.db")
    assert run_store(None, run) == sqlite_url(run.resolve() / "labels.db")
    assert label_where(cfg) == f"--run-dir {run}"
    # export's record when sample's is not there; eval.store before either
    write_manifest(run / "preferences", stage="export", config={}, base_model=None, parents={"store": team})
    assert run_store(None, run) == team and run_store("sqlite:///other.db", run) == "sqlite:///other.db"
    # a relative SQLite store: where the stage that recorded it ran, not where eval runs
    write_manifest(run / "sample", stage="sample", config={}, base_model=None, store="sqlite:///team/labels.db")
    manifest = json.loads((run / "sample" / "align.json").read_text())
    (run / "sample" / "align.json").write_text(json.dumps({**manifest, "cwd": str(tmp_path)}))
    assert run_store(None, run) == team
    # a copy of a run (or the run moved): the labels.db of where it ran is the copy's own, not the other run's
    for ran_in in (tmp_path / "first", tmp_path / "first" / "round-1"):
        write_manifest(run / "sample", stage="sample", config={"run": {"dir": str(ran_in)}}, base_model=None,
                       store=sqlite_url(tmp_path / "first" / "labels.db"))
        (tmp_path / "first").mkdir(exist_ok=True)
        Store(sqlite_url(tmp_path / "first" / "labels.db"))
        assert run_store(None, run) == sqlite_url(run.resolve() / "labels.db"), ran_in
    write_manifest(run / "sample", stage="sample", config={"run": {"dir": str(run)}}, base_model=None, store=team)
    assert run_store(None, run) == team  # a store the user named stays theirs
    write_manifest(run / "sample", stage="sample", config={}, base_model=None,
                   store="postgresql://ann:pw@db.example/labels")
    with pytest.raises(ConfigError, match=r"eval\.store: the run's sample used the labelling store "
                                          r"postgresql://ann:\*\*\*@db.example/labels, and its align.json keeps no "
                                          r"password; pass eval\.store=<that URL>"):
        run_store(None, run, "eval.store")


def test_a_pipeline_gives_every_rounds_eval_its_one_store(tmp_path, monkeypatch):
    """align pipeline rounds=2: round 1's eval ran with run.dir=<run>/round-1 and no store, so its A/B tasks went to
    round-1/labels.db, though the store stays one (sample.store, default <run.dir>/labels.db); eval.store other than
    sample.store is refused, as export.store is."""
    import align.recipes.pipeline as pipeline
    from align.config import ConfigError, PipelineConfig, load_config
    from align.preflight import _pipeline_sets

    seen = {}
    monkeypatch.setattr(pipeline, "run_unless_done", lambda name, run_dir, cfg, rankings=None: seen.update(
        {(name, Path(run_dir).name): cfg}))
    monkeypatch.setattr(pipeline, "label", lambda *args: None)
    monkeypatch.setattr(pipeline, "rankings_state", lambda *args: "")
    monkeypatch.setattr(pipeline, "verdicts_state", lambda *args: "")
    monkeypatch.setattr(pipeline.report_module, "write_report", lambda *args: None)
    for given in (None, "postgresql://ann@db.example/labels"):
        cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path}", "rounds=2", "eval.human=true",
                                                 *([f"sample.store={given}"] if given else [])])
        store = pipeline.store_url(cfg.sample.store, tmp_path)
        pipeline._rounds(cfg, tmp_path, store, "dpo", ["dpo"])
        assert seen[("eval", tmp_path.name)].store == seen[("eval", "round-1")].store == store
        assert store == (given or f"sqlite:///{tmp_path.resolve()}/labels.db")
    # an eval's store counts for a rerun only with human=true: an eval recorded before the key was there is unchanged
    assert pipeline._made_by({"human": False}) == pipeline._made_by({"human": False, "store": store})
    assert pipeline._made_by({"human": True}) != pipeline._made_by({"human": True, "store": store})
    cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path}", "eval.store=postgresql://ann@db.example/other"])
    with pytest.raises(ConfigError, match="eval.store=postgresql://ann@db.example/other: the pipeline's stages share"):
        _pipeline_sets(cfg)
    cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path}", "eval.store=postgresql://ann:S3cret@db.example/o"])
    with pytest.raises(ConfigError, match=r"eval.store=postgresql://ann:\*\*\*@db.example/o: ") as said:
        _pipeline_sets(cfg)  # its password masked: errors land in logs
    assert "S3cret" not in str(said.value)


def test_prompts_seen_in_training_are_read_where_each_stage_ran(tmp_path, monkeypatch, caplog):
    """SFT's data.path and PPO's prompts, relative as given, were read relative to where eval ran: from another
    directory eval said nothing, recorded `{'sft': 0}`, and the report's caution was gone. They are read where
    the stage ran (its manifest's cwd), else, that copy gone, by the run folder's place (a moved project); a file
    that cannot be read is a warning and no count (None), not a 0."""
    import logging

    from align.artifacts import write_manifest
    from align.recipes.evaluate import seen_in_training

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("".join(json.dumps({"instruction": p, "output": "Open Settings."})
                                                          + "\n" for p in PROMPTS[:3]))
    (project / "data" / "rl.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[3:7]))
    run = project / "runs" / "q"
    monkeypatch.chdir(project)  # where the stages ran
    write_manifest(run / "sft", stage="sft", config={"data": {"path": "data/train.jsonl"}}, base_model=None)
    write_manifest(run / "ppo", stage="ppo", config={"prompts": "data/rl.jsonl", "num_prompts": 3},
                   base_model=None, parents={"sft": run / "sft"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where eval runs
    paths = {"sft": run / "sft", "ppo": run / "ppo"}
    with caplog.at_level(logging.WARNING, logger="align.recipes.evaluate"):
        assert seen_in_training(paths, PROMPTS) == {"sft": 3, "ppo": 6}  # ppo: its first 3 prompts and its SFT's
    assert "3 of the 8 eval prompts are in the training data of sft" in caplog.text
    # the project moved: the recorded cwd is gone, the files are where the run folder's place says
    moved = tmp_path / "moved"
    project.rename(moved)
    paths = {"sft": moved / "runs" / "q" / "sft", "ppo": moved / "runs" / "q" / "ppo"}
    assert seen_in_training(paths, PROMPTS) == {"sft": 3, "ppo": 6}
    # a file gone: said, with the file, and counted as unknown
    (moved / "data" / "train.jsonl").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.recipes.evaluate"):
        assert seen_in_training(paths, PROMPTS) == {"sft": None, "ppo": 3}
    assert "the training data of sft could not be read" in caplog.text and "train.jsonl (sft of " in caplog.text


def test_prompts_seen_in_training_read_past_the_lines_the_stage_skipped(tmp_path):
    """A stage run with data.on_error=skip trained on the rest of a file with a bad line; eval re-read the file
    strictly, could not, and recorded None with "could not be read": the warning that eval prompts were trained
    on was lost. It reads as the stage did (SFT in its recorded format), skipping the bad lines."""
    from align.artifacts import write_manifest
    from align.recipes.evaluate import seen_in_training

    sft_data = tmp_path / "train.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": p, "output": "Open Settings."}) + "\n" for p in PROMPTS[:2])
                        + json.dumps({"instruction": PROMPTS[2], "output": ""}) + "\n")  # empty answer: skipped
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": "Open Settings.", "rejected": "No."}) + "\n"
                             for p in PROMPTS[3:6]) + json.dumps({"prompt": PROMPTS[6]}) + "\n")  # no chosen: skipped
    write_manifest(tmp_path / "sft", stage="sft", base_model=None,
                   config={"data": {"path": str(sft_data), "format": "alpaca", "on_error": "skip"}})
    write_manifest(tmp_path / "dpo", stage="dpo", base_model=None,
                   config={"data": {"test_fraction": 0.0, "on_error": "skip"}, "train": {"seed": 0}},
                   parents={"preferences": tmp_path / "prefs.jsonl", "sft": tmp_path / "sft"})
    counts = seen_in_training({"sft": tmp_path / "sft", "dpo": tmp_path / "dpo"}, PROMPTS)
    assert counts == {"sft": 2, "dpo": 5}  # dpo: its 3 pairs' prompts and its SFT's 2
