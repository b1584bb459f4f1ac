"""The run layout and the one stage registry: every stage loads, has its place, and the CLI, the
pipeline, the report, W&B tracking and eval read the same list."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

from align import config as config_module
from align.artifacts import (
    MANIFEST,
    STAGES,
    commands,
    later_rounds,
    pipeline_stages,
    read_manifest,
    round_batch,
    round_dir,
    routed,
    stage_dir,
    stages_of_kind,
    store_url,
    write_manifest,
)
from align.cli import main as align
from align.config import ConfigError, PipelineConfig, PPOStageConfig, load_config

ORDER = list(STAGES)


@pytest.mark.parametrize("name", ORDER)
def test_every_stage_has_a_recipe_a_config_that_loads_and_known_upstreams(name):
    stage = STAGES[name]
    module = importlib.import_module(stage.recipe)
    assert callable(module.main), f"{stage.recipe} has no main"
    if stage.config is None:  # parses its own argv; handed the run layout by the CLI
        assert {"store_url", "export_dir"} <= set(inspect.signature(module.main).parameters)
    else:
        cfg = load_config(getattr(config_module, stage.config), None, ["run.dir=runs/x"])
        assert cfg.run.dir == "runs/x"
    for up in stage.upstream:
        assert up in STAGES and ORDER.index(up) < ORDER.index(name), f"{name}: upstream {up} must come first"
    if stage.runs_as:
        command, key, value = stage.runs_as
        assert STAGES[command].runs_as is None and STAGES[command].config == stage.config
        assert routed(command, load_config(getattr(config_module, stage.config), None, [f"{key}={value}"])) is stage


def test_every_folder_is_one_stages():
    folders = [s.folder for s in STAGES.values() if s.folder]
    assert len(folders) == len(set(folders))
    assert stage_dir("runs/q", "export") == Path("runs/q/preferences")
    assert stage_dir("runs/q", "grpo") == Path("runs/q/grpo")
    with pytest.raises(ValueError, match="label"):
        stage_dir("runs/q", "label")


def test_ppo_with_algo_grpo_is_the_grpo_stage_and_writes_grpo():
    cfg = load_config(PPOStageConfig, None, ["algo=grpo"])
    assert routed("ppo", cfg).name == "grpo" and stage_dir("r", routed("ppo", cfg).name) == Path("r/grpo")
    assert routed("ppo", load_config(PPOStageConfig, None, [])).name == "ppo"
    assert routed("dpo", cfg).name == "dpo"  # only ppo's own variants are routed
    # the command the report's hints and `align --help` name for it
    assert STAGES["grpo"].command == "align ppo algo=grpo" and STAGES["sft"].command == "align sft"


def test_cli_lists_exactly_the_registrys_commands(capsys):
    assert align(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.split("stages:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == [s.name for s in commands()] + [s.name for s in STAGES.values() if s.runs_as]
    assert align(["grpo"]) == 2
    assert "grpo runs as `align ppo algo=grpo`" in capsys.readouterr().err


def test_pipeline_runs_the_registrys_stages_and_refuses_others(tmp_path):
    assert pipeline_stages() == ["sft", "sample", "label", "export", "reward", "dpo", "ppo", "eval"]
    with pytest.raises(ConfigError, match=f"stages.1.: 'merge' is not a pipeline stage; allowed values: "
                                          f"{', '.join(pipeline_stages())}$"):
        load_config(PipelineConfig, None, [f"run.dir={tmp_path}", "stages=[sft, merge]"])
    assert set(PipelineConfig().stages) <= set(pipeline_stages())


def test_report_orders_sections_as_the_registry(tmp_path):
    from align.report import write_report

    finished = [s for s in reversed(ORDER) if STAGES[s].folder] + ["sft-merged"]  # made in reverse order
    for folder in finished:
        folder = STAGES[folder].folder if folder in STAGES else folder
        (tmp_path / folder).mkdir()
        (tmp_path / folder / MANIFEST).write_text(json.dumps({"stage": folder, "metrics": {}}))
    (tmp_path / "not-an-artifact").mkdir()
    html = write_report(tmp_path).read_text()
    ids = [part.split("'")[0] for part in html.split("<section id='")[1:]]
    assert ids == [STAGES[s].folder for s in ORDER if STAGES[s].folder] + ["sft-merged"]


def test_report_shows_a_folder_name_as_text(tmp_path):
    """Every folder with a manifest gets a section titled by its name, which a user chose (align export
    output=..., merge output=...): markup in it is text in the page, in the title, the anchor and the nav."""
    from align.report import write_report

    name = "<img src=x onerror=alert(1)>"
    (tmp_path / name).mkdir()
    (tmp_path / name / MANIFEST).write_text(json.dumps({"stage": "export", "metrics": {}}))
    page = write_report(tmp_path).read_text()
    # the section id and title, the nav link and its href, the folder path, the first screen's row and link: each escaped
    assert "<img src=x" not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 7


def test_every_artifact_stage_has_a_wandb_type_and_eval_knows_every_policy(tmp_path):
    from align.artifacts import resolve_policies
    from align.tracking import ARTIFACT_TYPES

    assert all(s.kind in ARTIFACT_TYPES for s in STAGES.values() if s.folder)
    assert stages_of_kind("policy") == ["sft", "dpo", "ppo", "grpo", "rloo"]
    for policy in ("sft", "grpo", "rloo"):
        stage_dir(tmp_path, policy).mkdir()
        (stage_dir(tmp_path, policy) / "adapter_config.json").write_text("{}")
    cfg = load_config(config_module.EvalStageConfig, None, [f"run.dir={tmp_path}"])
    assert resolve_policies(cfg) == {p: tmp_path / p for p in ("sft", "grpo", "rloo")}


def test_store_and_round_layout(tmp_path):
    run = tmp_path / "run"
    assert store_url(None, run) == f"sqlite:///{run.resolve() / 'labels.db'}" and run.is_dir()
    assert store_url("postgresql://h/db", run) == "postgresql://h/db"
    assert round_dir(run, 0) == run and round_dir(run, 2) == run / "round-2" and round_batch(2) == "round-2"
    for r in (10, 2, 1):
        round_dir(run, r).mkdir()
    (run / "round-x").mkdir()
    assert [p.name for p in later_rounds(run)] == ["round-1", "round-2", "round-10"]


def test_the_next_command_keeps_the_config_family_it_ran_from(monkeypatch):
    """After `align sft --config configs/quickstart/sft.yaml`, the next step is quickstart's sample.yaml,
    not the defaults (all 320 prompts)."""
    from align import artifacts

    quick = Path(__file__).resolve().parents[1] / "configs/quickstart"
    monkeypatch.setattr(artifacts, "config_folder", quick)
    got = artifacts.with_sibling_configs("align reward run.dir=r   or   align dpo run.dir=r   (align reward score x)")
    assert got == (f"align reward --config {quick / 'reward.yaml'} run.dir=r   or   "
                   f"align dpo --config {quick / 'dpo.yaml'} run.dir=r   (align reward score x)")
    assert artifacts.with_sibling_configs("align label --run-dir r") == "align label --run-dir r"  # no label.yaml
    monkeypatch.setattr(artifacts, "config_folder", None)
    assert artifacts.with_sibling_configs("align sample run.dir=r") == "align sample run.dir=r"
    # pasted into a shell, a path with a space is still one word
    assert f"align sample run.dir={artifacts.shell('runs/my run')}" == "align sample run.dir='runs/my run'"
    assert artifacts.shell("runs/quickstart") == "runs/quickstart"


def test_labelling_unattended_into_another_store_says_to_export_from_it(tmp_path, capsys):
    from align.cli import main as align
    from align.labeling.store import Store

    url = f"sqlite:///{tmp_path / 'team store.db'}"
    Store(url).add_tasks("round-0", [{"prompt": "q", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    assert align(["label", "--db", url, "--run-dir", str(tmp_path / "my run"), "--simulate", "support_style"]) == 0
    hint = capsys.readouterr().out.split("next: ")[1].strip()
    assert hint == f"align export run.dir='{tmp_path / 'my run'}' store='{url}'"


def test_a_database_password_is_never_written(tmp_path):
    """A team's store is postgresql://user:password@host/db: config.yaml, align.json (and W&B, through the
    same redact) hold user:***@, and the pipeline's rerun rule compares configs as written."""
    import yaml

    from align.artifacts import write_manifest
    from align.config import ExportStageConfig, redact, save_config, to_dict

    url = "postgresql://team:s3cret-PW@db.example:5432/labels"
    cfg = ExportStageConfig(store=url)
    save_config(cfg, tmp_path / "config.yaml")
    write_manifest(tmp_path, stage="export", config=to_dict(cfg), base_model=None, parents={"store": url}, store=url)
    for name in ("config.yaml", "align.json"):
        text = (tmp_path / name).read_text()
        assert "s3cret" not in text and "postgresql://team:***@db.example:5432/labels" in text, name
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["store"] == redact(url)
    assert redact({"a": [url, "sqlite:///runs/q/labels.db", "http://host:8000/v1"]}) == {
        "a": ["postgresql://team:***@db.example:5432/labels", "sqlite:///runs/q/labels.db", "http://host:8000/v1"]}
    # however the password is given: an empty user name, a libpq query parameter, an @ not percent-encoded
    for given in ("postgresql://:TOPSECRET@db/labels", "postgresql://u@db/labels?password=TOPSECRET",
                  "postgresql://u:TOP@SECRET@db/labels"):
        assert "TOP" not in json.dumps(redact({"store": given})) and "db" in redact(given), given


