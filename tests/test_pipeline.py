"""`align pipeline` on a tiny model in a temp dir: every stage, a simulated annotator, W&B offline runs
read back with `wandb leet inspect`, the report opened in headless Chromium, and a pipeline killed
mid-way that, run again, skips its finished stages and ends with the same artifacts."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from align.cli import main as align
from align.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
STAGE_DIRS = ["sft", "sample", "preferences", "reward", "dpo", "eval"]


def pipeline_args(tiny_model: str, data: Path, run_dir: Path, wandb: str = "offline") -> list[str]:
    return [
        "pipeline", "--config", str(REPO / "configs/quickstart/pipeline.yaml"), f"run.dir={run_dir}",
        f"run.wandb={wandb}", "scorer=known_scorers:thanks_then_short", "tie_resolution=0",
        f"sft.model.name={tiny_model}", f"sft.data.path={data}", "sft.train.max_steps=8", "sft.train.lr=5e-3",
        "sft.train.eval_steps=4", "sft.model.max_length=128",
        f"sample.prompts={data}", "sample.num_prompts=10", "sample.k=3", "sample.generation.max_new_tokens=12",
        "reward.train.max_steps=4", "reward.train.eval_steps=2", "reward.model.max_length=128",
        "dpo.train.max_steps=4", "dpo.train.eval_steps=2", "dpo.model.max_length=128", "dpo.train.lr=5e-3",
        f"eval.prompts={data}", "eval.num_prompts=8", "eval.generation.max_new_tokens=12", "eval.bootstrap=100",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline-data") / "train.jsonl"
    rows = [{"instruction": f"Ticket {i}: how do I {t}?", "input": "",
             "output": "Thanks for asking! Open Settings." if i % 2 else f"Open Settings, then {t}."}
            for i, t in enumerate(["sync", "export", "share a note", "change the theme", "find tags"] * 6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tiny_model, data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    assert align(pipeline_args(tiny_model, data, run_dir)) == 0
    return run_dir


def manifest(folder: Path) -> dict:
    return json.loads((folder / "align.json").read_text())


def test_every_stage_leaves_its_artifact_wired_to_its_parent(run):
    for stage in STAGE_DIRS:
        assert (run / stage / "align.json").is_file(), stage
    # Each stage's own wall time, not the pipeline's so far: no more than the time since the stage before it ended
    created = [time.mktime(time.strptime(manifest(run / s)["created"], "%Y-%m-%dT%H:%M:%S%z")) for s in STAGE_DIRS]
    for stage, before, after in zip(STAGE_DIRS[1:], created[:-1], created[1:], strict=True):
        assert 0 <= manifest(run / stage)["seconds"] <= after - before + 1, stage
    assert (run / "labels.db").is_file()
    assert manifest(run / "sample")["parents"]["policy"]["path"] == str(run / "sft")
    assert manifest(run / "reward")["parents"]["preferences"]["path"] == str(run / "preferences")
    assert manifest(run / "dpo")["parents"]["sft"]["path"] == str(run / "sft")
    evaluated = manifest(run / "eval")
    assert set(evaluated["policies"]) == {"sft", "dpo"}
    judges = {k.split("/")[0] for k in evaluated["policies"]["dpo"] if k.endswith("/win_rate")}
    assert judges == {"reward_model", "scorer:known_scorers:thanks_then_short"}
    prefs = manifest(run / "preferences")
    assert prefs["metrics"]["pairs"] > 0 and prefs["rankings_seen"] == 10
    # K=3 rankings batched by ranking: the reward model and DPO ran each distinct response once, not every row
    for stage in ("reward", "dpo"):
        assert 0.3 < manifest(run / stage)["metrics"]["train_distinct_rows"] < 0.9, stage


def test_eval_names_the_prompts_a_policy_was_trained_on(run):
    """Here eval.prompts is the SFT data itself: every eval prompt was seen in training, by SFT and (through
    its parent) by DPO, and the manifest says so. The quickstart's eval prompts are held out."""
    assert manifest(run / "eval")["prompts_seen_in_training"] == {"sft": 8, "dpo": 8}


def test_wandb_groups_a_pipelines_rounds_with_their_run(tmp_path, monkeypatch):
    from align.tracking import artifact_name, run_name

    for run in ("q", "x"):
        (tmp_path / run / "sft").mkdir(parents=True)  # round 0's stages are in the run's folder: round-N are its
    assert run_name(tmp_path / "q") == "q" and run_name(tmp_path / "q" / "round-2") == "q/round-2"
    assert run_name(tmp_path / "round-up") == "round-up"
    # every round's W&B files in the run's folder: the one `wandb sync` the hint prints uploads them all
    from align.tracking import wandb_dir

    assert wandb_dir(tmp_path / "q" / "round-1") == wandb_dir(tmp_path / "q") == tmp_path / "q"
    # two runs' round-1 artifacts are two artifacts, not versions of one
    assert artifact_name(tmp_path / "q" / "round-1", "dpo") == "q-round-1-dpo" != artifact_name(
        tmp_path / "x" / "round-1", "dpo")
    assert artifact_name(tmp_path / "q", "sft") == "q-sft"
    # W&B refuses any other character in an artifact's name (a stage crashed after training in runs/lr=5e-3)
    import wandb

    name = artifact_name(tmp_path / "lr=5e-3 my+run:2", "sft")
    assert name == "lr_5e-3_my_run_2-sft" and wandb.Artifact(name, type="model").name == name
    # run.dir=exps/round-1, with no run in exps: a run of its own, not round 1 of "exps" (its W&B files went to
    # exps/wandb, in group exps)
    from align.config import RunConfig
    from align.tracking import configure_wandb

    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(key, raising=False)  # put back as they were after the test
    own = tmp_path / "exps" / "round-1"
    assert run_name(own) == "round-1" and wandb_dir(own) == own and artifact_name(own, "sft") == "round-1-sft"
    configure_wandb(RunConfig(dir=str(own), wandb="offline"), "sft")
    assert (os.environ["WANDB_DIR"], os.environ["WANDB_RUN_GROUP"], os.environ["WANDB_NAME"]) == (
        str(own), "round-1", "round-1/sft")


def test_wandb_auto_follows_the_users_wandb_mode_then_the_key(monkeypatch):
    from align import tracking
    from align.config import RunConfig

    monkeypatch.setattr(tracking, "has_wandb_key", lambda: True)
    monkeypatch.setattr(tracking, "wandb_reachable", lambda: True)
    monkeypatch.setattr(tracking, "wandb_key_refusal", lambda: None)  # the server takes it
    for user, mode in (("disabled", "disabled"), ("offline", "offline"), ("dryrun", "offline"), ("", "online")):
        monkeypatch.setattr(tracking, "USER_MODE", user)
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == mode
    monkeypatch.setattr(tracking, "USER_MODE", "disabled")
    assert tracking.wandb_mode(RunConfig(wandb="offline")) == "offline"  # run.wandb says so: it wins
    monkeypatch.setattr(tracking, "USER_MODE", "")
    monkeypatch.setattr(tracking, "has_wandb_key", lambda: False)
    assert tracking.wandb_mode(RunConfig(wandb="auto")) == "offline"


