"""Every input of a stage checked before any work: folders, data files, models, adapters, checkpoints.

    check_stage("dpo", cfg)     # a ConfigError / DataError / StageError naming the key, file and line

Values are checked when the config loads (align.config: each numeric key's range, each
stage's cross-field rules); this module checks what the values point at and what the machine
can do. `align <stage>` runs it right after loading the config, before the recipe (and torch) is
imported, so a bad input fails in a fraction of a second (SFT's last check loads the model's tokenizer, a
second or two); each recipe's main runs it first thing
too, for callers that skip the CLI (the pipeline, tests), and a config object the CLI has just
checked is not checked twice. Nothing is written here: a run directory is probed, not created.

What is checked:
  run.dir          not a file, no file in the way, writable (probed with a temporary folder)
  model.name       an embedded name, a model folder (config.json, readable weights, tokenizer),
                   or a Hub id, which offline must already be in the Hugging Face cache
  adapters         sft=, policy=, reward_model=, policies=, adapter=, serve's adapters and run: adapter_config.json,
                   adapter_model.safetensors readable to its end, tokenizer files, the base model
                   they name (as model.name above), and align.json: a stage folder without one is
                   unfinished and refused; a reward_model an `align reward` folder, eval's policies, sft=,
                   sample's policy and serve's adapters a policy stage's (by align.json's stage, else adapter_config.json's task_type)
  data             every record of data.path / prompts (file and line named; not UTF-8 included)
  positions        a model with a table of learned positions (GPT-2's n_positions): model.max_length within
                   it, and for sample, eval and ppo each prompt (tokenized only then) with max_new_tokens
  chat template    sft: the model's tokenizer loads as the recipe loads it, and its chat template renders
                   the first example (with data.system_prompt) and the first with a system turn of its own
  checkpoints      train.resume_from_checkpoint: a checkpoint folder with its files, or latest
  the machine      train.liger, generation.backend=vllm (CUDA and the package; no DoRA adapter), processes
                   for ppo
  serving          one base for every served adapter; an API key when host is not loopback
  store, scorer    a database URL align supports, the store existing for export; a scorer resolves
  selection        sample's selection=uncertainty: a reward model with its heads (reward_heads.safetensors)

A missing upstream artifact (no SFT adapter in run.dir, ...) is a StageError saying which stage
to run first; `pending` names stages the pipeline will run before this one, whose folders need
not exist yet.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from align import StageError, process_count
from align.artifacts import (
    HEADS_FILE,
    LOCK,
    MANIFEST,
    STAGES,
    STORE_FILE,
    key_prefix,
    merge_paths,
    pipeline_stages,
    resolve_policies,
    round_batch,
    run_store,
    shell,
    stage_dir,
    stages_of_kind,
)
from align.config import ConfigError
from align.data import (
    DataError,
    iter_records,
    load_prompts,
    read_sft_examples,
    to_prompt_completion,
    with_system_prompt,
)
from align.embedded import model_key

# The last config object checked: the CLI checks before importing the recipe, whose main checks
# again (it can be called without the CLI); the same object is not checked twice.
_last_checked: tuple[str, Any] | None = None


def check_stage(stage: str, cfg: Any, *, pending: Collection[str] = (), prefix: str = "") -> None:
    """Check everything `stage` will read or write, raising the first problem found."""
    global _last_checked
    if _last_checked is not None and _last_checked[0] == stage and _last_checked[1] is cfg and not pending:
        return
    p = prefix or (key_prefix(stage) if stage != "pipeline" else "")
    if stage not in ("serve", "merge"):  # the stages that open a W&B run
        check_wandb(p, cfg.run)
    CHECKS[stage](cfg, set(pending), p)
    if not pending and not prefix:
        _last_checked = (stage, cfg)


# ---------------------------------------------------------------------------- stages


def _sft(cfg, pending: set[str], p: str) -> None:
    _launcher(p, cfg)
    _liger(cfg.train.liger)
    check_run_dir(f"{p}run.dir", cfg.run.dir, "sft")
    check_model(f"{p}model.name", cfg.model.name)
    check_target_modules(f"{p}lora.target_modules", cfg.lora.target_modules, cfg.model.name)
    check_max_length(f"{p}model.max_length", cfg.model.max_length, cfg.model.name)
    try:
        report = read_sft_examples(cfg.data.path, cfg.data.format, on_error=cfg.data.on_error)[2]
        if report.held_out:  # trained against it: a bad record there is as fatal as one in train
            read_sft_examples(cfg.data.path, report.format, on_error=cfg.data.on_error, split=report.held_out)
    except DataError as err:
        raise DataError(f"{p}data.path: {err}") from None
    check_checkpoint(f"{p}train.resume_from_checkpoint", cfg.train.resume_from_checkpoint,
                     max_steps=cfg.train.max_steps)
    check_chat_template(p, cfg.model.name, cfg.data, report)  # last: it loads the tokenizer


def _sample(cfg, pending: set[str], p: str) -> None:
    _backend(cfg.generation)
    check_run_dir(f"{p}run.dir", cfg.run.dir, "sample")
    if cfg.policy is not None:
        check_policy(f"{p}policy", cfg.policy)
        _on_policys_base(p, cfg, cfg.policy, "the policy sampled")
    elif "sft" not in pending:
        default = stage_dir(cfg.run.dir, "sft")
        if not default.exists():
            raise StageError(f"no policy at {default}: run `align sft run.dir={cfg.run.dir}` first, "
                             f"or pass {p}policy=<adapter or model folder>")
        check_policy(f"{p}policy (default {default})", str(default))
        _on_policys_base(p, cfg, default, "the policy sampled")
    _vllm_takes_no_dora(cfg.generation, {f"{p}policy": cfg.policy or stage_dir(cfg.run.dir, "sft")}, p)
    prompts = _prompts(f"{p}prompts", cfg.prompts)
    # The SFT still to run in a pipeline: on model.name, its base
    policy = cfg.policy or (cfg.model.name if "sft" in pending else stage_dir(cfg.run.dir, "sft"))
    check_generation_fits(p, policy, prompts, cfg.prompts, cfg.generation.max_new_tokens)
    check_store(f"{p}store", cfg.store, cfg.run.dir, must_exist=False)
    if cfg.selection == "uncertainty":
        check_selection_model(f"{p}selection_reward_model", cfg.selection_reward_model, cfg.run.dir)


def _export(cfg, pending: set[str], p: str) -> None:
    check_run_dir(f"{p}run.dir", cfg.run.dir, "export")
    if cfg.output:
        check_run_dir(f"{p}output", cfg.output)
    check_store(f"{p}store", cfg.store, cfg.run.dir, must_exist="sample" not in pending)
    # A pipeline whose stages before export label nothing, on a store with no rankings, could only fail
    # at export, after those stages' minutes of work.
    if pending and "label" not in pending and not _has_rankings(cfg.store, cfg.run.dir):
        raise ConfigError(f"stages: export needs submitted rankings, the store has none, and no label stage runs "
                          f"before it ({', '.join(sorted(pending))} do not rank); add label to stages")


def _existing_store(url: str | None, run_dir: str):
    """The labelling store at `url` (default <run_dir>/labels.db), or None for a SQLite file that is not
    there (it is not made: a preflight writes nothing)."""
    from align.labeling.store import Store, sqlite_path, sqlite_url

    url = url or sqlite_url(Path(run_dir) / "labels.db")
    if sqlite_path(url) is not None and not Path(sqlite_path(url)).is_file():
        return None
    return Store(url)


def _has_rankings(url: str | None, run_dir: str) -> bool:
    """The store holds a submitted ranking."""
    store = _existing_store(url, run_dir)
    return store is not None and any(batch["rankings"] for batch in store.batch_counts())


def _has_accounts(url: str | None, run_dir: str) -> bool:
    """The store has an account to sign in with (a disabled one is not)."""
    store = _existing_store(url, run_dir)
    return store is not None and any(not u["disabled"] for u in store.users())


def _reward(cfg, pending: set[str], p: str) -> None:
    _launcher(p, cfg)
    _liger(cfg.train.liger)
    check_run_dir(f"{p}run.dir", cfg.run.dir, "reward")
    if cfg.from_sft:
        _upstream_sft(f"{p}sft", cfg.sft, cfg.run.dir, pending, "the reward model is built on the SFT model",
                      "or from_sft=false to build it on the raw base")
    else:
        check_model(f"{p}model.name", cfg.model.name)
    if not cfg.from_sft or cfg.sft is not None or "sft" not in pending:
        base = cfg.model.name if not cfg.from_sft else _adapter_base(cfg.sft or stage_dir(cfg.run.dir, "sft"))
        if cfg.from_sft:
            _on_policys_base(p, cfg, cfg.sft or stage_dir(cfg.run.dir, "sft"), "the reward model is built on the SFT "
                             "model (from_sft=true)")
        check_target_modules(f"{p}lora.target_modules", cfg.lora.target_modules, base)
    check_max_length(f"{p}model.max_length", cfg.model.max_length,
                     base if not cfg.from_sft or cfg.sft is not None or "sft" not in pending else cfg.model.name)
    pairs = _preference_data(f"{p}data.path", cfg.data, cfg.run.dir, pending)
    if not cfg.from_sft or cfg.sft is not None or "sft" not in pending:  # (an sft about to be remade: not its folder)
        _pairs_render(f"{p}data.path", pairs, Path(cfg.sft or stage_dir(cfg.run.dir, "sft")) if cfg.from_sft
                      else cfg.model.name)
    check_checkpoint(f"{p}train.resume_from_checkpoint", cfg.train.resume_from_checkpoint,
                     max_steps=cfg.train.max_steps)
    if cfg.probe_scorer:
        check_scorer(f"{p}probe_scorer", cfg.probe_scorer)


def _dpo(cfg, pending: set[str], p: str) -> None:
    _launcher(p, cfg)
    _liger(cfg.train.liger)
    check_run_dir(f"{p}run.dir", cfg.run.dir, "dpo")
    _upstream_sft(f"{p}sft", cfg.sft, cfg.run.dir, pending, "DPO starts from the SFT policy and keeps it as the "
                  "reference")
    if cfg.sft is not None or "sft" not in pending:
        _on_policys_base(p, cfg, cfg.sft or stage_dir(cfg.run.dir, "sft"), "DPO trains the SFT adapter")
    check_max_length(f"{p}model.max_length", cfg.model.max_length, _adapter_base(cfg.sft or stage_dir(cfg.run.dir, "sft"))
                     if cfg.sft is not None or "sft" not in pending else cfg.model.name)
    pairs = _preference_data(f"{p}data.path", cfg.data, cfg.run.dir, pending)
    if cfg.sft is not None or "sft" not in pending:  # (an sft about to be remade: not the folder there now)
        _pairs_render(f"{p}data.path", pairs, Path(cfg.sft or stage_dir(cfg.run.dir, "sft")))
    check_checkpoint(f"{p}train.resume_from_checkpoint", cfg.train.resume_from_checkpoint,
                     max_steps=cfg.train.max_steps)


def _ppo(cfg, pending: set[str], p: str) -> None:
    rl = cfg.rl
    _backend(cfg.generation)
    world = process_count()
    if cfg.algo == "ppo" and world > 1 and (rl.rollout_prompts % world or rl.minibatch_size % world):
        raise ConfigError(f"{p}rl.rollout_prompts={rl.rollout_prompts} and rl.minibatch_size={rl.minibatch_size} are "
                          f"split between {world} processes: both must be multiples of {world}")
    _launcher(p, cfg)
    _liger(cfg.train.liger)
    check_run_dir(f"{p}run.dir", cfg.run.dir, cfg.algo)
    default_sft = stage_dir(cfg.run.dir, "sft")
    if cfg.sft == "none" or (cfg.sft is None and cfg.scorer and not default_sft.exists() and "sft" not in pending):
        check_model(f"{p}model.name", cfg.model.name)  # a fresh LoRA on it
        check_target_modules(f"{p}lora.target_modules", cfg.lora.target_modules, cfg.model.name)
    else:
        _upstream_sft(f"{p}sft", cfg.sft, cfg.run.dir, pending, "PPO starts from the SFT policy and keeps it as the "
                      "reference", "or pass sft=none to start from model.name")
        if cfg.sft is not None or "sft" not in pending:
            _on_policys_base(p, cfg, cfg.sft or default_sft, "PPO trains the SFT adapter")
    if cfg.scorer:
        check_scorer(f"{p}scorer", cfg.scorer)
    elif cfg.reward_model is not None:
        check_adapter(f"{p}reward_model", cfg.reward_model, tokenizer=True, kind="reward")
    elif "reward" not in pending:
        default = stage_dir(cfg.run.dir, "reward")
        if not default.exists():
            raise StageError(f"no reward model at {default}: run `align reward run.dir={shell(cfg.run.dir)}` first, pass "
                             f"{p}reward_model=<folder>, or use a programmatic reward with {p}scorer=<name or "
                             "module:function>")
        check_adapter(f"{p}reward_model (default {default})", default, tokenizer=True, kind="reward")
    if rl.reward_on_policy_base and "reward" not in pending and (cfg.sft == "none" or "sft" not in pending):
        from align.reward_model import check_shared_base

        sft = None if cfg.sft == "none" else Path(cfg.sft or default_sft)
        check_shared_base(Path(cfg.reward_model or stage_dir(cfg.run.dir, "reward")), sft,
                          _adapter_base(sft) if sft else cfg.model.name, cfg.model, p)
    prompts = _prompts(f"{p}prompts", cfg.prompts)
    fresh = cfg.sft == "none" or (cfg.sft is None and not default_sft.exists())  # a fresh LoRA, or a pending SFT's
    check_generation_fits(p, cfg.model.name if fresh else cfg.sft or default_sft, prompts, cfg.prompts,
                          cfg.generation.max_new_tokens)
    n = len(prompts) if cfg.num_prompts < 0 else min(cfg.num_prompts, len(prompts))
    if cfg.algo == "ppo" and rl.rollout_prompts > n:
        raise ConfigError(f"{p}rl.rollout_prompts={rl.rollout_prompts}: a rollout takes that many different prompts, "
                          f"and {cfg.prompts} gives {n}{f' (num_prompts={cfg.num_prompts})' if cfg.num_prompts > 0 else ''}")
    check_checkpoint(f"{p}train.resume_from_checkpoint", cfg.train.resume_from_checkpoint,
                     ppo=cfg.algo == "ppo", max_steps=cfg.train.max_steps)


def _eval(cfg, pending: set[str], p: str) -> None:
    _backend(cfg.generation)
    check_run_dir(f"{p}run.dir", cfg.run.dir, "eval")
    for name, folder in (cfg.policies or {}).items():
        check_adapter(f"{p}policies.{name}", folder, tokenizer=True, kind="policy")
        _on_policys_base(p, cfg, folder, "every policy is an adapter on its base")
    names = list(cfg.policies or stages_of_kind("policy"))
    _vllm_takes_no_dora(cfg.generation, {f"{p}policies.{name}": folder for name, folder in cfg.policies.items()}
                        if cfg.policies else {f"{p}policies ({name}: default)": stage_dir(cfg.run.dir, name)
                                              for name in names if name not in pending}, p)
    if cfg.baseline not in names:
        raise ConfigError(f"{p}baseline: {cfg.baseline!r} is not {'among the policies' if cfg.policies else 'a policy stage'}; "
                          f"allowed values: {', '.join(names)}")
    if not pending:  # too few policies (none trained yet), before the recipe's imports
        resolve_policies(cfg)
    prompts = _prompts(f"{p}prompts", cfg.prompts)
    folders = list((cfg.policies or {}).values()) or [stage_dir(cfg.run.dir, s) for s in names]
    for policy in dict.fromkeys(str(f) if Path(f).exists() else cfg.model.name for f in folders):
        check_generation_fits(p, policy, prompts, cfg.prompts, cfg.generation.max_new_tokens)  # (a stage to run: its base)
    if cfg.reward_model not in (None, "none"):
        check_adapter(f"{p}reward_model", cfg.reward_model, tokenizer=True, kind="reward")
    elif cfg.reward_model is None and "reward" not in pending and stage_dir(cfg.run.dir, "reward").exists():
        check_adapter(f"{p}reward_model (default {stage_dir(cfg.run.dir, 'reward')})", stage_dir(cfg.run.dir, "reward"),
                      tokenizer=True, kind="reward")
    if cfg.scorer:
        check_scorer(f"{p}scorer", cfg.scorer)
    if cfg.human:  # the store the A/B tasks go to: given, or the one the run's labels are in
        check_store(f"{p}store", run_store(cfg.store, cfg.run.dir, f"{p}store"), cfg.run.dir, must_exist=False)
    default_rm = stage_dir(cfg.run.dir, "reward")
    policies = cfg.policies or pending or any(stage_dir(cfg.run.dir, s).exists() for s in names)  # else: "no policies"
    if policies and not (cfg.scorer or cfg.human) and (cfg.reward_model == "none" or (
            cfg.reward_model is None and "reward" not in pending and not default_rm.exists())):
        # else eval fails after the policies have answered (align/recipes/evaluate.py: "no judge"), after the stages before it
        why = "reward_model=none" if cfg.reward_model == "none" else f"no reward model at {default_rm}"
        there = f"{p}reward_model={shell(default_rm)}, " if default_rm.exists() else f"{p}reward_model=<folder>, "
        raise ConfigError(f"no judge for eval: {why} and no scorer; pass {p}scorer=support_style (or any "
                          f"module:function), {there}or {p}human=true")


def _merge(cfg, pending: set[str], p: str) -> None:
    adapter, output = merge_paths(cfg)
    if cfg.adapter is None and not adapter.exists():
        raise StageError(f"{adapter} is not an adapter folder (no adapter_config.json); "
                         "pass adapter=<folder written by align sft/dpo/ppo>")
    # a reward model's LoRA, folded into a causal LM, made a "merged model" without its score head
    check_adapter(f"{p}adapter", adapter, tokenizer=True, kind="policy")
    check_run_dir(f"{p}output", output)
    # The merged weights are written into the folder: another stage's artifact (output=<the adapter>) lost
    # its record to merge's align.json and config.yaml. An earlier merge's output is replaced.
    if output.is_dir() and any(output.iterdir()):
        manifest = output / "align.json"
        stage = _read_json(f"{p}output", manifest).get("stage") if manifest.is_file() else None
        if stage != "merge":
            what = f"align {stage}'s artifact" if stage else "files that are not a merged model"
            raise ConfigError(f"{p}output={output}: the folder holds {what}; give a new or empty folder "
                              "(an earlier merge's output is replaced)")


def _serve(cfg, pending: set[str], p: str) -> None:
    """What `align serve` will load, and whether it may listen where it is asked to, before any model loads."""
    from align.serving import API_KEY_ENV, api_key, is_loopback, served_models, shared_base

    _backend(cfg.generation)
    if cfg.discover and not Path(cfg.run.dir).is_dir() and not cfg.adapters and cfg.model.name == "auto":
        raise StageError(f"run.dir={cfg.run.dir}: no such run directory to serve the adapters of; train one "
                         f"(`align sft run.dir={cfg.run.dir}`) or pass adapters={{name: folder}}")
    if Path(cfg.run.dir).exists() and not Path(cfg.run.dir).is_dir():
        raise ConfigError(f"{p}run.dir={cfg.run.dir}: a file, not a folder")
    models = served_models(cfg, warn=False)
    for name, folder in models.items():
        key = f"{p}adapters.{name}" if name in (cfg.adapters or {}) else f"{p}run.dir's {name}"
        check_adapter(key, folder, tokenizer=True, kind="policy")
    _vllm_takes_no_dora(cfg.generation, {f"{p}adapters.{name}" if name in (cfg.adapters or {}) else f"{p}run.dir's {name}":
                                         folder for name, folder in models.items()}, p)
    if cfg.model.name != "auto":
        check_model(f"{p}model.name", cfg.model.name)
    shared_base(models, cfg)  # one base for all, and model.name that base
    key = api_key(cfg)
    if key is None and not is_loopback(cfg.host):
        raise ConfigError(f"{p}host={cfg.host}: binding beyond this machine needs an API key, or anyone who can reach "
                          f"the port can use the models; set {API_KEY_ENV} (e.g. export {API_KEY_ENV}=$(openssl rand "
                          "-hex 16)) or api_key=, or serve on host=127.0.0.1")
    if key is not None and len(key) < 8:
        raise ConfigError(f"{p}api_key (or {API_KEY_ENV}): too short to keep anyone out; use 8 characters or more")


# The pipeline's stages that do not split their work between processes (sample and eval refuse several; label
# and export open the labelling store, which no training stage does).
ONE_PROCESS_STAGES = ("sample", "label", "export", "eval")


def _pipeline(cfg, pending: set[str], p: str) -> None:
    """Each stage's section as the pipeline runs it (align/recipes/pipeline.py), the stages before it pending.

    The pipeline points sample, reward, dpo and ppo at <run.dir>/sft, each stage's default: left
    unset here, so that a folder an earlier stage will write is not required to exist yet.
    """
    from align.labeling.store import sqlite_url

    check_run_dir("run.dir", cfg.run.dir)
    _pipeline_sets(cfg)
    world = process_count()
    one_process = [s for s in cfg.stages if s in ONE_PROCESS_STAGES]
    if world > 1 and one_process:  # else they refuse only when reached, after the training before them
        raise ConfigError(
            f"stages: {', '.join(one_process)} run as one process, and this pipeline was started with {world} "
            f"(accelerate launch); run the pipeline as one process (align pipeline ...), or under accelerate "
            f"launch only its training stages (stages: [{', '.join(s for s in cfg.stages if s not in one_process)}], "
            f"or each as accelerate launch ... -m align.cli <stage> run.dir={shell(cfg.run.dir)}) and "
            f"{', '.join(one_process)} with plain align")
    _later_rounds_reward(cfg)
    _vllm_after_dora_sft(cfg)
    if "label" in cfg.stages and cfg.label == "simulate":
        check_scorer("scorer", cfg.scorer)
    if "label" in cfg.stages and cfg.label == "human":
        check_store("sample.store", cfg.sample.store, cfg.run.dir, must_exist=False)
        if not _has_accounts(cfg.sample.store, cfg.run.dir):  # the app would refuse to start, after sft and sample
            from align.labeling.store import safe_url

            db = f" --db '{safe_url(cfg.sample.store)}'" if cfg.sample.store else ""  # its password masked
            raise ConfigError(f"label=human: the labelling store has no accounts to sign in with; make one first: "
                              f"align label --run-dir {cfg.run.dir}{db} users add NAME --admin")
    run, base = cfg.run, cfg.sft.model.name

    def on_base(section: Any) -> Any:
        return replace(section, run=run, model=replace(section.model, name=base))

    sample = on_base(cfg.sample)
    if cfg.sample.selection_reward_model is None:  # round 0 has no reward model yet: it samples at random
        sample = replace(sample, selection="random", pool_factor=1.0, explore=0.0)
    sections = {
        "sft": replace(cfg.sft, run=run), "export": replace(cfg.export, run=run),
        "sample": replace(sample, policy=None),
        "reward": replace(on_base(cfg.reward), sft=None,
                          probe_scorer=cfg.reward.probe_scorer or cfg.labelling_scorer),
        "dpo": replace(on_base(cfg.dpo), sft=None), "ppo": replace(on_base(cfg.ppo), sft=None),
        # Its judge as the pipeline names it; this round's reward stage, still to run, by eval's default
        # and its A/B tasks (human=true) in the pipeline's one store, as it runs it
        "eval": replace(on_base(cfg.eval), scorer=cfg.eval.scorer or cfg.labelling_scorer,
                        store=cfg.sample.store or sqlite_url(Path(cfg.run.dir).resolve() / STORE_FILE),
                        reward_model=None if "reward" in cfg.stages and not cfg.eval.reward_model
                        else cfg.eval_reward_model(cfg.run.dir)),
    }
    ordered = [s for s in pipeline_stages() if s in cfg.stages]  # the order they run in, not as listed
    for i, stage in enumerate(ordered):
        if stage != "label":
            check_stage(stage, sections[stage], pending=set(ordered[:i]), prefix=f"{stage}.")
    _prompts_for_every_round(cfg)
    _export_batches(cfg)


# What a later round or a later stage needs that the first stages' checks do not see: refused here, before
# round 0 trains, not when round 1 (or export) gets to it.
def _later_rounds_reward(cfg) -> None:
    """PPO in round r > 0 trains on round r's reward model (<run.dir>/round-r/reward): a stage must make it."""
    if cfg.rounds > 1 and "ppo" in cfg.stages and "reward" not in cfg.stages and not (cfg.ppo.scorer or
                                                                                        cfg.ppo.reward_model):
        raise ConfigError(f"rounds={cfg.rounds}: ppo trains in each round on that round's reward model "
                          "(<run.dir>/round-1/reward for round 1), and no stage here trains one: add reward to "
                          "stages, or set ppo.reward_model=<folder> (one for every round) or ppo.scorer=<name or "
                          "module:function>")


