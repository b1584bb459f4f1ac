"""The whole loop in one run directory: sft → sample → label → export → reward → dpo/ppo → eval.

    align pipeline --config configs/quickstart/pipeline.yaml
    align pipeline --config configs/quickstart/pipeline.yaml rounds=2 label=human

`stages:` says which stages run; their order and folders are the registry's
(align.artifacts.STAGES), and each runs through it (so `ppo.algo=grpo` runs align/recipes/grpo.py
and is found in grpo/). Each stage's input defaults to its upstream artifact in run.dir, and the
keys that wire them (sample.policy, dpo.sft, export.output, ...) are the pipeline's: set, they are
refused (align.preflight). A stage whose artifact is complete (its align.json exists) with the
same config (W&B and resume settings aside), its upstream artifacts and the data files it read
unchanged since, is skipped (`already_done`), so a killed pipeline picks up where it stopped.
Labelling is `simulate` (a scorer ranks, through the same submit path as a person) or `human`
(the app starts, prints its address, and the pipeline waits until the batch has all its
rankings); a batch another scorer (or unsafe_flagger) ranked is refused, not reused. With `rounds: N`, round r > 0 samples from round r-1's aligned policy,
sends those samples for ranking, and retrains on the grown preference data, in
<run.dir>/round-<r>/ (the store stays one, sample.store, default <run.dir>/labels.db: every round's
samples and eval human=true's A/B tasks go there); each round keeps its figures. A round's export holds
out each round's own share of prompts, an earlier round's on the side they had (align.labeling.export.split_by_prompt).
Round 0 samples the first `sample.num_prompts` prompts, and each later round from the prompts no
earlier round used (align/recipes/sample.py); with `sample.selection: uncertainty`, a later round picks
them from `sample.pool_factor` x as many by the previous round's reward model (docs/active.md),
and the labelling queue hands them out most uncertain first.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from align import StageError, artifacts
from align import report as report_module
from align.artifacts import (
    MANIFEST,
    in_this_run,
    missing_files,
    model_fingerprint,
    parent_path,
    pipeline_stages,
    print_done,
    read_manifest,
    round_batch,
    round_dir,
    routed,
    run_stage,
    shell,
    stage_dir,
    store_url,
)
from align.cli import Terminated
from align.config import PipelineConfig, redact, to_dict
from align.data import file_hash
from align.embedded import model_key
from align.labeling.cli import PARENT_ENV
from align.labeling.export import verdicts_fingerprint
from align.preflight import check_stage
from align.tracking import wandb_hint

log = logging.getLogger(__name__)


# Keys that change how a stage is logged or restarted, not what it makes: a change of one reruns nothing.
UNMADE = (("run", "wandb"), ("run", "wandb_project"), ("train", "resume_from_checkpoint"))
# Keys whose value is a file or folder: compared by the path they name, not as typed.
PATHS = ("dir", "sft", "policy", "reward_model", "selection_reward_model", "output", "prompts", "path")


def _made_by(config: dict[str, Any]) -> dict[str, Any]:
    from align.labeling.store import sqlite_path

    config = redact(json.loads(json.dumps(config, default=str)))  # as written: a URL's password masked
    for section, key in UNMADE:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    # A SQLite store by the file it opens: its URL's quoting changed (a run.dir holding `:` or `?`), its file not.
    # A base model by what it is: dpo and reward record their SFT's base as align.json has it (a folder's
    # absolute path) where the pipeline's section says `tiny`.
    if config.get("human") is False:  # eval's store holds its A/B tasks only (an eval from before named none)
        config.pop("store", None)
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):
        if isinstance(section.get("store"), str) and sqlite_path(section["store"]) is not None:
            section["store"] = "sqlite:" + sqlite_path(section["store"])
        if isinstance(section.get("name"), str) and section is config.get("model"):
            section["name"] = model_key(section["name"])
    # A path by the folder it names: run.dir=runs/x and =/home/me/runs/x are one run (the pipeline records
    # them resolved; a config recorded before, relative, is read from where the pipeline runs now).
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):
        for key in PATHS:
            if isinstance(section.get(key), str) and section.get(key):
                section[key] = str(Path(section[key]).resolve())
        if isinstance(section.get("policies"), dict):
            section["policies"] = {k: str(Path(v).resolve()) if isinstance(v, str) else v
                                   for k, v in section["policies"].items()}
    # A path inside run.dir by where it is in the run: a run copied or moved elsewhere is the same run (its
    # stages read their parents there: artifacts.parent_path), not one to make again from sft.
    root = (config.get("run") or {}).get("dir") if isinstance(config.get("run"), dict) else None
    if root:
        def in_run(value: Any, prefix: str = "") -> Any:
            if not isinstance(value, str) or not value.startswith(prefix):
                return value
            try:
                return prefix + str(Path("<run.dir>") / Path(value[len(prefix):]).relative_to(root))
            except ValueError:
                return value

        for section in (config, *(v for v in config.values() if isinstance(v, dict))):
            for key in (k for k in PATHS if k in section):
                section[key] = in_run(section[key])
            if isinstance(section.get("store"), str):
                section["store"] = in_run(section["store"], "sqlite:")
            if isinstance(section.get("policies"), dict):
                section["policies"] = {k: in_run(v) for k, v in section["policies"].items()}
    return config


# Keys added since a stage may have run whose effect its other records cover: export.reliability_batches, which
# changes only which rankings the estimate reads, and its rankings_sha256 fingerprints exactly those; and
# export.flagged, whose default (keep) changes an export only where a ranking it reads is flagged, which is when
# rankings_sha256 takes the setting in (align.labeling.export.rankings_fingerprint): such an export is made again.
COVERED = ("reliability_batches", "flagged")


def _as_recorded(config: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """`config` without the keys `recorded` lacks that are at null, settings added since it ran whose null default
    does what was done before, or in COVERED: neither reruns anything for the key alone."""
    def trim(now: dict, then: dict) -> dict:
        return {k: trim(v, then[k]) if isinstance(v, dict) and isinstance(then.get(k), dict) else v
                for k, v in now.items() if k in then or (v is not None and k not in COVERED)}

    return trim(config, recorded)


def _as_ran(m: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """A manifest's config as its stage ran it where the two differ: a reward model recorded before
    `lora_dropout_applied` ran without dropout whatever its lora.dropout said (TRL turned it off)."""
    if m.get("stage") == "reward" and not m.get("lora_dropout_applied") and isinstance(recorded.get("lora"), dict):
        return {**recorded, "lora": {**recorded["lora"], "dropout": 0.0}}
    return recorded


def _changed(then: Any, now: Any, key: str = "") -> list[str]:
    """"key: then → now" for each setting that differs between two configs (nested keys dotted)."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [c for k in dict.fromkeys([*then, *now])
                for c in _changed(then.get(k, "(unset)"), now.get(k, "(unset)"), f"{key}.{k}" if key else k)]
    return [] if then == now else [f"{key}: {json.dumps(then, default=str)[:60]} → {json.dumps(now, default=str)[:60]}"]