def test_wandb_auto_finds_a_login_for_a_self_hosted_server_and_in_a_netrc_file(tmp_path, monkeypatch):
    """`wandb login --host https://wandb.corp:8443` keeps the key under that host, and NETRC names another file:
    only api.wandb.ai in ~/.netrc was looked up, so run.wandb=auto logged such a user's runs offline. wandb's own
    reader where it has one, else the same lookup here."""
    import sys

    from align import tracking

    home, other = tmp_path / "home", tmp_path / "netrc"
    home.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    other.write_text("machine wandb.corp:8443\n  login user\n  password local-" + "b" * 40 + "\n")
    for path in (home / ".netrc", other):
        path.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    for reader in ("wandb's", "ours"):
        if reader == "ours":
            monkeypatch.setitem(sys.modules, "wandb.sdk.lib.wbauth", None)  # an import of it fails
        monkeypatch.delenv("WANDB_BASE_URL", raising=False)
        monkeypatch.delenv("NETRC", raising=False)
        assert tracking.has_wandb_key(), reader  # the cloud's key in ~/.netrc
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp:8443")
        assert not tracking.has_wandb_key(), reader  # the cloud's key is not the server's
        monkeypatch.setenv("NETRC", str(other))
        assert tracking.has_wandb_key(), reader  # the server's, in the file NETRC names
        monkeypatch.setenv("NETRC", str(tmp_path / "none"))
        assert not tracking.has_wandb_key(), reader
        monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
        assert tracking.has_wandb_key(), reader
        monkeypatch.delenv("WANDB_API_KEY")


def test_wandb_auto_with_a_key_and_no_network_logs_offline_and_says_so(monkeypatch, caplog):
    """A key in ~/.netrc on a machine with no network: auto went online, wandb.init waited 90 s and every stage
    ended in a traceback (export, sample and eval after writing their manifest). The server is asked first."""
    import socket

    from align import tracking
    from align.config import RunConfig

    monkeypatch.setattr(tracking, "USER_MODE", "")
    monkeypatch.setattr(tracking, "has_wandb_key", lambda: True)
    monkeypatch.setattr(tracking, "wandb_key_refusal", lambda: None)  # (a server that answers takes the key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.internal:8080")
    asked = []

    def no_network(address, timeout=None):
        asked.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    tracking.wandb_reachable.cache_clear()
    try:
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == "offline"
        assert asked == [("wandb.internal", 8080)] and "does not answer: logging offline" in caplog.text
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == "offline"  # the stage asks again after preflight
        assert caplog.text.count("does not answer: logging offline") == 1  # said once (align export said it twice)
        assert tracking.wandb_mode(RunConfig(wandb="online")) == "online"  # asked for: as asked (and not probed)
        assert len(asked) == 1
        # behind a proxy wandb goes through it: taken as reachable, the direct connection never tried
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
        tracking.wandb_reachable.cache_clear()
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == "online" and len(asked) == 1
        # a name lookup that hangs is waited for no longer than the probe's timeout
        monkeypatch.delenv("HTTP_PROXY")
        def hangs(address, timeout=None):
            time.sleep(30)
            raise OSError("timed out")  # as a resolver that gives up would (None has no close: a thread's traceback)

        monkeypatch.setattr(socket, "create_connection", hangs)
        tracking.wandb_reachable.cache_clear()
        started = time.monotonic()
        assert tracking.wandb_reachable(timeout=0.5) is False and time.monotonic() - started < 5
    finally:
        tracking.wandb_reachable.cache_clear()


def test_wandb_auto_with_a_key_the_server_refuses_logs_offline_and_says_so_once(wandb_server, caplog):
    """A key set but refused by the server (401): auto went online, and wandb.init failed with "user is not logged
    in", for eval and sample after all their work. The server is asked, once a process, as `wandb login --verify`
    asks; the stage logs offline with one warning. Only a clear refusal counts: a key taken, or a server in
    trouble (a 500), leaves auto online, as before."""
    import base64

    from align import tracking
    from align.config import RunConfig

    assert tracking.wandb_key_refusal() == "HTTP 401: user is not logged in"
    for _ in range(3):  # the preflight, the trainer's arguments, the stage's run: one warning
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == "offline"
    assert caplog.text.count("refuses the key in WANDB_API_KEY (HTTP 401: user is not logged in): logging "
                             "offline") == 1, caplog.text
    assert wandb_server.asked == [("/graphql", "Basic " + base64.b64encode(b"api:" + b"x" * 40).decode())]
    assert tracking.wandb_mode(RunConfig(wandb="online")) == "online"  # asked for: as asked (preflight refuses it)
    for answer, mode in (((200, {"data": {"viewer": {"id": "VXNlcjox"}}}), "online"),
                         ((200, {"data": {"viewer": None}}), "offline"),  # no user by this key (wandb's own reading)
                         ((403, {"errors": [{"message": "permission denied"}]}), "offline"),
                         ((500, {"errors": [{"message": "internal error"}]}), "online")):
        wandb_server.answer = answer
        tracking.wandb_key_refusal.cache_clear()
        assert tracking.wandb_mode(RunConfig(wandb="auto")) == mode, answer
    # no key: nothing asked
    wandb_server.asked.clear()
    tracking.wandb_key_refusal.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY")
        mp.setenv("NETRC", "/nonexistent/netrc")
        assert tracking.wandb_key_refusal() is None and tracking.wandb_mode(RunConfig(wandb="auto")) == "offline"
    assert wandb_server.asked == []

def test_the_simulated_annotator_ranked_every_task_through_the_store(run):
    from align.labeling.store import Store

    rows = Store(f"sqlite:///{run / 'labels.db'}").submitted_rankings()
    assert len(rows) == 10 and all(r["batch"] == "round-0" and len(r["ranks"]) == 3 for r in rows)
    for r in rows:  # the scorer's order: a reply with thanks never ranks below one without
        thanks = ["thanks" in x["text"].lower() for x in r["responses"]]
        for i in range(3):
            for j in range(3):
                if thanks[i] and not thanks[j]:
                    assert r["ranks"][i] < r["ranks"][j]


def test_the_report_links_each_stage_to_its_folder_and_its_offline_wandb_run(run):
    """The report named no W&B run anywhere: which of the offline-run-* folders was the reward model's took
    reading each. Each stage's manifest records the run it opened; the report links its folder and says the
    `wandb sync` that uploads it."""
    page = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    for stage, folder in [("sft", "sft"), ("sample", "sample"), ("export", "preferences"), ("reward", "reward"),
                          ("dpo", "dpo"), ("eval", "eval")]:
        opened = manifest(run / folder)["wandb"]
        where = Path(opened["folder"])
        assert opened["mode"] == "offline" and opened["url"] is None and where.name.endswith(opened["id"])
        assert where.parent == run / "wandb" and (where / f"run-{opened['id']}.wandb").is_file(), stage
        assert f"<a href='wandb/{where.name}'>{where.name}</a>" in page, stage
        assert f"<a href='{folder}/'>" in page and f"wandb sync {where}" in md, stage
    ids = [manifest(run / f)["wandb"]["id"] for f in ("sft", "sample", "preferences", "reward", "dpo", "eval")]
    assert len(set(ids)) == len(ids)  # each stage its own run, not the one opened before it