def test_a_fresh_start_sets_the_earlier_runs_checkpoints_aside(tmp_path):
    """Started from scratch over an earlier run's checkpoints, then killed before its first checkpoint: `latest`
    must not continue the earlier run (its data and config) under this run's manifest."""
    from align.rl import find_checkpoint
    from align.training import resume_checkpoint

    for stage, name in (("reward", "checkpoint-6"), ("ppo", "step-4")):
        out = tmp_path / stage
        (out / "checkpoints" / name).mkdir(parents=True)
        (out / "checkpoints" / name / "trainer_state.json").write_text("{}")
        find = find_checkpoint if stage == "ppo" else resume_checkpoint
        assert find(out, None) is None  # this run: from scratch
        assert find(out, "latest") is None  # killed before its first checkpoint: scratch again, not the old run
        (aside,) = (out / "checkpoints").glob("abandoned-*")
        assert (aside / name / "trainer_state.json").is_file()  # kept, out of the way


def test_latest_past_max_steps_is_refused_as_a_named_checkpoint_is(tmp_path, monkeypatch):
    """A run killed on its way to 4 steps (checkpoints at 2 and 3), rerun to train.max_steps=2 with `latest`:
    resumed at step 3, it trained nothing and wrote step 3's weights under a manifest saying 2 steps. Refused, as
    the same checkpoint named by its path is. One at max_steps (a run killed after its last step) finishes the run,
    for PPO's loop and the Trainer alike (train_from); refused, nothing could finish such a run. Under align
    pipeline the message names the keys as it takes them (sft.train...)."""
    from align import artifacts
    from align.rl import find_checkpoint
    from align.training import resume_checkpoint

    for find, name, folder in ((find_checkpoint, "step-{}", "ppo"), (resume_checkpoint, "checkpoint-{}", "sft")):
        out = tmp_path / folder
        for step in (2, 3):
            (out / "checkpoints" / name.format(step)).mkdir(parents=True)
            (out / "checkpoints" / name.format(step) / "trainer_state.json").write_text("{}")
        with pytest.raises(ConfigError, match=r"^train.resume_from_checkpoint=latest: its newest checkpoint, .*-3 "
                                              r"\(step 3\), is past train.max_steps=2: nothing is left to train"):
            find(out, "latest", max_steps=2)
        monkeypatch.setattr(artifacts, "in_pipeline", True)
        with pytest.raises(ConfigError, match=rf"^{folder}.train.resume_from_checkpoint=latest: .* is past "
                                              rf"{folder}.train.max_steps=2: .* raise {folder}.train.max_steps"):
            find(out, "latest", max_steps=2)
        monkeypatch.setattr(artifacts, "in_pipeline", False)
        assert Path(find(out, "latest", max_steps=3)).name == name.format(3)
        assert Path(find(out, "latest", max_steps=4)).name == name.format(3)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [name.format(2), name.format(3)]