def _inputs(m: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, sha256) of the data files and prompt files a manifest says its stage read."""
    found = [(d.get("path"), d.get("sha256")) for d in (m.get("data"), m.get("prompts")) if isinstance(d, dict)]
    if m.get("prompts_sha256"):  # sample and eval: the prompts file of their config
        found.append(((m.get("config") or {}).get("prompts"), m["prompts_sha256"]))
    return [(p, h) for p, h in found if p and h]


def already_done(folder: Path, cfg: Any, rankings: str | None = None) -> bool:
    """Finished with the same config and nothing upstream remade since (a make-like rule).

    Every stage writes its manifest last and atomically, so a manifest means a finished stage.
    Redone when: the config differs (W&B and resume settings aside); an upstream artifact was made
    again since it read it (by its manifest's `created`: a copied run's mtimes do not count); a data or prompts file it read has changed since (by sha256), or the local
    base model folder it ran on (by its fingerprint: a model saved over it); an export's store's
    rankings have changed since it ran (added, changed, flagged, made gold).
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        m = read_manifest(folder)
    except StageError as err:  # half a file, by hand or a full disk: the stage's mark that it finished is gone
        log.info("── %s: %s", folder.name, err)
        return False
    gone = missing_files(folder, m)
    if gone:
        log.info("── %s: %s %s gone or changed since it finished: making it again", folder.name, ", ".join(gone[:3]),
                 "is" if len(gone) == 1 else "are")
        return False
    recorded = m.get("config") or {}
    if m.get("stage") == "eval" and "reward_model" in recorded and recorded["reward_model"] is None:
        # An eval from before the pipeline named its judge: the reward model it judged by (a parent), else none
        judge = m.get("parents", {}).get("reward_model")
        recorded = {**recorded, "reward_model": judge["path"] if judge else "none"}
    if m.get("stage") == "eval" and "store" not in recorded:
        # An eval from before eval.store: its A/B tasks went to the run's labels.db, the one store the pipeline
        # passes (a human=true eval of those days, rerun by its pipeline, was redone for the key alone)
        recorded = {**recorded, "store": getattr(cfg, "store", None)}
    recorded = _as_ran(m, recorded)
    then, now = _made_by(recorded), _made_by(_as_recorded(to_dict(cfg), recorded))
    if then != now:
        changed = _changed(then, now)
        log.info("── %s: made with other settings (%s%s): making it again", folder.name, "; ".join(changed[:4]),
                 f"; {len(changed) - 4} more" if len(changed) > 4 else "")
        return False
    # an eval from before it recorded its verdicts read none, as far as anyone knows: rerun once there are some
    unrecorded = verdicts_fingerprint([]) if m.get("stage") == "eval" else None
    if rankings is not None and m.get("rankings_sha256", unrecorded) != rankings:
        log.info("── %s: the store's %s changed since it ran: making it again", folder.name,
                 "A/B verdicts have" if m.get("stage") == "eval" else "rankings it reads have")
        return False
    # A parent made again since this stage read it: its manifest's `created` is not the one recorded (the report's
    # rule, report.changed_parents). Not mtimes: cp -r stamps a copy's files anew, in the order it walks them, and
    # every stage after the first came out older than its parents. A parent gone, or left unfinished, is not
    # compared: the pipeline makes its own before this, and another's is what the user gave
    for name, (where, since) in report_module.changed_parents(m, folder).items():
        if (where / MANIFEST).is_file():
            log.info("── %s: it read its %s as made at %s; %s %s: making it again", folder.name, name,
                     m["parents"][name]["created"], where, since)
            return False
    for name, parent in (m.get("parents") or {}).items():  # one recorded without its stamp (align before it): mtimes
        if isinstance(parent, dict) and not parent.get("created"):
            upstream = parent_path(parent["path"], folder, m) / MANIFEST
            if upstream.is_file() and upstream.stat().st_mtime > manifest.stat().st_mtime:
                log.info("── %s: its %s, %s, is newer than it: making it again", folder.name, name, upstream.parent)
                return False
    for path, sha in _inputs(m):
        path = in_this_run(path, folder, m)  # a copied run's own file, not the original's
        if path.exists() and file_hash(path) != sha:
            log.info("── %s: %s has changed since it ran", folder.name, path)
            return False
    base, fingerprint = m.get("base_model"), m.get("base_model_fingerprint")
    if fingerprint and Path(base).is_dir() and model_fingerprint(base) != fingerprint:
        log.info("── %s: the base model %s has changed since it ran", folder.name, base)
        return False
    if m.get("stage") == "sample" and getattr(cfg, "store", None) and m.get("batch"):
        held, made = _tasks_held(cfg.store, m["batch"]), (m.get("metrics") or {}).get("tasks_in_batch") or 0
        if held < made:  # a new store, or the labels.db deleted to label again: label would find nothing to rank
            log.info("── %s: the store holds %d of the %d tasks of batch %r: sampling them again", folder.name, held,
                     made, m["batch"])
            return False
    return True