def test_wandb_offline_runs_read_back_with_their_keys_and_lineage(run):
    runs = {}
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(folder)],
                             capture_output=True, text=True, check=True)
        info = json.loads(out.stdout)
        runs[info["name"].split("/")[-1]] = info
    assert set(runs) >= {"sft", "sample", "export", "reward", "dpo", "eval"}
    assert all(info["state"] == "finished" for info in runs.values())
    assert "train/loss" in runs["sft"]["summary"] and "eval/loss" in runs["sft"]["summary"]
    # the kept (best) step's held-out loss, as align.json has it, not the Trainer's last evaluation
    assert runs["sft"]["summary"]["eval/loss"] == pytest.approx(manifest(run / "sft")["metrics"]["eval_loss"])
    assert "eval_accuracy" in runs["reward"]["summary"]
    # Every interval as two numbers (a list reached no summary): the reward model's, DPO's and each win-rate's
    low, high = manifest(run / "reward")["metrics"]["eval_accuracy_ci"]
    assert (runs["reward"]["summary"]["eval_accuracy_ci_low"], runs["reward"]["summary"]["eval_accuracy_ci_high"]) \
        == pytest.approx((low, high))
    low, high = manifest(run / "dpo")["metrics"]["heldout_accuracy_ci"]
    assert (runs["dpo"]["summary"]["heldout/accuracy_ci_low"], runs["dpo"]["summary"]["heldout/accuracy_ci_high"]) \
        == pytest.approx((low, high))
    # TRL's held-out accuracy, a mean of per-batch means, no longer stands in the summary as the accuracy
    assert "eval/rewards/accuracies" not in runs["dpo"]["summary"] and "eval/logps/chosen" not in runs["dpo"]["summary"]
    assert "eval/rewards/accuracies_batch_mean" in runs["dpo"]["summary"] and "eval/loss" in runs["dpo"]["summary"]
    win = "dpo/scorer:known_scorers:thanks_then_short/win_rate"
    low, high = manifest(run / "eval")["policies"]["dpo"]["scorer:known_scorers:thanks_then_short/win_rate_ci"]
    assert (runs["eval"]["summary"][f"{win}_ci_low"], runs["eval"]["summary"][f"{win}_ci_high"]) == pytest.approx((low, high))
    judged = "dpo/scorer:known_scorers:thanks_then_short"
    assert runs["eval"]["summary"][f"{judged}/prompts"] == 8 and f"{judged}/ties" in runs["eval"]["summary"]
    # The probes and the annotator reliability reach W&B as summary keys (and tables).
    assert "probe/gate_rate" in runs["reward"]["summary"] and "probe/thanks_end/flip_rate" in runs["reward"]["summary"]
    assert "probe/thanks_end/unsupported_flip_rate" in runs["reward"]["summary"]  # the pipeline names its scorer
    annotator = "sim-known-scorers-thanks-then-short-0"
    assert runs["export"]["summary"][f"reliability/{annotator}/accuracy"] == pytest.approx(0.7)  # nobody checks it
    assert runs["reward"]["summary"]["probes"]["_type"] == "table-file" and runs["reward"]["summary"]["probes"]["nrows"] == 8
    assert runs["export"]["summary"]["reliability"]["_type"] == "table-file"
    assert any(k.startswith("train/rewards/") for k in runs["dpo"]["summary"])
    assert "dpo/scorer:known_scorers:thanks_then_short/win_rate" in runs["eval"]["summary"]
    # Lineage: the preference data that trained the reward model came from the SFT policy's samples.
    name = run.name
    lineage = {stage: json.loads(json.dumps(runs[stage]["config"].get("lineage"))) for stage in runs}
    assert lineage["reward"]["parents"] == {"sft": f"{name}-sft", "preferences": f"{name}-export"}
    assert lineage["export"]["parents"] == {"samples": f"{name}-sample"}
    assert lineage["sample"]["parents"] == {"policy": f"{name}-sft"}
    assert lineage["eval"]["parents"] == {"sft": f"{name}-sft", "dpo": f"{name}-dpo",
                                          "reward_model": f"{name}-reward"}  # the policies and their judge


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_report_renders_in_a_browser_with_its_plots(run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((run / "report.html").as_uri())
        sections = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.naturalWidth])")
        headline = page.inner_text(".headline")
        glance = page.eval_on_selector_all(".glance tr", "rows => rows.slice(1).map(r => r.innerText.split('\\t'))")
        cautions = page.inner_text(".cautions")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        # each stage's name and time on one line: the outcome column wraps, not "preferences"
        lines = page.eval_on_selector_all(".glance tr td:not(:last-child)", "tds => tds.map(td => { "
                                          "const r = document.createRange(); r.selectNodeContents(td); "
                                          "return new Set([...r.getClientRects()].map(b => b.top)).size })")
        if os.environ.get("ALIGN_SCREENSHOTS"):
            page.screenshot(path=str(REPO / "docs/img/report-tiny.png"))
        browser.close()
    assert sections[:6] == ["sft", "sample", "preferences", "reward", "dpo", "eval"]
    alts = [a for a, _ in images]
    assert {"sft plot", "reward plot", "dpo plot", "calibration", "win-rate"} <= {a.split(":")[0] for a in alts}
    assert all(width > 100 for _, width in images), images  # decoded PNGs, not broken images
    assert "dpo" in headline and "win-rate" in headline
    # The first screen: every stage's outcome from its real manifest, and eval's prompts named as trained on
    assert [stage for stage, _, _ in glance] == STAGE_DIRS and all(outcome.strip() for *_, outcome in glance), glance
    assert all(re.fullmatch(r"\d+:\d\d", clock) for _, clock, _ in glance), glance  # each stage's wall time
    outcomes = {stage: outcome for stage, _, outcome in glance}
    assert outcomes["reward"].startswith("held-out accuracy") and "dpo vs sft" in outcomes["eval"]
    assert "eval: dpo was trained on 8 of the 8 eval prompts" in cautions
    assert overflow <= 0  # no table wider than the page
    assert set(lines) <= {0, 1}, lines