def test_latest_at_max_steps_of_a_longer_run_is_refused(tmp_path):
    """checkpoint-2 of a run on its way to 4 steps (killed), rerun with train.max_steps=2 and `latest`: its weights
    are step 2 of a 4-step schedule; finishing there (train_from) would label them a 2-step run. Refused, naming
    the run's own max_steps; the same checkpoint saved by a 2-step run finishes it, and with max_steps=4 goes on."""
    from align.rl import find_checkpoint
    from align.training import resume_checkpoint

    for find, name, key in ((find_checkpoint, "step-2", "step"), (resume_checkpoint, "checkpoint-2", "global_step")):
        out = tmp_path / name
        (out / "checkpoints" / name).mkdir(parents=True)
        state = out / "checkpoints" / name / "trainer_state.json"
        state.write_text(json.dumps({key: 2, "max_steps": 4}))
        with pytest.raises(ConfigError, match=r"^train.resume_from_checkpoint=latest: its newest checkpoint, .*-2, is "
                                              r"at train.max_steps=2 but was saved on the way to 4 steps: .*set "
                                              r"train.max_steps=4 to finish that run"):
            find(out, "latest", max_steps=2)
        assert Path(find(out, "latest", max_steps=4)).name == name
        state.write_text(json.dumps({key: 2, "max_steps": 2}))
        assert Path(find(out, "latest", max_steps=2)).name == name