def _tasks_held(url: str, batch: str) -> int:
    from align.labeling.store import Store

    return next((b["tasks"] for b in Store(url).batch_counts() if b["batch"] == batch), 0)


def run_unless_done(name: str, run_dir: Path, cfg: Any, rankings: str | None = None) -> Path:
    """Run stage `name` on `cfg` unless its folder in `run_dir` already holds this config's artifact."""
    folder = stage_dir(run_dir, routed(name, cfg).name)  # ppo with algo=grpo writes grpo/
    if already_done(folder, cfg, rankings):
        log.info("── %s: already done with this config (%s), skipping", name, folder)
        return folder
    log.info("── %s", name)
    return run_stage(name, cfg)


def rankings_state(url: str, export: Any) -> str:
    """The fingerprint of the store's submitted rankings an export with these settings reads (its batches; under
    combine=dawid_skene its reliability_batches too), as align/recipes/export.py records it in `rankings_sha256`: it
    changes when rankings are added, changed, flagged or made gold."""
    from align.labeling.export import rankings_fingerprint
    from align.labeling.store import Store

    store = Store(url)
    return rankings_fingerprint(store.submitted_rankings(), store.gold_answers(), batches=export.batches,
                                combine=export.combine, reliability_batches=export.reliability_batches,
                                flagged=export.flagged)