def _prompts_for_every_round(cfg) -> None:
    """Each round samples sample.num_prompts prompts no earlier round used (align/recipes/sample.py): the file must hold
    them all, or a later round samples fewer or none, after the rounds before it. (An uncertainty-picked round's
    pool of pool_factor x as many is cut to the prompts left: a smaller pool, not a refusal.)"""
    s = cfg.sample
    if cfg.rounds < 2 or "sample" not in cfg.stages:
        return
    have = len(set(load_prompts(s.prompts)))  # a prompt twice in the file is one task
    if s.num_prompts < 0:
        raise ConfigError(f"sample.num_prompts=-1 (every prompt) with rounds={cfg.rounds}: round 0 takes all {have} "
                          f"prompts of {s.prompts} and round 1 finds none that no earlier round used; set "
                          f"sample.num_prompts=N (at most {have // cfg.rounds} for {cfg.rounds} rounds)")
    need = s.num_prompts * cfg.rounds
    if have >= need:
        return
    raise ConfigError(f"sample.prompts={s.prompts}: {have} distinct prompts, and rounds={cfg.rounds} need {need}: each "
                      f"round samples sample.num_prompts={s.num_prompts} prompts no earlier round used. Give more "
                      f"prompts, or lower sample.num_prompts (to {have // cfg.rounds} or fewer) or rounds")