def test_killed_pipeline_reruns_only_what_is_unfinished(tiny_model, data, run, tmp_path):
    """Kill after the reward model is written; a rerun skips sft..reward and ends where the unkilled did."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", *pipeline_args(tiny_model, data, run_dir, "disabled")],
                            cwd=REPO / "tests", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run_dir / "reward" / "align.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the pipeline ended before the reward stage"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "eval" / "align.json").exists()
    written = {s: (run_dir / s / "align.json").stat().st_mtime_ns for s in ["sft", "sample", "preferences", "reward"]}

    assert align(pipeline_args(tiny_model, data, run_dir, "disabled")) == 0
    for stage, mtime in written.items():
        assert (run_dir / stage / "align.json").stat().st_mtime_ns == mtime, f"{stage} was redone"
    for stage in STAGE_DIRS:
        assert manifest(run_dir / stage)["metrics"].keys() == manifest(run / stage)["metrics"].keys()
    # Same seeds, same data: the rerun ends where the unkilled run did.
    theirs, ours = manifest(run / "eval")["policies"], manifest(run_dir / "eval")["policies"]
    key = "scorer:known_scorers:thanks_then_short/mean"
    assert ours["dpo"][key] == pytest.approx(theirs["dpo"][key])
    assert ours["sft"][key] == pytest.approx(theirs["sft"][key])
    shutil.rmtree(run_dir, ignore_errors=True)


def test_a_pipeline_stopped_in_training_says_the_key_it_takes_to_resume_and_resumes(tiny_model, data, tmp_path,
                                                                                     monkeypatch, caplog, capsys):
    """Stopped after sft's checkpoint-4, the pipeline names the key it takes (sft.train.resume_from_checkpoint;
    `train.` alone is refused as an unknown key), and run again with it, sft goes on from checkpoint-4. Run again
    to fewer steps than that, the refusal names the keys as the pipeline takes them too (sft.train.max_steps)."""
    from align.training import MetricsJSONL

    args = ["pipeline", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled", "stages=[sft]",
            f"sft.model.name={tiny_model}", f"sft.data.path={data}", "sft.train.max_steps=8", "sft.train.eval_steps=4",
            "sft.model.quantize=false", "sft.model.max_length=128"]
    step_end = MetricsJSONL.on_step_end

    def stopped(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(MetricsJSONL, "on_step_end", stopped)
    assert align(args) == 130
    assert "holds checkpoints; sft.train.resume_from_checkpoint=latest continues from them" in caplog.text
    monkeypatch.undo()
    capsys.readouterr()
    assert align([*args, "sft.train.resume_from_checkpoint=latest", "sft.train.max_steps=3"]) == 2
    assert ("sft.train.resume_from_checkpoint=latest: its newest checkpoint, "
            f"{tmp_path / 'run' / 'sft' / 'checkpoints' / 'checkpoint-4'} (step 4), is past sft.train.max_steps=3"
            in capsys.readouterr().err)
    caplog.clear()
    caplog.set_level("INFO", logger="align.artifacts")
    assert align([*args, "sft.train.resume_from_checkpoint=latest"]) == 0
    assert f"resuming from {tmp_path / 'run' / 'sft' / 'checkpoints' / 'checkpoint-4'}" in caplog.text
    ends = [r["step"] for r in read_jsonl(tmp_path / "run" / "sft" / "metrics.jsonl") if "train_runtime" in r]
    assert ends == [8] and manifest(tmp_path / "run" / "sft")["metrics"]["global_step"] == 8


def test_one_pipeline_at_a_time_in_a_run_dir_and_one_process_per_stage_folder(tiny_model, data, tmp_path, capsys):
    """A second pipeline in a run directory is refused at once, naming the one running there (it set aside the
    first one's live checkpoints and trained under it), and so is a stage whose folder another process writes;
    another stage of the same run (reward beside dpo) still runs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"align pipeline (pid {os.getpid()})".encode())
        print("locked", flush=True)
        time.sleep(60)
        """), str(run_dir / ".align.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["pipeline", f"run.dir={run_dir}", "run.wandb=disabled", "stages=[sft]", f"sft.model.name={tiny_model}",
                f"sft.data.path={data}", "sft.train.max_steps=2", "sft.model.quantize=false", "sft.model.max_length=128"]
        assert align(args) == 1
        err = capsys.readouterr().err
        assert f"align pipeline: {run_dir} is in use by align pipeline (pid {holder.pid})" in err, err
        assert sorted(p.name for p in run_dir.iterdir()) == [".align.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert align(args) == 0  # its stages' locks name it: "align pipeline, at sft (pid N)" is the process to wait for
    assert (run_dir / "sft" / ".align.lock").read_text() == f"align pipeline, at sft (pid {os.getpid()})\n"
    shutil.rmtree(run_dir / "sft")
    sft = ["sft", f"run.dir={run_dir}", "run.wandb=disabled", f"model.name={tiny_model}", f"data.path={data}",
           "train.max_steps=2", "model.quantize=false", "model.max_length=128"]
    import fcntl

    for stage in ("sft", "reward"):
        (run_dir / stage).mkdir()
    # Another process writing sft/, then reward/ (an open file of its own here: flock's unit is the open file)
    with open(run_dir / "sft" / ".align.lock", "w") as sft_lock, open(run_dir / "reward" / ".align.lock", "w") as beside:
        fcntl.flock(sft_lock, fcntl.LOCK_EX)
        assert align(sft) == 1
        assert f"{run_dir / 'sft'} is in use by" in capsys.readouterr().err
        fcntl.flock(sft_lock, fcntl.LOCK_UN)
        fcntl.flock(beside, fcntl.LOCK_EX)
        assert align(sft) == 0 and (run_dir / "sft" / "align.json").is_file()


def test_grpo_is_found_evaluated_and_skipped_on_rerun(tiny_model, data, tmp_path):
    """ppo.algo=grpo writes grpo/ (the registry's folder): a rerun skips it, and eval compares it with sft
    in both rounds. (The pipeline used to look for ppo/: it redid GRPO on every rerun, and round 1's eval
    asked for round-1/ppo and stopped.)"""
    run_dir = tmp_path / "run"
    args = ["pipeline", f"run.dir={run_dir}", "run.wandb=disabled", "stages=[sft, ppo, eval]", "rounds=2",
            "scorer=known_scorers:thanks_then_short",
            f"sft.model.name={tiny_model}", f"sft.data.path={data}", "sft.train.max_steps=4", "sft.model.quantize=false",
            "sft.model.max_length=128", "sft.data.eval_fraction=0",
            "ppo.algo=grpo", "ppo.scorer=known_scorers:thanks_then_short", f"ppo.prompts={data}", "ppo.num_prompts=8",
            "ppo.train.max_steps=1", "ppo.rl.rollout_prompts=4", "ppo.rl.num_generations=2",
            "ppo.generation.max_new_tokens=8", "ppo.model.quantize=false",
            f"eval.prompts={data}", "eval.num_prompts=4", "eval.generation.max_new_tokens=8", "eval.bootstrap=50"]
    assert align(args) == 0
    rounds = [run_dir, run_dir / "round-1"]
    for folder in rounds:
        assert manifest(folder / "grpo")["stage"] == "grpo" and not (folder / "ppo").exists()
        assert set(manifest(folder / "eval")["policies"]) == {"sft", "grpo"}
        assert manifest(folder / "eval")["parents"]["grpo"]["path"] == str(folder / "grpo")
    written = {f / s: (f / s / "align.json").stat().st_mtime_ns for f in rounds for s in ("grpo", "eval")}

    assert align(args) == 0
    for folder, mtime in written.items():
        assert (folder / "align.json").stat().st_mtime_ns == mtime, f"{folder} was redone"


def test_human_labelling_stops_waiting_when_the_app_exits(tmp_path, monkeypatch):
    """label=human starts `align label` on the store sample wrote (--db when it is not the default) and
    waits for the batch; an app that exits (refused, or stopped) ends the wait with its exit code."""
    from align.config import PipelineConfig, load_config
    from align.labeling.store import Store
    from align.recipes import pipeline

    url = f"sqlite:///{tmp_path / 'team.db'}"
    store = Store(url)
    store.add_user("ann", "pw-for-ann", admin=True)
    store.add_tasks("round-0", [{"prompt": "Where is Sync?", "responses": ["Settings.", "No idea."]}], source={})
    cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path / 'run'}", "label=human", f"sample.store={url}"])
    started, popen, sleep = [], subprocess.Popen, time.sleep

    def app(args, **kw):
        started.append(args)
        return popen([sys.executable, "-c", "import sys; sys.exit(3)"])

    monkeypatch.setattr(pipeline.subprocess, "Popen", app)
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: sleep(0.1))
    from align import StageError

    with pytest.raises(StageError, match=r"the labelling app exited \(code 3\) with 1 rankings of batch 'round-0'"):
        pipeline.label(cfg, tmp_path / "run", "round-0")
    assert started[0][-2:] == ["--db", url]
    assert started[0][1:4] == ["-P", "-m", "align.cli"]  # no ./align/ of the user's in its way


def test_human_labelling_stops_waiting_for_tasks_every_annotator_skipped(tmp_path, monkeypatch, capsys):
    """A lone annotator skips a task: nobody is left to rank it, and the pipeline waited for it for ever ("1 rankings
    still to do") while the app said "All done". It goes on, saying so, and does not start the app for it again."""
    from align.config import PipelineConfig, load_config
    from align.labeling import handlers
    from align.labeling.store import Store
    from align.recipes import pipeline

    store = Store(f"sqlite:///{tmp_path / 'run' / 'labels.db'}")
    store.add_user("ann", "pw-for-ann", admin=True)
    store.add_tasks("round-0", [{"prompt": f"Where is Sync? {i}", "responses": ["Settings.", "No idea."]}
                                for i in range(2)], source={})
    cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path / 'run'}", "label=human"])
    apps, popen, sleep = [], subprocess.Popen, time.sleep
    monkeypatch.setattr(pipeline.subprocess, "Popen",
                        lambda args, **kw: apps.append(popen([sys.executable, "-c", "import time; time.sleep(60)"])) or apps[-1])
    ann = handlers.sign_in(store, "ann", "pw-for-ann")

    def annotator_at_work(seconds):  # the wait's first 10 s: ann ranks one task, skips the other
        if seconds != 10:  # Popen.wait's
            return sleep(seconds)
        assert handlers.next_task(store, ann) is not None, "the pipeline still waits for the skipped task"
        while (task := handlers.next_task(store, ann)) is not None:
            if task["prompt"].endswith("0"):
                handlers.submit(store, ann, task["task_id"], [1, 2])
            else:
                handlers.skip(store, ann, task["task_id"])

    monkeypatch.setattr(pipeline.time, "sleep", annotator_at_work)
    pipeline.label(cfg, tmp_path / "run", "round-0")
    assert "1 rankings of batch 'round-0' are on tasks every annotator skipped: going on" in capsys.readouterr().out
    assert len(apps) == 1 and apps[0].wait(timeout=30) is not None  # the app stopped
    pipeline.label(cfg, tmp_path / "run", "round-0")  # again (a rerun): no app started to wait for nobody
    assert len(apps) == 1 and "every annotator skipped" in capsys.readouterr().out


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_waiting_for_human_labels_ctrl_c_goes_on_and_sigterm_ends_the_pipeline(stop, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the pipeline waits for the batch goes on with the rankings so far; SIGTERM (a `kill`, a
    scheduler's stop) ends the pipeline as it ends every stage (exit 143). It went on to export and train on a
    half-labelled batch. Either way the labelling app is stopped."""
    from align.cli import Terminated
    from align.config import PipelineConfig, load_config
    from align.labeling.store import Store
    from align.recipes import pipeline

    store = Store(f"sqlite:///{tmp_path / 'run' / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "Where is Sync?", "responses": ["Settings.", "No idea."]}], source={})
    cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path / 'run'}", "label=human"])
    apps, popen, sleep = [], subprocess.Popen, time.sleep
    monkeypatch.setattr(pipeline.subprocess, "Popen",
                        lambda args, **kw: apps.append(popen([sys.executable, "-c", "import time; time.sleep(60)"]))
                        or apps[-1])

    def signalled(seconds):  # the signal arrives in the wait (once: Popen.wait sleeps too)
        monkeypatch.setattr(pipeline.time, "sleep", sleep)
        raise Terminated if stop == "sigterm" else KeyboardInterrupt

    monkeypatch.setattr(pipeline.time, "sleep", signalled)
    if stop == "sigterm":
        with pytest.raises(Terminated):
            pipeline.label(cfg, tmp_path / "run", "round-0")
        assert "going on with the rankings so far" not in capsys.readouterr().out
    else:
        pipeline.label(cfg, tmp_path / "run", "round-0")
        assert "stopped waiting; going on with the rankings so far" in capsys.readouterr().out
    assert apps[0].wait(timeout=10) is not None


def test_the_labelling_app_stops_when_the_pipeline_that_started_it_is_killed(tmp_path):
    """A pipeline killed by SIGKILL while it waits for human labels never runs the code that stops its app: the app
    stops itself (its parent gone), instead of holding port 7860 so that every rerun's app failed to start."""
    import socket

    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'run' / 'labels.db'}")
    store.add_user("ann", "pw-for-ann", admin=True)
    store.add_tasks("round-0", [{"prompt": "Where is Sync?", "responses": ["Settings.", "No idea."]}], source={})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The pipeline's own label(), its Popen given a free port and the app's pid written down
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys
        from align.config import PipelineConfig, load_config
        from align.recipes import pipeline
        popen = subprocess.Popen
        def app(args, **kw):
            child = popen([*args, "--port", "{port}"], **kw)
            print(child.pid, flush=True)
            return child
        pipeline.subprocess.Popen = app
        pipeline.label(load_config(PipelineConfig, None, ["run.dir={tmp_path / 'run'}", "label=human"]),
                       None, "round-0")
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = int(parent.stdout.readline())
        deadline = time.time() + 120
        while True:  # the app up and listening
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert parent.poll() is None and time.time() < deadline, "the labelling app did not start"
            time.sleep(0.5)
    finally:
        parent.kill()
        parent.wait()

    def gone(pid: int) -> bool:  # exited (a zombie no one reaps yet counts: it holds no port)
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
        except (FileNotFoundError, ProcessLookupError):
            return True

    deadline = time.time() + 30
    while not gone(child):
        if time.time() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the labelling app outlived the pipeline that started it")
        time.sleep(0.2)


def test_a_rerun_redoes_what_its_inputs_changed_and_nothing_else(tiny_model, data, run, monkeypatch, capsys,
                                                                  tmp_path, caplog):
    """The rerun rule, on the finished run (no stage runs here: run_stage records what would):
    W&B settings change nothing; an edited data file redoes the stages that read it; a retrained reward
    model redoes eval, which it judges; a ranked task made gold redoes the export; a batch ranked by
    another scorer is refused, not reused."""
    import align.recipes.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)

    def rerun(*extra: str) -> list[str]:
        ran.clear()
        assert align([*pipeline_args(tiny_model, data, run), *extra]) == 0
        return list(ran)

    assert rerun() == []
    assert rerun("run.wandb=disabled", "dpo.train.resume_from_checkpoint=latest") == []
    with monkeypatch.context() as m:  # the same run.dir spelt relative: the same run (it redid every stage)
        m.chdir(run.parent)
        ran.clear()
        assert align(pipeline_args(tiny_model, data, Path(run.name))) == 0 and ran == []
    with caplog.at_level(logging.INFO, logger="align.recipes.pipeline"):
        assert rerun("dpo.train.max_steps=5") == ["dpo"]  # (eval follows once dpo/ is newer: see the reward model)
    assert re.search(r"── dpo: made with other settings \(train\.max_steps: \d+ → 5\): making it again",
                     caplog.text), caplog.text
    text = data.read_text()
    try:
        data.write_text(text + json.dumps({"instruction": "Ticket 99: a new one?", "input": "", "output": "Yes."}) + "\n")
        assert rerun() == ["sft", "sample", "eval"]  # sft's data, sample's and eval's prompts (the same file here)
    finally:
        data.write_text(text)
    reward = run / "reward" / "align.json"
    before, text = reward.stat(), reward.read_text()
    try:  # the reward model retrained (its manifest's stamp; its mtime alone, a copy's, is not a new model)
        os.utime(reward, (before.st_atime, time.time() + 60))
        assert rerun() == []
        reward.write_text(json.dumps({**json.loads(text), "created": "2999-01-01T00:00:00+0000"}))
        with caplog.at_level(logging.INFO, logger="align.recipes.pipeline"):
            assert rerun() == ["eval"]
        assert (f"── eval: it read its reward_model as made at {json.loads(text)['created']}; {run / 'reward'} was "
                "made again at 2999-01-01T00:00:00+0000: making it again") in caplog.text
    finally:
        reward.write_text(text)
        os.utime(reward, ns=(before.st_atime_ns, before.st_mtime_ns))
    # A ranked task made gold (its rankings now score the annotators, not train): the same count of
    # rankings, another export. (The count the pipeline compared before kept the stale one.)
    import sqlite3

    from align.labeling.store import Store

    store = Store(f"sqlite:///{run / 'labels.db'}")
    task = store.submitted_rankings()[0]
    try:
        store.add_gold(task["task_id"], task["ranks"])
        assert rerun() == ["export"]
    finally:
        with sqlite3.connect(run / "labels.db") as db:
            db.execute("UPDATE tasks SET is_gold = 0")
            db.execute("DELETE FROM gold")
    assert rerun() == []
    # A stage whose weights are gone is not done, whatever its manifest says (it was trusted, and eval or serve
    # failed later); nor one whose manifest is half a file (a JSONDecodeError traceback, for good)
    adapter = next((run / "dpo").glob("adapter_model.safetensors"))
    adapter.rename(tmp_path / adapter.name)
    try:
        assert rerun() == ["dpo"]
    finally:
        (tmp_path / adapter.name).rename(adapter)
    try:
        reward.write_text(text[:300])
        assert rerun() == ["reward", "eval"]  # (eval: its reward model is not the one it read)
    finally:
        reward.write_text(text)
        os.utime(reward, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert rerun() == []
    # The run copied elsewhere is the same run: nothing to make again (every stage was, from sft), with its times
    # kept or not: cp -r stamps the files anew as it walks them, and eval's align.json came out older than dpo's
    # (reward, dpo and eval were made again, without a word)
    shutil.copytree(run, tmp_path / "copy", symlinks=True)
    subprocess.run(["cp", "-r", str(run), str(tmp_path / "cp-r")], check=True)
    for age, stage in enumerate(STAGE_DIRS):  # each stage's manifest older than its parents'
        os.utime(tmp_path / "cp-r" / stage / "align.json", (time.time() - 60 * age, time.time() - 60 * age))
    for copy in ("copy", "cp-r"):
        ran.clear()
        assert align(pipeline_args(tiny_model, data, tmp_path / copy)) == 0 and ran == [], copy
    ran.clear()
    assert align([*pipeline_args(tiny_model, data, run), "scorer=length"]) != 0
    assert "was ranked 'simulated: known_scorers:thanks_then_short'" in capsys.readouterr().err and ran == []


def test_a_copied_run_remakes_in_the_copy_what_follows_a_stage_remade_there(tiny_model, data, run, tmp_path,
                                                                             monkeypatch):
    """A copy's stages compare themselves with their parents in the copy: they read the original's (absolute in
    their manifests, and there), so an export remade in the copy left reward, dpo and eval "already done" there,
    while the same change in place remade them. The original is not touched."""
    import align.recipes.pipeline as pipeline

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    original = {p: p.stat().st_mtime_ns for p in run.glob("*/align.json")}
    ran, run_stage = [], pipeline.run_stage
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or run_stage(name, cfg))
    assert align([*pipeline_args(tiny_model, data, copy, wandb="disabled"), "export.ties=margin0"]) == 0
    assert ran == ["export", "reward", "dpo", "eval"]
    assert manifest(copy / "eval")["parents"]["dpo"]["path"] == str(copy / "dpo")
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/align.json")} == original


def test_the_pipelines_summary_is_printed_by_rank_0_alone(tiny_model, data, run, monkeypatch, capsys):
    """Under accelerate launch every process runs the pipeline: the summary and the glance came once a process."""
    assert align(pipeline_args(tiny_model, data, run, wandb="disabled")) == 0
    assert "pipeline finished in" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    assert align(pipeline_args(tiny_model, data, run, wandb="disabled")) == 0
    assert "pipeline finished in" not in capsys.readouterr().out


def test_evals_reward_model_is_named_so_a_reward_stage_added_or_dropped_reruns_eval(tiny_model, data, run,
                                                                                    monkeypatch):
    """The pipeline names eval's judge (<round>/reward, or none): with reward dropped from `stages`, eval reruns
    judged by no reward model, not by the reward/ left in run.dir (it was "already done" both ways: eval's
    default is whichever reward/ the folder holds). An eval recorded before, with no judge named, is unchanged."""
    import align.recipes.pipeline as pipeline
    from align.config import PipelineConfig, load_config

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append((name, cfg)) or Path(cfg.run.dir) / name)
    assert manifest(run / "eval")["config"]["reward_model"] == str(run / "reward")
    assert align([*pipeline_args(tiny_model, data, run), "stages=[sft, sample, label, export, dpo, eval]"]) == 0
    assert [(name, cfg.reward_model) for name, cfg in ran] == [("eval", "none")]
    # how each pipeline names it: ppo's own reward model (or its default, reward/), none with a scorer
    for extra, judge in ((["stages=[sft, ppo, eval]", "ppo.reward_model=/rm"], "/rm"),
                         (["stages=[sft, ppo, eval]"], str(run / "round-1" / "reward")),
                         (["stages=[sft, ppo, eval]", "ppo.scorer=length"], "none"),
                         (["stages=[sft, dpo, eval]", "eval.reward_model=/rm2"], "/rm2")):
        cfg = load_config(PipelineConfig, None, [f"run.dir={run}", *extra])
        assert cfg.eval_reward_model(run / "round-1") == judge, extra
    # An eval of before: reward_model unset in its config, judged by run/reward (a parent): the same eval
    path = run / "eval" / "align.json"
    text, times = path.read_text(), path.stat()
    try:
        old = json.loads(text)
        old["config"]["reward_model"] = None
        path.write_text(json.dumps(old))
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        ran.clear()
        assert align(pipeline_args(tiny_model, data, run)) == 0 and ran == []
    finally:
        path.write_text(text)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_a_human_eval_from_before_eval_store_is_not_redone_for_the_key_alone(tiny_model, data, run, monkeypatch):
    """eval.store is new: a human=true eval recorded before it names no store, and its A/B tasks went to the run's
    labels.db, the store the pipeline passes now. Its pipeline skips it (it was redone, every answer generated
    again, for the missing key); one recorded with another store is redone."""
    import align.recipes.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    path = run / "eval" / "align.json"
    text, times = path.read_text(), path.stat()
    try:
        for store, redone in ((None, []), ("sqlite:////elsewhere/labels.db", ["eval"])):
            old = json.loads(text)
            old["config"]["human"] = True
            old["config"].pop("store", None)
            if store:
                old["config"]["store"] = store
            path.write_text(json.dumps(old))
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
            ran.clear()
            assert align([*pipeline_args(tiny_model, data, run), "eval.human=true"]) == 0 and ran == redone, store
    finally:
        path.write_text(text)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_a_human_eval_is_redone_for_new_verdicts_and_they_remake_nothing_else(tiny_model, data, run, monkeypatch):
    """A human=true eval's board counts the A/B verdicts there are when it runs: its pipeline said "already done"
    after people judged them, and the board stayed at 0 verdicts. It is redone when they change; they remake
    no export (under dawid_skene they did, and dpo with it: a new version, on which every verdict was stale)."""
    import sqlite3

    import align.recipes.pipeline as pipeline
    from align.labeling.simulate import simulate
    from align.labeling.store import Store

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    path = run / "eval" / "align.json"
    text, times = path.read_text(), path.stat()
    store = Store(f"sqlite:///{run / 'labels.db'}")
    try:
        old = json.loads(text)
        old["config"]["human"] = True  # a human=true eval that read no verdicts (recorded before they were)
        path.write_text(json.dumps(old))
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert align([*pipeline_args(tiny_model, data, run), "eval.human=true"]) == 0 and ran == []
        store.add_tasks("eval-dpo-vs-sft", [{"prompt": "Ticket 1: how do I export?",
                                             "responses": ["Thanks for asking! Open Settings.", "No."]}],
                        kind="pairwise")
        assert simulate(store, "known_scorers:thanks_then_short", batch="eval-dpo-vs-sft") == 1
        assert align([*pipeline_args(tiny_model, data, run), "eval.human=true"]) == 0 and ran == ["eval"]
        ran.clear()  # and once eval recorded them, not again
        path.write_text(json.dumps({**old, "rankings_sha256": pipeline.verdicts_state(store.url)}))
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert align([*pipeline_args(tiny_model, data, run), "eval.human=true"]) == 0 and ran == []
    finally:
        path.write_text(text)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        with sqlite3.connect(run / "labels.db") as db:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("DELETE FROM tasks WHERE batch LIKE 'eval-%'")
    assert [r for r in store.submitted_rankings() if r["batch"].startswith("eval-")] == []