def verdicts_state(url: str) -> str:
    """The fingerprint of the store's A/B verdicts (align eval human=true), as eval records it in `rankings_sha256`."""
    from align.labeling.store import Store

    return verdicts_fingerprint(Store(url).submitted_rankings())


def label(cfg: PipelineConfig, run_dir: Path, batch: str) -> None:
    from align.labeling.store import Store, safe_url

    store = Store(store_url(cfg.sample.store, cfg.run.dir))
    if cfg.label == "simulate":
        from align.labeling.simulate import simulate, simulated_rationale

        # A batch ranked by another scorer (or tie resolution, or flagger) keeps those rankings: its tasks are not open
        # again, so this run would train on them while eval and the probes judge by this scorer.
        # (A store of align before 2026-12 says only its scorer; it flagged nothing, so not with unsafe_flagger.)
        asked = simulated_rationale(cfg.scorer, cfg.tie_resolution, cfg.unsafe_flagger)
        legacy = () if cfg.unsafe_flagger else (f"simulated: {cfg.scorer}",)
        other = sorted({r["rationale"] for r in store.submitted_rankings(batch) if r["rationale"].startswith(
            "simulated: ") and r["rationale"] not in (asked, *legacy)})
        if other:
            raise StageError(f"batch {batch!r} of {redact(store_url(cfg.sample.store, cfg.run.dir))} was ranked "
                             f"'{other[0]}', and this run asks for '{asked}' (scorer, tie_resolution, unsafe_flagger): "
                             "those rankings stay in the store and the stages after label would train on them. Use "
                             "another run.dir (or sample.store) to label with this scorer")

        from align.labeling.scorers import ScorerError

        try:
            n = simulate(store, cfg.scorer, batch=batch, tie_resolution=cfg.tie_resolution,
                         unsafe_flagger=cfg.unsafe_flagger)
        except ScorerError as err:  # a scorer that raised or returned no number: its task went back to the store
            raise StageError(f"label: {err}") from err
        log.info("simulated annotator %r ranked %d tasks of batch %s", cfg.scorer, n, batch)
        return
    if cfg.label != "human":
        raise StageError(f"label: {cfg.label!r} is not allowed; allowed values: simulate, human")
    # Rankings on tasks every annotator skipped are waited for by nobody: a skip is final for its annotator
    skipped_out = (f"{{}} rankings of batch {batch!r} are on tasks every annotator skipped: going on without them "
                   "(an account added with `align label users add` would be given them)")
    if (left := store.pending_count(batch)) <= store.skipped_out(batch):
        if left:
            print(skipped_out.format(left))
        return
    db = ["--db", cfg.sample.store] if cfg.sample.store else []  # the store sample wrote, e.g. a PostgreSQL URL
    # With this process's pid, the app stops when it is gone, even killed by SIGKILL (align.labeling.cli.stop_with_parent)
    # -P: not the working directory first on sys.path, where a user's own align/ folder would stand in for ours
    app = subprocess.Popen([sys.executable, "-P", "-m", "align.cli", "label", "--run-dir", str(cfg.run.dir), *db],
                           env={**os.environ, PARENT_ENV: str(os.getpid())})
    try:
        print(f"\nLabelling app started (see its address above). Waiting for batch {batch!r}: "
              "Ctrl-C stops waiting and goes on with what is labelled.")
        while (left := store.pending_count(batch)) > 0:
            if left <= (skipped := store.skipped_out(batch)):
                print("\n" + skipped_out.format(left))
                break
            if app.poll() is not None:  # it refused to start (its reason is above) or was stopped
                raise StageError(f"the labelling app exited (code {app.returncode}) with {left} rankings of batch "
                                 f"{batch!r} still to do; its message is above. Start it yourself (align label "
                                 f"--run-dir {cfg.run.dir}{' --db ' + repr(safe_url(cfg.sample.store)) if db else ''}), or run "
                                 "the pipeline again to resume")
            on_skipped = store.pending_on_skipped(batch)  # waiting for someone who has not skipped them
            print(f"  {left} rankings still to do" + (
                f" ({on_skipped} on tasks someone skipped, {skipped} of them every annotator skipped)" if on_skipped
                else ""), end="\r", flush=True)
            time.sleep(10)
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):  # a `kill` or a scheduler's stop ends the pipeline, as in every stage
            raise
        print("\nstopped waiting; going on with the rankings so far")
    finally:
        app.terminate()