def _export_batches(cfg) -> None:
    """export.batches names batches of the store or batches this pipeline samples (round-<r>): another name
    exports nothing (a typo), after the stages before export have run."""
    if "export" not in cfg.stages or not cfg.export.batches:
        return
    planned = [round_batch(r) for r in range(cfg.rounds)] if "sample" in cfg.stages else []
    store = _existing_store(cfg.sample.store, cfg.run.dir)
    stored = store.batches() if store is not None else []
    for name in cfg.export.batches:
        if name not in stored and name not in planned:
            raise ConfigError(f"export.batches: {name!r} is not a batch of the store ({', '.join(stored) or 'none yet'})"
                              f" nor one this pipeline samples ({', '.join(planned) or 'none: no sample stage'}); "
                              "name those, or leave export.batches unset (each round exports its batch and the "
                              "earlier rounds')")


def _pipeline_sets(cfg) -> None:
    """Refuse the keys the pipeline sets itself (each stage wired to the one before it in run.dir): a
    value given for one would be replaced without a word."""
    from align.config import RunConfig

    wired = {"sample.policy": cfg.sample.policy, "sample.batch": cfg.sample.batch,
             "sample.round": cfg.sample.round or None, "export.output": cfg.export.output,
             **{f"{s}.sft": getattr(cfg, s).sft for s in ("reward", "dpo", "ppo")}}
    for key, value in wired.items():
        if value is not None:
            stage = key.split(".")[0]
            raise ConfigError(f"{key}={value}: align pipeline sets it itself (each stage reads the one before it "
                              f"in run.dir, round by round); leave it unset, or run `align {stage}` on its own")
    for section in ("export", "eval"):
        store = getattr(cfg, section).store
        if store is not None and store != cfg.sample.store:
            from align.labeling.store import safe_url

            raise ConfigError(f"{section}.store={safe_url(store)}: the pipeline's stages share one labelling store, "
                              "sample.store (default <run.dir>/labels.db); set that instead")
    trained = [s for s in cfg.stages if s in ("dpo", "ppo")]
    if "eval" in cfg.stages and not trained and not cfg.eval.policies:
        raise ConfigError(f"stages={list(cfg.stages)}: eval compares the SFT policy with one trained after it, and "
                          "no stage here trains one: add dpo or ppo to stages, or set eval.policies={name: folder, "
                          "...} (two or more)")
    for name in ("sft", "sample", "export", "reward", "dpo", "ppo", "eval"):
        section = getattr(cfg, name)
        if section.run != RunConfig():
            changed = next(k for k, v in vars(section.run).items() if v != getattr(RunConfig(), k))
            raise ConfigError(f"{name}.run.{changed}: the pipeline's stages share the top-level run section; "
                              f"set run.{changed} instead")
        own = getattr(section, "model", None)
        if own is not None and own.name not in (type(section)().model.name, cfg.sft.model.name):
            raise ConfigError(f"{name}.model.name={own.name}: the pipeline runs every stage on the SFT's base "
                              f"(sft.model.name={cfg.sft.model.name}); set sft.model.name, or run `align {name}` "
                              "on its own")