def test_a_stage_recorded_before_an_upgrade_is_not_redone_for_what_did_not_change(tiny_model, data, run, monkeypatch):
    """Keys added or defaults changed since a stage ran rerun it, and all after it, only where what it made
    would change: export.reliability_batches (absent from an older export; what it changes, which rankings the
    estimate reads, the export's rankings fingerprint covers), and a reward model recorded with lora.dropout
    0.05, which TRL ran without dropout (the default is 0 now, as it ran)."""
    import align.recipes.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    saved = {}
    try:
        for folder in ("preferences", "reward"):
            path = run / folder / "align.json"
            saved[path] = (path.read_text(), path.stat())
        export, reward = (json.loads(saved[run / f / "align.json"][0]) for f in ("preferences", "reward"))
        assert export["config"].pop("reliability_batches") is None
        assert export["config"].pop("flagged") == "keep"
        assert reward.pop("lora_dropout_applied") is True
        reward["config"]["lora"]["dropout"] = 0.05
        for folder, manifest in (("preferences", export), ("reward", reward)):
            path = run / folder / "align.json"
            path.write_text(json.dumps(manifest))
            os.utime(path, ns=(saved[path][1].st_atime_ns, saved[path][1].st_mtime_ns))
        # (reward and dpo would rerun here only because the export folder they hashed as their data now holds
        # this edited align.json; an export written before the key was there is unedited: data hashes left out)
        monkeypatch.setattr(pipeline, "_inputs", lambda m: [])
        assert align(pipeline_args(tiny_model, data, run)) == 0 and ran == []
        assert align([*pipeline_args(tiny_model, data, run), "export.reliability_batches=[round-0]"]) == 0
        assert ran == []  # the same rankings read: the same export
        assert align([*pipeline_args(tiny_model, data, run), "reward.lora.dropout=0.05"]) == 0
        assert ran == ["reward"]  # asked for now, it is applied: another model
    finally:
        for path, (text, times) in saved.items():
            path.write_text(text)
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_an_export_recorded_before_flagged_reruns_only_where_a_ranking_is_flagged(tiny_model, data, run, monkeypatch):
    """export.flagged=keep (the default) keeps the pairs of a ranking flagged all-bad or unsafe, which an older
    align dropped: an export it recorded (no `flagged` key) is made again where a ranking it read is flagged, and
    only there (the test above: without one nothing reruns), and not when flagged=drop asks for what it did."""
    import sqlite3

    import align.recipes.pipeline as pipeline
    from align.labeling.export import rankings_fingerprint
    from align.labeling.store import Store

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    monkeypatch.setattr(pipeline, "_inputs", lambda m: [])
    path = run / "preferences" / "align.json"
    text, times = path.read_text(), path.stat()
    with sqlite3.connect(run / "labels.db") as db:
        (first, flags), = db.execute("SELECT id, flags FROM rankings WHERE status = 'submitted' ORDER BY id LIMIT 1")
        db.execute("UPDATE rankings SET flags = '[\"unsafe\"]' WHERE id = ?", (first,))
    try:
        store = Store(f"sqlite:///{run / 'labels.db'}")
        old = json.loads(text)
        old["config"].pop("flagged")
        old["rankings_sha256"] = rankings_fingerprint(store.submitted_rankings(), store.gold_answers(),
                                                      batches=old["config"]["batches"], flagged="drop")
        path.write_text(json.dumps(old))
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert align([*pipeline_args(tiny_model, data, run), "export.flagged=drop"]) == 0 and ran == []
        assert align(pipeline_args(tiny_model, data, run)) == 0 and ran[:1] == ["export"]
    finally:
        path.write_text(text)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        with sqlite3.connect(run / "labels.db") as db:
            db.execute("UPDATE rankings SET flags = ? WHERE id = ?", (flags, first))