def main(cfg: PipelineConfig) -> Path:
    # The run directory by the folder it names, so that every stage's recorded paths are one spelling:
    # run.dir=runs/x and =$PWD/runs/x were a changed config, and the rerun redid every stage, sft first.
    cfg = replace(cfg, run=replace(cfg.run, dir=str(Path(cfg.run.dir).resolve())))
    check_stage("pipeline", cfg)  # every stage's inputs, before the first stage starts
    warn_shipped_prompts(cfg)
    root = Path(cfg.run.dir)
    store = store_url(cfg.sample.store, root)
    # The policy a later round samples from, by the folder its stage writes (ppo with algo=grpo: grpo/).
    policy_stage = routed("ppo", cfg.ppo).name if "ppo" in cfg.stages and "dpo" not in cfg.stages else "dpo"
    trained = [routed(s, getattr(cfg, s)).name for s in ("dpo", "ppo") if s in cfg.stages]
    started = time.time()
    artifacts.next_hints = False  # each stage's "next:" is this loop's next stage
    artifacts.in_pipeline = True  # and its messages name its keys as this command takes them (sft.train...)
    try:
        _rounds(cfg, root, store, policy_stage, trained)
    finally:
        artifacts.next_hints = True
        artifacts.in_pipeline = False
    html = report_module.write_report(root)
    if not artifacts.is_main_process():  # under accelerate launch: the summary once, from rank 0
        return html
    minutes = (time.time() - started) / 60
    print(f"\npipeline finished in {minutes:.1f} min")  # then the report's first screen, as text
    if cfg.rounds > 1:
        print(f"  {round_dir(root, cfg.rounds - 1).name}, the last of {cfg.rounds} rounds (sft is round 0's):")
    print(textwrap.indent(report_module.glance_text(round_dir(root, cfg.rounds - 1)), "  "), end="")
    if hint := wandb_hint(cfg.run):  # every stage's and round's runs, in one folder
        print(f"\n  {hint}")
    print_done("pipeline", html, f"open {shell(html)}")
    return html


def warn_shipped_prompts(cfg: PipelineConfig) -> None:
    """A warning where sft trains on the user's data while a later stage still reads its default prompts, the
    shipped support data's (sft.data.path=mine alone sampled, evaluated and rolled out on support tickets)."""
    from align.config import EvalStageConfig, PPOStageConfig, SampleStageConfig

    def same(a: str, b: str) -> bool:
        return Path(a).resolve() == Path(b).resolve()

    if same(cfg.sft.data.path, SampleStageConfig.prompts) or "sft" not in cfg.stages:
        return
    defaults = {"sample": SampleStageConfig.prompts, "ppo": PPOStageConfig.prompts, "eval": EvalStageConfig.prompts}
    shipped = [f"{s}.prompts" for s, default in defaults.items()
               if s in cfg.stages and same(getattr(cfg, s).prompts, default)]
    if shipped:
        log.warning("sft trains on %s, but %s %s the shipped support data's prompts (the default%s): set %s to "
                    "prompts of your own data (eval's held out from training)", cfg.sft.data.path,
                    " and ".join(shipped), "reads" if len(shipped) == 1 else "read", "" if len(shipped) == 1 else "s",
                    " and ".join(f"{k}=<file>" for k in shipped))