# ---------------------------------------------------------------------------- what a key points at


def check_run_dir(key: str, folder: str | Path, stage: str | None = None) -> None:
    """A folder align can create and write in: not a file, nothing in the way, writable."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={folder}: a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is a file, so the folder cannot be made")
    try:  # os.access says yes to root on a read-only mount: ask the file system instead
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".align-write-check-"))
    except OSError as err:
        raise ConfigError(f"{key}={folder}: cannot write in {existing} ({err.strerror or err})") from None
    if stage and (path / stage).exists() and not (path / stage).is_dir():
        raise ConfigError(f"{key}={folder}: {path / stage} is a file where the {stage} stage writes its folder")


def check_wandb(p: str, run) -> None:
    """W&B online (run.wandb=online, or WANDB_MODE=online under auto) where it cannot start a run: no key, a
    server that does not answer, or one that refuses the key. wandb.init then failed (no key; without a terminal it
    asks for none), waited 90 s and failed, or failed with "user is not logged in", when the stage opened its run:
    for sample and eval after every answer was generated and judged, and the stage ended with no manifest (its
    work redone on the next run, a previous eval's manifest removed)."""
    from align.tracking import (
        has_wandb_key,
        wandb_host,
        wandb_key_refusal,
        wandb_key_source,
        wandb_mode,
        wandb_reachable,
    )

    if wandb_mode(run) != "online":
        return
    asked = f"{p}run.wandb=online" if run.wandb == "online" else f"WANDB_MODE=online (with {p}run.wandb=auto)"
    host = wandb_host()[1]
    if not has_wandb_key():
        raise ConfigError(f"{asked}: no W&B key for {host} (WANDB_API_KEY, or `wandb login`), so no run could be "
                          f"started; log in, or use {p}run.wandb=offline (upload later with `wandb sync`)")
    if not wandb_reachable():
        raise ConfigError(f"{asked}: {host} does not answer, so no run could be started; use {p}run.wandb=auto "
                          "(offline when it does not answer) or offline, and upload later with `wandb sync`")
    if refused := wandb_key_refusal():
        raise ConfigError(f"{asked}: {host} refuses {wandb_key_source()} ({refused}), so no run could be started; "
                          f"log in again (`wandb login --relogin`), or use {p}run.wandb=auto (offline when the key "
                          "is refused) or offline, and upload later with `wandb sync`")


def check_model(key: str, name: str, *, tokenizer: bool = True) -> None:
    """An embedded name, a model folder, or a Hub id that can be loaded here (offline: from the cache)."""
    from align.embedded import EMBEDDED_NAMES, embedded_model_dir, gguf_path

    names = ", ".join(sorted(EMBEDDED_NAMES))
    if name.lower() in EMBEDDED_NAMES:
        if not (embedded_model_dir(convert=False) / "config.json").is_file():
            try:
                gguf_path()
            except FileNotFoundError as err:
                raise ConfigError(f"{key}={name}: {err}") from None
        return
    path = Path(name).expanduser()
    if path.exists():
        check_model_folder(key, path, tokenizer=tokenizer)
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ConfigError(f"{key}={name}: no such folder (and not an embedded model name: {names})")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{key}={name!r}: not an embedded model name ({names}), no such folder, and not a Hub id "
                          "(owner/name)") from None
    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ConfigError(f"{key}={name}: not an embedded model name ({names}) and no such local folder; the Hugging "
                          "Face Hub is unreachable (offline), so a local model folder was expected (or a Hub id "
                          "already in the Hugging Face cache)")