def test_latest_resumes_a_run_trained_by_epochs(tmp_path):
    """train.max_steps=-1 (the Trainer stages' default: train.epochs sets the length) is no step count to be past:
    `latest` goes on from the newest checkpoint of a run killed on the way, whatever its step."""
    from align.training import resume_checkpoint

    out = tmp_path / "sft"
    for step in (2, 3):
        (out / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "max_steps": 9}))  # the Trainer's count of the epochs' steps
    assert Path(resume_checkpoint(out, "latest", max_steps=-1)).name == "checkpoint-3"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]

def test_a_local_base_named_relative_to_the_stage_is_recorded_absolute(tmp_path, monkeypatch):
    """`align sft model.name=tiny` in one folder; the next stage, run from another, read `tiny` there."""
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "sft", stage="sft", config={}, base_model="tiny")
    write_manifest(tmp_path / "sft2", stage="sft", config={}, base_model="Org/model-on-the-hub")
    monkeypatch.chdir(Path("/"))
    assert read_manifest(tmp_path / "sft")["base_model"] == str(tmp_path / "tiny")
    assert read_manifest(tmp_path / "sft2")["base_model"] == "Org/model-on-the-hub"


def test_the_eval_hint_names_an_sft_trained_in_another_folder(tmp_path):
    """`align dpo sft=<elsewhere>` then the printed `align eval` failed: the baseline sft was not in run.dir."""
    import shlex

    from align.artifacts import eval_command
    from align.config import EvalStageConfig

    run = tmp_path / "my run"
    (run / "reward").mkdir(parents=True)  # eval's default judge
    assert eval_command(run, "dpo", run / "sft") == f"align eval run.dir={shlex.quote(str(run))}"
    words = shlex.split(eval_command(run, "dpo", tmp_path / "other" / "sft"))
    assert words[:3] == ["align", "eval", f"run.dir={run}"]
    cfg = load_config(EvalStageConfig, None, words[2:])
    assert cfg.policies == {"sft": str(tmp_path / "other" / "sft"), "dpo": str(run / "dpo")}