def test_a_store_that_lost_the_batch_is_sampled_again(tiny_model, data, run, monkeypatch, caplog):
    """labels.db deleted (to label again) or a new store: sample was "already done", label found nothing to rank
    and export failed with "batches: 'round-0' not in the store", with nothing saying how out of it."""
    import shutil

    import align.recipes.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    db = run / "labels.db"
    shutil.copy2(db, run.parent / "labels.db.kept")
    try:
        db.unlink()
        with caplog.at_level("INFO", logger="align.recipes.pipeline"):
            align(pipeline_args(tiny_model, data, run))
        assert ran[:1] == ["sample"] and "the store holds 0 of the 10 tasks of batch 'round-0'" in caplog.text
    finally:
        shutil.copy2(run.parent / "labels.db.kept", db)
    ran.clear()
    assert align(pipeline_args(tiny_model, data, run)) == 0 and ran == []


def test_sft_on_the_users_data_with_the_shipped_prompts_elsewhere_is_warned(tmp_path, caplog):
    """sft.data.path=mine alone: sample, ppo and eval kept their defaults, the shipped support data's prompts, and
    the loop sampled, rolled out and evaluated on support tickets without a word."""
    from align.config import PipelineConfig, load_config
    from align.recipes.pipeline import warn_shipped_prompts

    mine = tmp_path / "mine.jsonl"
    for extra, said in (([], "sample.prompts and eval.prompts read"),
                        ([f"sample.prompts={mine}"], "but eval.prompts reads"),
                        ([f"sample.prompts={mine}", f"eval.prompts={mine}"], None)):
        cfg = load_config(PipelineConfig, None, [f"run.dir={tmp_path}", f"sft.data.path={mine}", *extra])
        caplog.clear()
        with caplog.at_level("WARNING", logger="align.recipes.pipeline"):
            warn_shipped_prompts(cfg)
        assert (said in caplog.text) if said else caplog.text == "", extra
    caplog.clear()
    warn_shipped_prompts(load_config(PipelineConfig, REPO / "configs/quickstart/pipeline.yaml", []))
    assert caplog.text == ""  # the quickstart: its own data throughout