def template_refusal(tokenizer, prompt: list[dict], completion: list[dict]) -> str | None:
    """What the chat template says when it refuses to render `prompt` + `completion` (or the prompt waiting for its
    answer), in one line; None when it renders both."""
    try:  # the template is the model's own code: whatever it raises is its refusal
        tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as err:
        return _first_line(err)
    return None


def check_chat_template(p: str, model: str, data, report) -> None:
    """The model's tokenizer loads as SFT loads it (align.modeling.load_tokenizer) and its chat template
    renders the first training example, with data.system_prompt, and the first that opens with a system turn of
    its own: a template that refuses the system role (Gemma's) or a conversation's order, or a
    tokenizer with neither a template nor an EOS, is named here in one line, not by a traceback after the model
    has loaded. `report`: read_sft_examples' report of data.path (its format; whether any example opens with a
    system turn). The tokenizer is all that loads, and records are read only up to the ones rendered."""
    from align.embedded import EMBEDDED_NAMES

    if model.lower() in EMBEDDED_NAMES:  # align's own, with a template that takes every role
        return
    from align.modeling import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except Exception as err:  # the model's own files and code (a tokenizer class, sentencepiece): any failure
        said = _first_line(err)
        raise ConfigError(f"{p}model.name={said}" if said.startswith(f"{model}: ") else
                          f"{p}model.name={model}: its tokenizer does not load ({said})") from None

    def fails(prompt: list[dict], completion: list[dict]) -> str | None:
        return template_refusal(tokenizer, prompt, completion)

    def examples():
        for where, record in iter_records(data.path):
            if isinstance(record, DataError):
                continue  # skipped (data.on_error=skip): read_sft_examples has said so
            try:
                prompt, completion = to_prompt_completion(record, report.format, where)
            except DataError:
                continue
            yield where, prompt, completion

    refuses = f"the chat template of {p}model.name={model} refuses"
    advice = "use a model whose chat template takes a system turn"
    for i, (where, prompt, completion) in enumerate(examples()):
        own_system = prompt[0]["role"] == "system"
        if i and not own_system:
            continue
        problem = fails(prompt, completion)
        if problem:
            hint = f"; drop its system turn, or {advice}" if own_system and "system" in problem.lower() else ""
            raise DataError(f"{p}data.path: {where}: {refuses} this example's conversation ({problem}){hint}")
        if data.system_prompt and not own_system:
            problem = fails(with_system_prompt(prompt, data.system_prompt), completion)
            if problem:
                raise ConfigError(f"{p}data.system_prompt: {refuses} a conversation opening with it ({problem}, on "
                                  f"{where}); unset data.system_prompt, or {advice}")
        if own_system or data.system_prompt or not (report.system or report.systems[0]):
            return  # a system turn rendered, or none in the data: else on to the first example with one


# Model types whose positions are a table of so many rows (learned; CTRL's fixed sinusoids): a longer sequence
# indexes past its end, an IndexError in the embedding mid-training. Rotary (Llama, Qwen, Mistral, GPT-NeoX)
# and ALiBi (BLOOM) models have no table: past max_position_embeddings they degrade, they do not fail.
TABLE_POSITIONS = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "openai-gpt", "ctrl"}


def model_config(model: str | Path, *, download: bool = False) -> dict[str, Any] | None:
    """A model's config.json: from its folder, else the Hugging Face cache, else (with `download`, when online)
    the Hub; None where none is to be had (not a Hub id, offline and not cached, gated) or it is not a JSON object."""
    file = Path(model).expanduser() / "config.json"
    if not file.is_file():
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        try:
            found = hf_hub_download(str(model), "config.json") if download else \
                try_to_load_from_cache(str(model), "config.json")
        except Exception:  # not a Hub id (an embedded name), offline, gated, no network
            return None
        if not isinstance(found, str):
            return None
        file = Path(found)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def position_limit(model: str | Path) -> tuple[int, str] | None:
    """(how many positions, the config.json key that says so) of a model with a table of positions, read from its
    folder or the Hugging Face cache; None for any other model, or one whose config is not here to read."""
    config = model_config(model)
    if config is None or config.get("model_type") not in TABLE_POSITIONS:
        return None
    key = next((k for k in ("n_positions", "max_position_embeddings") if isinstance(config.get(k), int)), None)
    return (config[key], key) if key else None


def check_max_length(key: str, max_length: int, model: str) -> None:
    """model.max_length within the positions of a model with a table of them (GPT-2's n_positions)."""
    limit = position_limit(model)
    if limit is not None and max_length > limit[0]:
        raise ConfigError(f"{key}={max_length}: {model} has positions for {limit[0]} tokens ({limit[1]} in its "
                          "config.json: a table of learned positions, and a longer example has none to embed); "
                          f"set {key}={limit[0]} or less")