def _rounds(cfg: PipelineConfig, root: Path, store: str, policy_stage: str, trained: list[str]) -> None:
    for r in range(cfg.rounds):
        run_dir = round_dir(root, r)
        run = replace(cfg.run, dir=str(run_dir))
        sft_dir = stage_dir(root, "sft")
        prev = round_dir(root, max(r - 1, 0))
        batch = round_batch(r)
        # Every stage of this round, wired to its upstream artifacts.
        # Later stages run on the SFT's base: say so in their configs too, so that the config a
        # stage records is the one asked for and a rerun recognises it as unchanged.
        def on_base(section: Any, base: str = cfg.sft.model.name) -> Any:
            return replace(section, model=replace(section.model, name=base))

        sample = on_base(cfg.sample)
        selects = cfg.sample.selection == "uncertainty" and cfg.sample.selection_reward_model is None
        if cfg.sample.selection_reward_model is None:
            if r == 0:  # no reward model yet: the first num_prompts prompts, as selection=random does
                sample = replace(sample, selection="random", pool_factor=1.0, explore=0.0)
            elif sample.selection == "uncertainty":  # the tasks the previous round's reward model knows least
                sample = replace(sample, selection_reward_model=str(stage_dir(prev, "reward")))
        stage_cfgs = {
            "sft": replace(cfg.sft, run=replace(cfg.run, dir=str(root))),
            "sample": replace(sample, run=run, store=store, round=r, batch=batch,
                              policy=str(sft_dir if r == 0 else stage_dir(prev, policy_stage))),
            # This round's and the earlier rounds' batches: a later round's labels never remake an earlier round
            "export": replace(cfg.export, run=run, store=store,
                              batches=cfg.export.batches or [round_batch(i) for i in range(r + 1)],
                              reliability_batches=cfg.export.reliability_batches or (
                                  [round_batch(i) for i in range(r + 1)] if cfg.export.combine == "dawid_skene" else None)),
            # The probes see the edits through the labelling scorer too (what the labels supported);
            # the next round picks its tasks by this round's reward model: it needs its heads.
            "reward": replace(on_base(cfg.reward), run=run, sft=str(sft_dir),
                              probe_scorer=cfg.reward.probe_scorer or cfg.labelling_scorer,
                              heads=cfg.reward.heads or (8 if selects and r < cfg.rounds - 1 else 0)),
            "dpo": replace(on_base(cfg.dpo), run=run, sft=str(sft_dir)),
            "ppo": replace(on_base(cfg.ppo), run=run, sft=str(sft_dir)),
            # Judged by the scorer that labelled the data too (unless eval names its own), so the
            # report says whether the policy learnt what the annotator wanted; its A/B tasks (human=true)
            # go to the one store, where the annotators rank, not to a round's folder.
            "eval": replace(on_base(cfg.eval), run=run, store=store,
                            scorer=cfg.eval.scorer or cfg.labelling_scorer),
        }
        # The policies and the reward model by name (not whichever folders run.dir holds): a stage added to
        # `stages`, or dropped from it, reruns eval.
        stage_cfgs["eval"] = replace(stage_cfgs["eval"], policies=cfg.eval.policies or {
            "sft": str(sft_dir), **{s: str(stage_dir(run_dir, s)) for s in trained}},
            reward_model=cfg.eval_reward_model(run_dir))
        for stage in pipeline_stages():  # the registry's order
            if stage not in cfg.stages or (stage == "sft" and r > 0):
                continue
            if stage == "label":
                label(cfg, run_dir, batch)
                continue
            rankings = (rankings_state(store, stage_cfgs["export"]) if stage == "export" else
                        verdicts_state(store) if stage == "eval" and stage_cfgs["eval"].human else None)
            run_unless_done(stage, root if stage == "sft" else run_dir, stage_cfgs[stage], rankings)
        report_module.write_report(run_dir)