def test_eval_with_reward_model_none_judges_by_the_scorer_alone(run, data):
    """reward_model=none: no reward-model judge, even with a reward/ in run.dir."""
    from align.config import EvalStageConfig, RunConfig
    from align.recipes.evaluate import judge

    cfg = EvalStageConfig(run=RunConfig(dir=str(run), wandb="disabled"), reward_model="none", scorer="length")
    assert list(judge(cfg, ["Hi?"], {"sft": ["Hello."], "dpo": ["Hello there."]})) == ["scorer:length"]
    from align import StageError

    with pytest.raises(StageError, match="no judge: reward_model=none and no scorer"):
        judge(EvalStageConfig(run=RunConfig(dir=str(run)), reward_model="none"), ["Hi?"], {"sft": ["Hello."]})
    # A score that is no number counts as neither win, tie nor loss: refused, naming the judge, policy and prompt
    cfg = EvalStageConfig(run=RunConfig(dir=str(run), wandb="disabled"), reward_model="none",
                          scorer="known_scorers:nan_when_empty")
    with pytest.raises(StageError, match=r"judge scorer:known_scorers:nan_when_empty gave nan to dpo's answer to "
                                         r"prompt 2 \('Bye\?'\)"):
        judge(cfg, ["Hi?", "Bye?"], {"sft": ["Hello.", "Bye."], "dpo": ["Hello there.", ""]})


def test_a_base_model_saved_over_its_folder_remakes_the_stage_on_it(tiny_model, data, tmp_path, monkeypatch):
    """sft's model.name is a local folder: another model saved into it (same path, same config) is another base,
    and the rerun remakes sft. It was skipped, the old adapter kept, as its data files alone were compared."""
    from safetensors.torch import load_file, save_file

    import align.recipes.pipeline as pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    args = ["pipeline", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled", "stages=[sft]", f"sft.model.name={base}",
            f"sft.data.path={data}", "sft.train.max_steps=2", "sft.model.quantize=false", "sft.model.max_length=128"]
    assert align(args) == 0
    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    assert align(args) == 0 and ran == []
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: 2 * v for k, v in weights.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert align(args) == 0 and ran == ["sft"]


def test_sampling_again_with_other_settings_says_the_batch_keeps_its_tasks(run, data, tmp_path, caplog):
    """The batch's prompts were sampled at k=3: asked again at k=4, sample keeps them (people may have ranked
    them), says so, and its manifest records it rather than seem to have sampled at k=4."""
    args = ["sample", f"run.dir={tmp_path}", f"policy={run / 'sft'}", f"store=sqlite:///{run / 'labels.db'}",
            "batch=round-0", f"prompts={data}", "num_prompts=10", "k=4", "generation.max_new_tokens=12",
            "run.wandb=disabled"]
    assert align(args) == 0
    m = manifest(tmp_path / "sample")
    assert m["metrics"]["new_tasks"] == 0 and m["sampled_otherwise"] == {"tasks": 10, "differ": ["generation", "k"]}
    assert "10 tasks of batch 'round-0' were sampled with other settings" in caplog.text