def check_generation_fits(p: str, policy: str | Path, prompts: list[str], source: str, max_new_tokens: int) -> None:
    """Each prompt (chat template and the policy's system prompt around it) with generation.max_new_tokens after it
    within the positions of a policy (an adapter or model folder, a model name) on a base with a table of them
    (check_max_length). The prompts are tokenized only for such a base."""
    folder = Path(policy).expanduser()
    base = _adapter_base(folder) if (folder / "adapter_config.json").is_file() else str(policy)
    limit = position_limit(base) if base else None
    if limit is None:
        return
    key = f"{p}generation.max_new_tokens"
    if max_new_tokens >= limit[0]:
        raise ConfigError(f"{key}={max_new_tokens}: {base} has positions for {limit[0]} tokens ({limit[1]} in its "
                          f"config.json), prompt and answer together; set {key} well below {limit[0]}")
    from align.artifacts import system_prompt_of
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(folder if folder.is_dir() else policy))
    system = system_prompt_of(folder if folder.is_dir() else None)
    opening = [{"role": "system", "content": system}] if system else []

    def length(prompt: str) -> int:
        ids = tokenizer.apply_chat_template([*opening, {"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    lengths = [length(prompt) for prompt in dict.fromkeys(prompts)]
    longest = max(lengths)
    if longest + max_new_tokens > limit[0]:
        over = sum(n + max_new_tokens > limit[0] for n in lengths)
        fix = (f"lower {key} to {limit[0] - longest} or less, or shorten those prompts" if longest < limit[0]
               else "shorten or drop those prompts")
        raise ConfigError(f"{key}={max_new_tokens}: {over} of the {len(lengths)} prompts of {source} leave fewer than "
                          f"{max_new_tokens} of the {limit[0]} positions of {base} for the answer ({limit[1]} in its "
                          "config.json: a table of learned positions; the longest prompt is "
                          f"{longest} tokens in {policy}'s chat template{' with its system prompt' if system else ''}); "
                          f"{fix}")


def check_model_folder(key: str, path: Path, *, tokenizer: bool = True) -> None:
    if not path.is_dir():
        raise ConfigError(f"{key}={path}: a file, not a model folder")
    if not (path / "config.json").is_file():
        hint = (": it is a LoRA adapter folder; pass it where an adapter goes (sft=, policy=, adapter=)"
                if (path / "adapter_config.json").is_file() else ": not a transformers model folder")
        raise ConfigError(f"{key}={path}: no config.json{hint}")
    _read_json(key, path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(key, index).get("weight_map", {}).values()))
        weights = [path / s for s in shards]
        missing = [w.name for w in weights if not w.is_file()]
        if missing:
            raise ConfigError(f"{key}={path}: {index.name} lists shards that are not there: {', '.join(missing[:3])}")
    else:
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"{key}={path}: no weights in it (model.safetensors or pytorch_model.bin)")
    for file in weights:
        check_weights_file(key, file)
    if tokenizer:
        _tokenizer_files(key, path)


# What a key that takes an adapter of a kind needs: the stages that write one, and the peft task type its
# adapter_config.json records (a causal LM's LoRA, or a sequence classifier's with its score head).
ADAPTER_KINDS = {"policy": ("a policy", "CAUSAL_LM"), "reward": ("a reward model", "SEQ_CLS")}


def check_adapter(key: str, folder: str | Path, *, tokenizer: bool = True,
                  kind: Literal["policy", "reward"] | None = None) -> dict[str, Any]:
    """A complete LoRA adapter folder (ours or peft's) on a base that loads here, and with `kind` the kind the key
    takes (a policy, a reward model: by the stage its align.json names, else its task type); returns its
    adapter_config."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={folder}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"{key}={folder}: a file, not an adapter folder")
    if not any(p.name != LOCK for p in path.iterdir()):
        raise ConfigError(f"{key}={folder}: an empty folder (a stage that stopped before writing anything?)")
    manifest: dict[str, Any] = {}
    if (path / MANIFEST).is_file():
        manifest = _read_json(key, path / MANIFEST)
    elif any((path / f).exists() for f in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise ConfigError(f"{key}={folder}: an unfinished stage folder (no {MANIFEST}, which a stage writes last): "
                          "the run that wrote it stopped before the end; run that stage again "
                          "(train.resume_from_checkpoint=latest continues from its last checkpoint)")
    if not (path / "adapter_config.json").is_file():
        hint = (": it is a full model folder; for a merged model pass model.name=<folder> (ppo: with sft=none)"
                if (path / "config.json").is_file() else "")
        raise ConfigError(f"{key}={folder}: not an adapter folder (no adapter_config.json){hint}")
    config = _read_json(key, path / "adapter_config.json")
    if kind is not None:
        _adapter_kind(key, folder, manifest, config, kind)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() and not (path / "adapter_model.bin").is_file():
        raise ConfigError(f"{key}={folder}: no adapter_model.safetensors in it (the adapter's weights)")
    if weights.is_file():
        check_weights_file(key, weights)
    if tokenizer:
        _tokenizer_files(key, path, "align's stages save it beside the adapter; copy the base model's tokenizer files in")
    base = manifest.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{key}={folder}: adapter_config.json names no base model (base_model_name_or_path) "
                          f"and there is no {MANIFEST} to say which")
    check_model(f"{key}: its base model", str(base), tokenizer=False)
    return config


def _adapter_kind(key: str, folder: str | Path, manifest: dict[str, Any], config: dict[str, Any], kind: str) -> None:
    """Refuse an adapter of another kind than the key takes: eval loaded a policy as its reward model and failed
    after every answer and the KL (an AttributeError), and took a reward model as a policy and judged text
    generated with a classifier's LoRA. By the stage of its align.json, else (an adapter from elsewhere) by its
    task type; neither recorded: not refused."""
    what, task = ADAPTER_KINDS[kind]
    stage, found = manifest.get("stage"), config.get("task_type")
    wanted = ("the folder `align reward` wrote" if kind == "reward" else
              f"a policy adapter (the folder `align {' / '.join(stages_of_kind('policy'))}` wrote)")
    if isinstance(stage, str) and stage in STAGES and stage not in stages_of_kind(kind):
        other = next((f" ({w})" for k, (w, _) in ADAPTER_KINDS.items() if stage in stages_of_kind(k)), "")
        raise ConfigError(f"{key}={folder}: the output of `align {stage}`{other}, not {what}; pass {wanted}")
    if found and found != task:
        raise ConfigError(f"{key}={folder}: its adapter_config.json says task_type {found}, and {what} is a {task} "
                          f"adapter; pass {wanted}")


def check_selection_model(key: str, folder: str | None, run_dir: str) -> None:
    """`align sample selection=uncertainty`'s reward model: an adapter with its uncertainty heads."""
    if folder is None:
        default = stage_dir(run_dir, "reward")
        if not default.exists():
            raise StageError(f"selection=uncertainty picks the tasks a reward model is least sure of, and there is "
                             f"none at {default}: run `align reward run.dir={shell(run_dir)} heads=8` on the labels so far first, pass "
                             "selection_reward_model=<reward model folder>, or use selection=random")
        key, folder = f"{key} (default {default})", str(default)
    check_adapter(key, folder, tokenizer=True, kind="reward")
    path = Path(folder).expanduser()
    # By its manifest where it says (a heads file an earlier run in the folder left is not this model's), else the file
    trained = (_read_json(key, path / MANIFEST).get("config") or {}).get("heads") if (path / MANIFEST).is_file() else None
    heads = path / HEADS_FILE
    if trained == 0 or not heads.is_file():
        what = f"its {MANIFEST} says heads=0" if trained == 0 else f"no {HEADS_FILE} in it"
        raise ConfigError(f"{key}={folder}: {what} (the ensemble of reward heads whose disagreement "
                          "is the uncertainty); it was trained without them: train it again with "
                          f"`align reward run.dir={shell(path.parent)} heads=8`"
                          + ("" if path.name == "reward" else
                             f", which writes {shell(path.parent / 'reward')}: point {key} there"))
    check_weights_file(key, heads)


def check_policy(key: str, policy: str) -> None:
    """`align sample`'s policy: an adapter folder, a model folder, or a model name."""
    path = Path(policy).expanduser()
    stage_folder = any((path / f).exists() for f in (MANIFEST, "config.yaml", "metrics.jsonl", "checkpoints"))
    if path.is_dir() and ((path / "adapter_config.json").is_file() or stage_folder and not (path / "config.json").is_file()):
        # an unfinished SFT folder is said to be one, with how to resume it (it was "no config.json: not a
        # transformers model folder", as if a model folder were asked for)
        check_adapter(key, path, kind="policy")
    else:
        check_model(key, policy)


def check_target_modules(key: str, targets: list[str] | str, model: str) -> None:
    """Each named LoRA target is a module of the model, found as peft finds it (the name or a dotted suffix).

    The model is built from its config on the meta device (no weights, no memory), so a typo is
    named here instead of by peft after the model has loaded. A string other than "all-linear" is
    a regex peft matches against whole module names (`lora.target_modules=q_proj` on the command
    line is one): it must match one.
    """
    if targets == "all-linear":
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.modeling import resolve_model_path

    with init_empty_weights():
        built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    names = [name for name, _ in built.named_modules()]
    if isinstance(targets, str):
        try:
            missing = [] if any(re.fullmatch(targets, n) for n in names) else [f"{targets!r} (a regex: whole names)"]
        except re.error as err:
            raise ConfigError(f"{key}: {targets!r} is neither all-linear nor a valid regex ({err})") from None
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    import torch

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in built.named_modules() if isinstance(m, torch.nn.Linear)})
    if not missing:  # named, and of a kind LoRA adapts: peft refused an RMSNorm after the model had loaded
        from transformers.pytorch_utils import Conv1D

        kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D,
                 torch.nn.MultiheadAttention)
        matched = [(n, m) for n, m in built.named_modules() if n and (
            re.fullmatch(targets, n) if isinstance(targets, str) else any(n == t or n.endswith("." + t) for t in targets))]
        wrong = next(((n, m) for n, m in matched if not isinstance(m, kinds)), None)
        if wrong:
            raise ConfigError(f"{key}: {wrong[0]} is a {type(wrong[1]).__name__}, which LoRA cannot adapt (linear, "
                              f"embedding and convolution layers only); the linear layers of {model} are "
                              f"{', '.join(linear)} (or use all-linear)")
        return
    if missing:
        plain = [t.strip() for t in targets.split(",") if t.strip()] \
            if isinstance(targets, str) and re.fullmatch(r"[\w.,\s]+", targets) else []
        if plain and all(any(n == t or n.endswith("." + t) for n in names) for t in plain):
            example = next((n for t in plain for n in names if n.endswith("." + t)), plain[0])
            raise ConfigError(f"{key}: a string is a regex peft matches against whole module names (such as "
                              f"{example}), and {targets!r} matches none; "
                              f"for the modules named {', '.join(plain)}, give a list: {key}=[{','.join(plain)}]")
        raise ConfigError(f"{key}: {', '.join(missing)} not among the modules of {model}; its linear layers are "
                          f"{', '.join(linear)} (or use all-linear)")