def test_the_rl_eval_hint_carries_the_judge_training_used_where_the_run_has_no_reward_model(tmp_path):
    """`align ppo scorer=...` with no reward/ in run.dir hinted `align eval run.dir=X`: "no judge for eval"."""
    from align.artifacts import eval_command

    run = tmp_path / "run"
    assert eval_command(run, "ppo", run / "sft", scorer="mypkg.judges:helpfulness") == \
        f"align eval run.dir={run} scorer=mypkg.judges:helpfulness"
    assert eval_command(run, "ppo", run / "sft", reward_model=tmp_path / "rm") == \
        f"align eval run.dir={run} reward_model={tmp_path / 'rm'}"
    (run / "reward").mkdir(parents=True)  # eval's default judge: nothing to add
    assert eval_command(run, "ppo", run / "sft", scorer="support_style") == f"align eval run.dir={run}"
    # a fresh LoRA: no baseline for eval, so no eval command alone but what to do
    fresh = eval_command(run, "grpo", None, scorer="support_style", base="Org/base")
    assert not fresh.startswith("align ") and "align sft run.dir=" + str(run) + " model.name=Org/base" in fresh


def test_the_dpo_eval_hint_says_eval_needs_a_judge_where_the_run_has_none(tmp_path):
    """`align dpo` on pairs from elsewhere (no reward/ in run.dir, DPO has no scorer) hinted a bare `align eval
    run.dir=X`, which failed "no judge"."""
    from align.artifacts import eval_command

    run = tmp_path / "run"
    hint = eval_command(run, "dpo", run / "sft")
    assert hint.startswith(f"align eval run.dir={run} scorer=<module:function> (eval needs a judge")
    assert "support_style" in hint and "reward_model=<folder>" in hint and "human=true" in hint
    (run / "reward").mkdir(parents=True)
    assert eval_command(run, "dpo", run / "sft") == f"align eval run.dir={run}"


def test_each_stage_starts_without_the_deepspeed_config_of_the_one_before(monkeypatch):
    """Under DeepSpeed ZeRO-3 a stage's TrainingArguments left transformers' record of its config alive (held by
    accelerate's shared state): the next stage of `align pipeline` loaded the models no trainer wraps (reward's
    merge of its SFT adapter, GRPO's reward model) under deepspeed.zero.Init, and hung or crashed."""
    import weakref
    from types import SimpleNamespace

    import transformers.integrations.deepspeed as hf_deepspeed

    from align.artifacts import run_stage
    from align.recipes import export

    class ZeRO3:  # what TrainingArguments(deepspeed=...) records (an HfDeepSpeedConfig)
        config: dict = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    earlier = ZeRO3()  # alive, as accelerate's state keeps it
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(earlier))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    seen = []
    monkeypatch.setattr(export, "main", lambda cfg: seen.append(hf_deepspeed.is_deepspeed_zero3_enabled()))
    run_stage("export", SimpleNamespace(run=SimpleNamespace(dir="unused")))
    assert seen == [False]