def test_an_answer_two_policies_share_ties_by_the_reward_model(run):
    """Scored in one call, an answer two policies gave gets one score: a tie, not a win or a loss decided by
    the last bits of a padded batch (an SFT compared with itself is exactly 50 %)."""
    from align.config import EvalStageConfig, RunConfig
    from align.evaluation import win_rate
    from align.recipes.evaluate import judge

    rows = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    prompts, sft, dpo = [r["prompt"] for r in rows], [r["sft"] for r in rows], [r["dpo"] for r in rows]
    mixed = sft[:4] + dpo[4:]
    cfg = EvalStageConfig(run=RunConfig(dir=str(run), wandb="disabled"), reward_model=str(run / "reward"))
    scores = judge(cfg, prompts, {"sft": sft, "mixed": mixed, "same": list(sft)})["reward_model"]
    assert scores["same"] == scores["sft"] and scores["mixed"][:4] == scores["sft"][:4]
    assert win_rate(scores["same"], scores["sft"]) == 0.5


def test_a_sqlite_store_is_compared_by_the_file_it_opens():
    """align before 2026-12 wrote sqlite:////runs/2026-12-02T10:00/labels.db; now its path is quoted (a `?` in a
    folder's name opened another file): a finished sample must not count as changed and redo every stage."""
    from align.recipes.pipeline import _made_by

    old = {"store": "sqlite:////runs/2026-12-02T10:00/labels.db", "run": {"dir": "runs/x"}}
    new = {"store": "sqlite:////runs/2026-12-02T10%3A00/labels.db", "run": {"dir": "runs/x"}}
    assert _made_by(old) == _made_by(new)
    assert _made_by(old) != _made_by({**new, "store": "sqlite:////runs/other/labels.db"})


def test_a_run_dir_is_compared_by_the_folder_it_names(tmp_path, monkeypatch):
    """run.dir=runs/x and run.dir=$PWD/runs/x are one run: the config a stage recorded with one spelling is
    unchanged under the other (a rerun with the other redid every stage, sft first), and so is the config of
    a stage recorded before the pipeline resolved run.dir (relative paths, read from where it runs now)."""
    from align.recipes.pipeline import _made_by

    monkeypatch.chdir(tmp_path)
    rel = {"run": {"dir": "runs/x"}, "sft": "runs/x/sft", "prompts": "data/p.jsonl", "data": {"path": "d.jsonl"},
           "policies": {"sft": "runs/x/sft", "dpo": "runs/x/./dpo"}}
    full = {"run": {"dir": f"{tmp_path}/runs/x/"}, "sft": f"{tmp_path}/runs/x/sft", "prompts": f"{tmp_path}/data/p.jsonl",
            "data": {"path": f"{tmp_path}/d.jsonl"}, "policies": {"sft": f"{tmp_path}/runs/x/sft",
                                                                  "dpo": f"{tmp_path}/runs/x/dpo"}}
    assert _made_by(rel) == _made_by(full)
    assert _made_by(rel) != _made_by({**full, "sft": f"{tmp_path}/runs/y/sft"})
    assert _made_by(rel) != _made_by({**full, "run": {"dir": "runs/y"}})


def test_a_base_model_is_compared_by_what_it_is(tmp_path, monkeypatch):
    """dpo and reward record their SFT's base as its align.json has it (a folder's absolute path) where the
    pipeline's section says `tiny`: every rerun redid reward, dpo and eval. The embedded model's names are one."""
    from align.embedded import model_key
    from align.recipes.pipeline import _made_by

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _made_by({"model": {"name": "tiny"}}) == _made_by({"model": {"name": str(tmp_path / "tiny")}})
    assert _made_by({"model": {"name": "tiny"}}) != _made_by({"model": {"name": "Org/tiny"}})
    assert model_key("SmolLM2-135M") == model_key("embedded") == model_key("smollm2-135m-instruct")


def test_a_hint_under_the_pipeline_names_the_key_with_its_section(tmp_path, monkeypatch):
    """Under `align pipeline` a stage's keys are given in its section (ppo.reward_model=; reward_model= alone is an
    unknown key there): a hint a stage gives while the pipeline runs it says so. On its own, the bare key."""
    from align import StageError, artifacts
    from align.config import EvalStageConfig, RunConfig, SampleStageConfig
    from align.preflight import check_stage
    from align.recipes.evaluate import judge
    from align.reward_model import gate

    run = RunConfig(dir=str(tmp_path / "run"))
    for running, p in ((["pipeline", "ppo"], "{}."), (["ppo"], "")):
        monkeypatch.setattr(artifacts, "_running", running)
        with pytest.raises(StageError, match=re.escape(f"pass {p.format('ppo')}reward_model=<folder>, or use a "
                                                       f"programmatic reward with {p.format('ppo')}scorer=")):
            gate(tmp_path / "run" / "reward", 0.6)
        with pytest.raises(StageError, match=re.escape(f"or pass {p.format('sample')}policy=<adapter")):
            check_stage("sample", SampleStageConfig(run=run))
        with pytest.raises(StageError, match=re.escape(f"pass {p.format('eval')}scorer=support_style")):
            judge(EvalStageConfig(run=run, reward_model="none"), ["Hi?"], {"sft": ["Hello."]})


def test_the_label_stage_passes_unsafe_flagger_to_the_simulated_annotator(tmp_path):
    """`unsafe_flagger:` reaches the label stage (no model needed: the stage alone, on a store with a batch): the
    simulated annotator ticks the replies it names, and a batch ranked without it is refused, not reused unflagged."""
    from align import StageError
    from align.config import PipelineConfig
    from align.labeling.store import Store
    from align.recipes.pipeline import label

    cfg = PipelineConfig(unsafe_flagger="support_unsafe")
    cfg.run.dir = str(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    replies = ["Thanks! Open Settings > Sync.", "Thanks! Please send me your password."]
    store.add_tasks("round-0", [{"prompt": "q", "responses": replies}], source={})
    label(cfg, tmp_path, "round-0")
    [ranking] = store.submitted_rankings("round-0")
    assert ranking["flags"] == ["unsafe:1"]
    assert ranking["rationale"] == "simulated: support_style, unsafe by support_unsafe"
    store.add_tasks("round-1", [{"prompt": "q", "responses": replies}], source={})
    label(PipelineConfig(run=cfg.run), tmp_path, "round-1")  # unsafe_flagger: null, the default, flags nothing
    assert [r["flags"] for r in store.submitted_rankings("round-1")] == [[]]
    with pytest.raises(StageError, match="unsafe by support_unsafe' \\(scorer, tie_resolution, unsafe_flagger\\)"):
        label(cfg, tmp_path, "round-1")


def test_the_label_stage_names_a_scorer_that_returns_no_number_and_gives_its_task_back(tmp_path):
    """label=simulate with a scorer that returns None: a ScorerError (a ValueError) left `align pipeline` as a
    traceback; a StageError names the scorer and the task, and the task is not left assigned to the annotator."""
    from align import StageError
    from align.config import PipelineConfig
    from align.labeling.store import Store
    from align.recipes.pipeline import label

    cfg = PipelineConfig(scorer="known_scorers:returns_none")
    cfg.run.dir = str(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "How do I sync?", "responses": ["Open Settings.", "Thanks!"]}], source={})
    with pytest.raises(StageError, match=r"^label: scorer 'known_scorers:returns_none' returned None for task 1 "
                                         r"\('How do I sync\?'\): a scorer returns a number \(int or float\)$"):
        label(cfg, tmp_path, "round-0")
    [annotator] = store.users()
    assert store.assigned_tasks(annotator["id"], open_only=True) == []