def _adapter_base(folder: str | Path) -> str:
    manifest = Path(folder) / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("base_model") or ""
    return json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path", "")


def check_weights_file(key: str, file: Path) -> None:
    """A safetensors file whose header reads and whose tensors reach the end (a truncated copy fails)."""
    if file.suffix != ".safetensors":
        if file.stat().st_size == 0:
            raise ConfigError(f"{key}: {file} is empty")
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{key}: {file} is not a readable safetensors file ({err}); it may be truncated "
                          "(an interrupted copy or save): copy it again or retrain") from None


def check_checkpoint(key: str, value: str | None, *, ppo: bool = False, max_steps: int = -1) -> None:
    """train.resume_from_checkpoint: latest, or a checkpoint folder this stage wrote, with steps left to train
    before `max_steps` (at it, the run is finished: the Trainer would train one step past it)."""
    if value in (None, "latest", "auto"):  # auto: latest's other name, in every stage (begin_training reads both)
        return
    path = Path(value).expanduser()
    allowed = "latest"
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: no such checkpoint folder; give one of the stage's checkpoints/"
                          f"{'step-N' if ppo else 'checkpoint-N'} folders, or {allowed}")
    needed = ["trainer_state.json"] + (["state.pt", "value_head.safetensors", "adapter_model.safetensors"] if ppo else [])
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"{key}={value}: not a {'PPO' if ppo else 'trainer'} checkpoint (no {', '.join(missing)}); "
                          f"give one of the stage's checkpoints/{'step-N' if ppo else 'checkpoint-N'} folders, or "
                          f"{allowed}")
    state = _read_json(key, path / "trainer_state.json")
    step = state.get("step" if ppo else "global_step")
    if isinstance(step, int) and 0 < max_steps <= step:
        raise ConfigError(f"{key}={value}: a finished run's checkpoint (step {step}, train.max_steps={max_steps}): "
                          "nothing is left to train from it; raise train.max_steps to train on from it, or leave "
                          "train.resume_from_checkpoint unset to train again from scratch")
    for file in sorted(path.glob("*.safetensors")):
        check_weights_file(key, file)


def check_store(key: str, url: str | None, run_dir: str, *, must_exist: bool) -> None:
    """A database URL the labelling store supports; for export, a SQLite store that exists."""
    from align.labeling.store import sqlite_path, sqlite_url, url_problem

    shown = url or f"sqlite:///{Path(run_dir) / 'labels.db'} (the default)"
    url = url or sqlite_url(Path(run_dir) / "labels.db")
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"{key}={problem}")
    if sqlite_path(url) is not None:
        file = sqlite_path(url)
        if Path(file).is_dir():
            raise ConfigError(f"{key}={shown}: {file} is a folder, not a database file")
        if must_exist and not Path(file).is_file():
            raise StageError(f"no labelling store at {file}: run `align sample run.dir={run_dir}` and label first, "
                             "or pass store=<database URL>")


def check_scorer(key: str, spec: str) -> None:
    from align.labeling.scorers import resolve_scorer

    try:
        resolve_scorer(spec)
    except ValueError as err:
        message = str(err)
        raise ConfigError(key + message[len("scorer"):] if message.startswith("scorer ") else f"{key}: {message}") \
            from None


# ---------------------------------------------------------------------------- helpers


def _upstream_sft(key: str, sft: str | None, run_dir: str, pending: set[str], why: str, alternative: str = "") -> None:
    if sft is not None:
        check_adapter(key, sft, kind="policy")
        return
    if "sft" in pending:
        return
    default = stage_dir(run_dir, "sft")
    if not default.exists():
        raise StageError(f"no SFT adapter at {default}: {why}; run `align sft run.dir={run_dir}` first"
                         f"{', pass' if alternative else ' or pass'} sft=<adapter folder>"
                         f"{', ' + alternative if alternative else ''}")
    check_adapter(f"{key} (default {default})", default, kind="policy")


def _on_policys_base(p: str, cfg, source: str | Path, why: str) -> None:
    """A stage that runs on its adapter's base ignores model.name: set to anything else (a typo, another
    model), it was recorded in config.yaml as if it had run."""
    name, default = cfg.model.name, type(cfg)().model.name
    if name == default or not Path(source).is_dir():
        return
    base = _adapter_base(source) if (Path(source) / "adapter_config.json").is_file() else str(source)
    if base and model_key(name) != model_key(base):  # smollm2-135m, embedded: one model
        raise ConfigError(f"{p}model.name={name}: this stage runs on {base}, the base of {source} ({why}); "
                          "leave model.name unset")