def test_the_manifest_records_aligns_version_and_only_aligns_own_commit(tmp_path):
    """align_version beside git_commit; and git_commit from align's own checkout only: installed in a .venv
    inside the user's own git repository, it recorded the user's commit as the code's."""
    import subprocess

    from align.artifacts import align_version, git_commit, write_manifest

    m = json.loads(write_manifest(tmp_path / "sft", stage="sft", config={}, base_model=None).read_text())
    assert m["align_version"] == align_version() is not None and "git_commit" in m

    def repo(name: str) -> Path:  # a git repository with a commit, holding <site-packages>/align/
        top = tmp_path / name
        package = top / ".venv" / "lib" / "site-packages" / "align"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (top / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
        git = ["git", "-c", "user.email=a@b", "-c", "user.name=a", "-C", str(top)]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "pyproject.toml"], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
        return top

    users = repo("my-project")
    assert git_commit(users / ".venv" / "lib" / "site-packages" / "align") is None
    own = repo("align-rlhf")  # align's own checkout: its align/ at the top
    (own / "align").mkdir()
    head = subprocess.run(["git", "-C", str(own), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(own / "align") == head
    assert git_commit(own / ".venv" / "lib" / "site-packages" / "align") is None  # a wheel's copy in it


def test_a_stage_gives_back_the_memory_it_freed(tmp_path):
    """glibc keeps freed training activations in its heaps (its mmap threshold rises to the largest block freed):
    after the quickstart's SFT the pipeline held ~6.5 GiB with no live tensor through every later stage. A stage
    run by run_stage now hands it back. In a fresh process, so that the allocator's state is this test's."""
    import os
    import subprocess
    import sys
    import textwrap

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator")
    script = textwrap.dedent("""
        import ctypes
        from types import SimpleNamespace
        import torch
        import align.recipes.export
        from align.artifacts import run_stage

        def rss() -> int:
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024

        # The state a training process reaches: blocks up to 32 MiB from the heaps, and freed memory scattered
        # through them rather than at their top (which glibc trims by itself): set here, not left to chance.
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD

        def stage(cfg):  # a step's worth of activations: 100 x 4 MiB, freed
            kept = [torch.ones(2**20) for _ in range(100)]
            del kept
            cfg.freed_at = rss()

        align.recipes.export.main = stage
        cfg = SimpleNamespace(run=SimpleNamespace(dir="unused"))
        run_stage("export", cfg)
        print(cfg.freed_at, rss())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    freed_at, after = map(int, done.stdout.split())
    assert freed_at - after > 300, (freed_at, after)  # MiB: the 400 freed, less what the allocator may keep


def test_a_parent_made_again_while_the_stage_ran_is_recorded_as_the_one_it_read(tmp_path, monkeypatch, caplog):
    """A stage's manifest records each parent's `created` as it was when the stage started, not when it finished:
    an SFT retrained beside a DPO on it was recorded as the new SFT, and the report and the pipeline took the DPO
    for one built on it. Now the report calls it stale (and align pipeline makes it again), with a warning."""
    from align.artifacts import run_stage
    from align.recipes import dpo
    from align.report import changed_parents

    run = tmp_path / "run"
    cfg = load_config(config_module.DPOStageConfig, None, [f"run.dir={run}", f"sft={tmp_path / 'elsewhere' / 'sft'}",
                                                           "run.wandb=disabled"])
    for folder, created in ((tmp_path / "elsewhere" / "sft", "2026-01-01T00:00:00+0000"),
                            (run / "preferences", "2026-01-01T00:01:00+0000")):
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(json.dumps({"stage": folder.name, "created": created}))

    def trained_meanwhile(cfg):
        for folder in (tmp_path / "elsewhere" / "sft", run / "preferences"):  # named by its config, and by default
            manifest = json.loads((folder / MANIFEST).read_text())
            (folder / MANIFEST).write_text(json.dumps({**manifest, "created": "2026-01-02T00:00:00+0000"}))
        return write_manifest(run / "dpo", stage="dpo", config={}, base_model=None,
                              parents={"sft": cfg.sft, "preferences": run / "preferences", "data": tmp_path / "x.jsonl"})

    monkeypatch.setattr(dpo, "main", trained_meanwhile)
    with caplog.at_level("WARNING", logger="align.artifacts"):
        run_stage("dpo", cfg)
    m = read_manifest(run / "dpo")
    assert (m["parents"]["sft"]["created"], m["parents"]["preferences"]["created"]) == (
        "2026-01-01T00:00:00+0000", "2026-01-01T00:01:00+0000")
    assert sorted(changed_parents(m, run / "dpo")) == ["preferences", "sft"]
    assert f"{tmp_path / 'elsewhere' / 'sft'} was made again (at 2026-01-02T00:00:00+0000) while this stage ran" \
        in caplog.text
    # unchanged while it ran: recorded as it is
    write_manifest(run / "dpo", stage="dpo", config={}, base_model=None, parents={"sft": cfg.sft})
    assert read_manifest(run / "dpo")["parents"]["sft"]["created"] == "2026-01-02T00:00:00+0000"