def _preference_data(key: str, data, run_dir: str, pending: set[str]) -> None:
    from align.preferences import read_preference_pairs

    if data.path is None and "export" in pending:
        return
    path = Path(data.path) if data.path else stage_dir(run_dir, "export")
    if data.path is None and not path.exists():
        raise StageError(f"no preference data at {path}: run `align export run.dir={run_dir}` first, "
                         f"or pass {key}=<folder or .jsonl>")
    if data.path is None and path.is_dir() and not (path / MANIFEST).is_file():  # the run's own export, cut short
        raise StageError(f"{path}: an unfinished export (no {MANIFEST}, which export writes last): run "
                         f"`align export run.dir={run_dir}` again, or pass {key}=<folder or .jsonl>")
    try:
        return read_preference_pairs(path, on_error=data.on_error)[0]
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def _pairs_render(key: str, pairs: dict[str, list] | None, source: str | Path | None) -> None:
    """The chat template of `source` (the SFT adapter's folder, or a model) renders the first pair and the first
    whose prompt has a system turn of its own, each with the system prompt the stage adds (the SFT's): a template
    that refuses the system role (Gemma's, Mistral v0.1's) is named here, not by a traceback once the model has
    loaded. Skipped where the data or the tokenizer is not there yet (an export or sft the pipeline runs first)."""
    if not pairs or source is None or (isinstance(source, Path) and not source.is_dir()):
        return
    from align.artifacts import system_prompt_of
    from align.data import with_system_prompt
    from align.modeling import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(source))
    except Exception:  # the stage's own checks name a tokenizer that does not load
        return
    system = system_prompt_of(source) if Path(source).is_dir() else None
    rows = [*pairs.get("train", []), *pairs.get("test", [])]
    own = next((r for r in rows if r["prompt"][0]["role"] == "system"), None)
    for pair in [r for r in (rows[:1] + [own]) if r is not None]:
        prompt = with_system_prompt(pair["prompt"], system) if system else pair["prompt"]
        problem = template_refusal(tokenizer, prompt, pair["chosen"])
        if problem:
            which = "its first pair with a system turn of its own" if pair is own else "its first pair"
            hint = "; drop the system turns (field 'system' or the prompt's), or use a model whose chat template " \
                   "takes one" if "system" in problem.lower() else ""
            raise DataError(f"{key}: the chat template of {source} refuses {which} ({problem}; prompt "
                            f"{pair['prompt'][-1]['content'][:60]!r}){hint}")


def _prompts(key: str, path: str) -> list[str]:
    try:
        return load_prompts(path)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage `accelerate launch` set up for this process (None outside DeepSpeed): from its
    config's zero_stage (ACCELERATE_DEEPSPEED_ZERO_STAGE), or a DeepSpeed JSON config file's."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    try:
        with open(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""), encoding="utf-8") as f:
            return int(json.load(f)["zero_optimization"]["stage"])
    except (OSError, ValueError, TypeError, KeyError):
        return None  # unreadable, or no stage in it: DeepSpeed says so itself


def _launcher(p: str, cfg) -> None:
    """What the launch (accelerate launch's environment) or this machine cannot do with this training stage's
    settings."""
    attn = (cfg.model.attn_implementation or "").removeprefix("paged|")
    if attn == "flex_attention":
        import torch

        if not torch.cuda.is_available():  # it ran the forward, and failed in the first backward (46 s in)
            raise ConfigError(f"{p}model.attn_implementation=flex_attention trains on a GPU only (torch's FlexAttention "
                              "has no backward on CPU) and this machine has none; leave it unset (sdpa)")
    sharding = [kind for kind in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true"]
    if getattr(cfg, "algo", None) == "ppo" and sharding:
        # Its own loop, not a Trainer: nothing would hand the model to FSDP or DeepSpeed, and every process would
        # hold and train the whole model under a launch that was asked to shard it.
        raise ConfigError(f"{p}algo=ppo: align's own PPO loop does not shard the model, and this process was launched "
                          f"with {'FSDP' if sharding == ['FSDP'] else 'DeepSpeed'}; use {p}algo=grpo (or rloo: TRL's "
                          "trainers, which shard), or launch PPO with configs/accelerate/multi_gpu.yaml (DDP: the "
                          "whole model on each GPU, gradients averaged)")
    if cfg.model.quantize and deepspeed_zero_stage() == 3:
        # align places a 4-bit base with a device_map, which transformers refuses under ZeRO-3 only once
        # TrainingArguments exist (its ZeRO-3 test reads them), and align loads the model before them: unrefused,
        # the whole 4-bit base would go on every GPU, under a ZeRO-3 that does not expect it.
        raise ConfigError(f"{p}model.quantize=true: align's 4-bit (QLoRA) base is placed whole on each GPU, which "
                          f"DeepSpeed ZeRO-3 does not support; pass {p}model.quantize=false (LoRA on a bf16 base, "
                          "which ZeRO-3 shards), or for QLoRA launch with configs/accelerate/multi_gpu.yaml (DDP)")


def _liger(liger: bool) -> None:
    if liger:  # torch only when asked for
        from align.modeling import check_liger

        check_liger(liger)


def _backend(gen) -> None:
    if gen.backend == "vllm":  # torch only when asked for
        from align.generation import check_backend

        check_backend(gen)


def _vllm_takes_no_dora(gen, adapters: dict[str, str | Path], p: str) -> None:
    """vLLM loads LoRA adapters, not DoRA ones: its PEFTHelper refuses use_dora ("vLLM does not yet support DoRA.",
    vllm/lora/peft_helper.py), once its engine and the base have loaded. `adapters`: each key and its folder; a
    folder that is no adapter (a model, or one a pending stage will write) is left alone."""
    if gen.backend != "vllm":
        return
    for key, folder in adapters.items():
        config = Path(folder).expanduser() / "adapter_config.json"
        if config.is_file() and _read_json(key, config).get("use_dora"):
            raise ConfigError(f"{key}={folder}: a DoRA adapter (use_dora in its adapter_config.json: trained with "
                              "lora.use_dora=true), and vLLM loads none (\"vLLM does not yet support DoRA\"); use "
                              f"{p}generation.backend=transformers")


def _vllm_after_dora_sft(cfg) -> None:
    """A pipeline's sample and eval (by default) generate with its SFT adapter and the ones trained on from it (dpo,
    ppo): DoRA adapters with sft.lora.use_dora=true, refused by vLLM (_vllm_takes_no_dora) before one exists."""
    if "sft" not in cfg.stages or not cfg.sft.lora.use_dora:
        return
    for stage in ("sample", "eval"):
        section = getattr(cfg, stage)
        if stage in cfg.stages and section.generation.backend == "vllm" and not getattr(section, "policies", None):
            raise ConfigError(f"{stage}.generation.backend=vllm with sft.lora.use_dora=true: {stage} generates with "
                              "the SFT adapter and those trained on from it, DoRA adapters, and vLLM loads none "
                              f"(\"vLLM does not yet support DoRA\"); use {stage}.generation.backend=transformers, "
                              "or sft.lora.use_dora=false")


def _read_json(key: str, file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: {file} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: {file} should hold a JSON object")
    return value


def _first_line(err: BaseException) -> str:
    """An exception in one line for a one-line message: its first line, else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _tokenizer_files(key: str, path: Path, hint: str = "save the tokenizer beside the model") -> None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"{key}={path}: no tokenizer in it (tokenizer.json or tokenizer_config.json); {hint}")


CHECKS = {"sft": _sft, "sample": _sample, "export": _export, "reward": _reward, "dpo": _dpo, "ppo": _ppo,
          "eval": _eval, "serve": _serve, "merge": _merge, "pipeline": _pipeline}
