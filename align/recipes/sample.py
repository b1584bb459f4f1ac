"""Sample K responses per prompt from a policy into the labelling store.

    align sample --config configs/quickstart/sample.yaml
    align sample policy=runs/quickstart/dpo round=1 batch=round-1
    align sample selection=uncertainty pool_factor=2 num_prompts=40 round=1  # the 40 the reward model knows least

Each prompt becomes one task (the prompt and its K responses) in batch `batch` of the store,
with provenance: the policy's manifest, the generation settings and the time. Re-running the
same command adds nothing twice: prompts already in the batch are skipped before any generation, and
prompts that are tasks of another batch (but a later round's or eval's) are not candidates.

Which prompts (docs/active.md): num_prompts tasks out of the first pool_factor x num_prompts
prompts. selection=random draws them at random (pool_factor=1: the first num_prompts, in order),
writing one transaction per generation batch. selection=uncertainty samples every prompt of the
pool, scores each candidate task by how unsure a reward model (selection_reward_model, default
<run.dir>/reward) is about its K responses (align/active.py), and stores the num_prompts most
uncertain (a share `explore` drawn at random instead) with that value as their priority: the
labelling queue hands them out highest first. `<out>/candidates.jsonl` lists every candidate's value, the
batch's whole record: the store keeps it with the tasks (Store.batch_note), so a rerun writes it again.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from align import StageError, refuse_several_processes, report
from align.artifacts import (
    key_prefix,
    print_done,
    read_manifest,
    round_batch,
    shell,
    stage_dir,
    store_url,
    system_prompt_of,
    write_manifest,
)
from align.config import SampleStageConfig, save_config, to_dict
from align.data import file_hash, load_prompts
from align.generation import Answer, generate_answers, load_policy
from align.modeling import device_plan
from align.preflight import check_stage
from align.tracking import Tracker, log_artifact

log = logging.getLogger(__name__)


def resample_duplicates(policy, prompt: str, answers: list[Answer], cfg: SampleStageConfig) -> list[dict]:
    """Re-draw answers identical to an earlier one; mark those still identical after that.

    `answers` is updated in place. Each response's meta says whether it ended (EOS) or was cut at
    generation.max_new_tokens (`finished`: export carries it, DPO then trains no end of turn there)."""
    texts = [a.text for a in answers]
    for attempt in range(1, cfg.max_resample + 1):
        dup = [i for i, r in enumerate(texts) if r in texts[:i] or not r.strip()]
        if not dup:
            break
        gen = replace(cfg.generation, seed=cfg.generation.seed + 7919 * attempt, batch_size=1)
        fresh = generate_answers(policy, [prompt], gen, k=len(dup), desc=None)[0]
        for i, answer in zip(dup, fresh, strict=True):
            answers[i], texts[i] = answer, answer.text
    meta: list[dict] = [{"finished": a.finished} for a in answers]
    for i, r in enumerate(texts):
        if r in texts[:i]:
            meta[i]["duplicate_of"] = texts.index(r)
    return meta


def _drawn(prompts: list[str], wanted: int, cfg: SampleStageConfig) -> list[str]:
    """The prompts of `prompts` sampled for `wanted` tasks: every one under selection=uncertainty (all scored,
    the most uncertain kept) or when there are no more than wanted, else a seeded draw kept in file order."""
    if cfg.selection == "uncertainty" or len(prompts) <= wanted:
        return list(prompts)
    drawn = set(random.Random(cfg.generation.seed).sample(range(len(prompts)), wanted))
    return [p for i, p in enumerate(prompts) if i in drawn]


def _selection_figures(note: dict) -> dict:
    """The manifest's figures of a batch's uncertainty selection, from its note in the store (every candidate)."""
    values = [c["acquisition"] for c in note["candidates"]]
    chosen = [c["acquisition"] for c in note["candidates"] if c["chosen"]]
    rest = [c["acquisition"] for c in note["candidates"] if not c["chosen"]]
    return {"reward_model": note["reward_model"], "acquisition": note["acquisition"], "explore": note["explore"],
            "candidates": len(values), "chosen": len(chosen),
            "mean_acquisition_chosen": statistics.fmean(chosen) if chosen else None,
            "mean_acquisition_candidates": statistics.fmean(values) if values else None,
            "mean_acquisition_not_chosen": statistics.fmean(rest) if rest else None}


def _sampled_otherwise(store, batch: str, policy_dir: Path, policy_manifest: dict, cfg: SampleStageConfig) -> dict:
    """The batch's tasks sampled otherwise than this run would (another policy or version of it, k or
    generation settings), and what differs: {} when none. A rerun after `align sft` again, or with a
    new k, keeps those tasks (people may have ranked them): it says so rather than seem to resample."""
    now = {"policy": str(policy_dir), "policy_created": policy_manifest.get("created"), "k": cfg.k,
           "generation": asdict(cfg.generation)}
    differ, tasks = set(), 0
    for row in store.batch_tasks(batch):
        source = store.task(row["task_id"])["source"]
        keys = {k for k, v in now.items() if k in source and source[k] != v}
        differ |= keys
        tasks += bool(keys)
    return {"tasks": tasks, "differ": sorted(differ)} if tasks else {}


def main(cfg: SampleStageConfig) -> Path:
    from align.labeling.store import Store

    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("sample", cfg)  # every input (policy, prompts, store, reward model, paths, the machine) before any work
    refuse_several_processes("sample", "it does not split prompts between processes")
    policy_dir = Path(cfg.policy) if cfg.policy else stage_dir(cfg.run.dir, "sft")
    if cfg.policy is None and not policy_dir.exists():
        raise StageError(f"no policy at {policy_dir}: run `align sft run.dir={cfg.run.dir}` first, "
                         f"or pass {key_prefix('sample')}policy=<adapter or model folder>")
    selector = (Path(cfg.selection_reward_model) if cfg.selection_reward_model else stage_dir(cfg.run.dir, "reward")) \
        if cfg.selection == "uncertainty" else None
    batch = cfg.batch or round_batch(cfg.round)
    out = stage_dir(cfg.run.dir, "sample")
    out.mkdir(parents=True, exist_ok=True)
    url = store_url(cfg.store, cfg.run.dir)
    store = Store(url)

    # --- data: the pool of candidate prompts, and how many of them become tasks --------------
    prompts_sha256 = file_hash(cfg.prompts)  # before it is read: edited while this stage runs, it is not what it read
    listed = load_prompts(cfg.prompts)
    prompts = list(dict.fromkeys(listed))  # a prompt twice in the file is one task (the store keeps one)
    if len(prompts) < len(listed):
        log.warning("%d prompts of %s are repeats of earlier ones: sampled once", len(listed) - len(prompts),
                    cfg.prompts)
    # A batch asks about prompts no other batch did (an earlier round's, or one sampled by hand): new ones for the
    # new policy, an uncertainty-picked batch compared with a random one on equal terms, and no labelled prompt
    # picked again for being uncertain. Not a later round's (a pipeline's round 0 run again) nor eval's A/B tasks.
    def later_round(name: str) -> bool:  # only for a round's own batch: a batch named by hand leaves out every round
        found = re.fullmatch(r"round-(\d+)", name)
        return batch == round_batch(cfg.round) and bool(found) and int(found[1]) > cfg.round

    others = [b for b in store.batches() if b != batch and not b.startswith("eval-") and not later_round(b)]
    earlier = set().union(*(store.task_prompts(b) for b in others))
    own = store.task_prompts(batch)  # kept, wherever else they are: the same command again adds nothing
    if earlier - own:
        before = len(prompts)
        prompts = [p for p in prompts if p in own or p not in earlier]
        log.info("%d of the %d prompts are tasks of another batch (%s): left out", before - len(prompts), before,
                 ", ".join(others))
    if not prompts:
        raise StageError(f"every prompt of {cfg.prompts} is a task of another batch ({', '.join(others)}): give "
                         f"more prompts ({key_prefix('sample')}prompts=<file>) or fewer rounds")
    wanted = len(prompts) if cfg.num_prompts < 0 else min(cfg.num_prompts, len(prompts))
    pool = prompts[:min(len(prompts), math.ceil(wanted * cfg.pool_factor))]
    done = store.task_prompts(batch)
    left = [p for p in pool if p not in done]
    # What a call that finds nothing done samples, in order: uncertainty every candidate (then scored), random a
    # draw kept in file order. A call after one stopped on the way (the store takes each generation batch whole)
    # samples the rest of that plan, each prompt with the seed it had there, so it ends with the answers one
    # uninterrupted call gives; a batch holding other prompts of this pool (num_prompts changed) draws afresh.
    planned = _drawn(pool, wanted, cfg)
    wanted = max(0, wanted - (len(pool) - len(left)))  # tasks of this pool already in the batch count
    if done.intersection(pool) <= set(planned):
        todo = [p for p in planned if p not in done]
        position = {p: i for i, p in enumerate(planned)}
    else:
        todo = _drawn(left, wanted, cfg)
        position = {p: i for i, p in enumerate(pool)}  # not the plan's positions: no seed of a batch before again
    log.info("%d prompts in the pool, %d already in batch %r; %d more tasks wanted, sampling %s (%s)",
             len(pool), len(pool) - len(left), batch, wanted,
             f"{len(todo)} × k={cfg.k}" if todo and wanted else "nothing", cfg.selection)

    # --- model ------------------------------------------------------------------------------
    plan = device_plan(cfg.model)
    added = duplicates = cut = sampled = 0
    try:  # read even when nothing is left to sample: a rerun's manifest names the same base model
        policy_manifest = read_manifest(policy_dir)
    except FileNotFoundError:
        policy_manifest = {"source": str(policy_dir)}
    system_prompt = system_prompt_of(policy_dir)  # the one it was trained with: generate() puts it first
    stale = _sampled_otherwise(store, batch, policy_dir, policy_manifest, cfg)
    if stale:
        log.warning("%d tasks of batch %r were sampled with other settings than this run's (%s): the batch keeps "
                    "them as they are, with their rankings, and samples only prompts it lacks. To sample afresh, "
                    "use another batch= (align sample) or run.dir (align sample or align pipeline)", stale["tasks"], batch, ", ".join(stale["differ"]))
    selection: dict = {"selection": cfg.selection, "pool": len(pool), "pool_factor": cfg.pool_factor}
    if todo and wanted:
        policy = load_policy(policy_dir if policy_dir.exists() else cfg.policy, cfg.model, plan,
                             load_model=cfg.generation.backend != "vllm")
        source = {"policy": str(policy_dir), "policy_stage": policy_manifest.get("stage"),
                  "policy_created": policy_manifest.get("created"), "base_model": policy.base_model,
                  "system_prompt": system_prompt, "generation": asdict(cfg.generation), "k": cfg.k,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "selection": cfg.selection}
        if selector:
            source.update(selection_reward_model=str(selector), acquisition=cfg.acquisition)

        # --- sample → store (random: one transaction per generation batch) ------------------
        candidates: list[dict] = []
        step = cfg.generation.batch_size
        with tqdm(total=len(todo), desc="sampling", unit="prompt") as bar:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                # seeded by where the batch is in the plan, not in what is left: a resumed call gave its first
                # prompts the seed the stopped call's first ones had, and answers unlike an uninterrupted call's
                gen = replace(cfg.generation, seed=cfg.generation.seed + position[chunk[0]])
                items = []
                for prompt, answers in zip(chunk, generate_answers(policy, chunk, gen, k=cfg.k, desc=None), strict=True):
                    meta = resample_duplicates(policy, prompt, answers, cfg)
                    duplicates += sum("duplicate_of" in m for m in meta)
                    cut += sum(not m["finished"] for m in meta)
                    sampled += len(meta)
                    items.append({"prompt": prompt, "responses": [a.text for a in answers],
                                  "response_meta": [{"policy": str(policy_dir), **m} for m in meta]})
                if selector:
                    candidates += items
                else:
                    added += store.add_tasks(batch, items, source=source, round=cfg.round)
                bar.update(len(chunk))
        del policy

        # --- uncertainty: score every candidate, keep the most uncertain ---------------------
        if selector:
            from align.active import choose, load_selector, queue_priorities, task_uncertainty

            model, tokenizer, heads = load_selector(selector)
            values = task_uncertainty(model, tokenizer, heads, candidates, cfg.acquisition,
                                      batch_size=cfg.generation.batch_size, system_prompt=system_prompt_of(selector))
            del model
            chosen = choose(values, wanted, explore=cfg.explore, seed=cfg.generation.seed)
            picked = set(chosen)
            priority = queue_priorities(values, chosen, explore=cfg.explore, seed=cfg.generation.seed)
            # every candidate's value goes into the store with the chosen tasks (one transaction), over the batch's
            # earlier record: a call stopped after the commit, run again, has nothing left to sample and still
            # writes the record of how the batch's tasks were chosen (candidates.jsonl, the manifest's selection)
            earlier = {c["prompt"]: c for c in (store.batch_note(batch) or {}).get("candidates", [])}
            note = {"reward_model": str(selector), "acquisition": cfg.acquisition, "explore": cfg.explore,
                    "candidates": list({**earlier, **{item["prompt"]: {
                        "prompt": item["prompt"], "acquisition": values[i], "chosen": i in picked}
                        for i, item in enumerate(candidates)}}.values())}
            added = store.add_tasks(batch, [{**candidates[i], "priority": p} for i, p in zip(chosen, priority,
                                                                                            strict=True)],
                                    source=source, round=cfg.round, note=note)
            log.info("selection: %d of %d candidates by %s under %s; mean acquisition %.4f chosen, %.4f all",
                     len(chosen), len(candidates), cfg.acquisition, selector,
                     statistics.fmean(values[i] for i in chosen) if chosen else 0.0, statistics.fmean(values))

    # --- save -------------------------------------------------------------------------------
    note = store.batch_note(batch) if selector else None
    if note:  # the batch's every candidate: this call's, and those of a call before it (stopped, or num_prompts grown)
        with open(out / "candidates.jsonl", "w") as fh:
            for c in note["candidates"]:
                fh.write(json.dumps({"batch": batch, **c}) + "\n")
        selection.update(_selection_figures(note))
    if not selector:  # this folder now describes a random selection: no uncertainty values of an earlier run
        (out / "candidates.jsonl").unlink(missing_ok=True)
    rows = store.batch_tasks(batch)
    # The batch as export, reward and dpo will read it, whatever this call added (nothing, run again): its own
    # answers and how many were cut, from each answer's record (one written before it recorded `finished`: not cut)
    in_batch = store.batch_response_meta(batch)
    if rows:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(out / "samples"))
    save_config(cfg, out / "config.yaml")
    if sampled and cut / sampled > 0.2:
        log.warning("%d of %d responses (%.0f %%) were cut at generation.max_new_tokens=%d before they ended: "
                    "annotators rank them unfinished, and DPO trains no end of turn after them; raise "
                    "generation.max_new_tokens if the policy's answers are longer", cut, sampled,
                    100 * cut / sampled, cfg.generation.max_new_tokens)
    metrics = {"prompts": len(prompts), "new_tasks": added, "k": cfg.k, "duplicates_marked": duplicates,
               "responses_sampled": sampled, "responses_cut": cut,
               "tasks_in_batch": len(rows), "answers_in_batch": len(in_batch),
               "cut_in_batch": sum(m.get("finished") is False for m in in_batch),
               **{f"selection/{k}": v for k, v in selection.items() if isinstance(v, (int, float)) and v is not None}}
    parents = {"policy": policy_dir, **({"selection_reward_model": selector} if selector else {})}
    tracker = Tracker(cfg.run, "sample", out, to_dict(cfg))  # before the manifest, which records its W&B run
    write_manifest(out, stage="sample", config=to_dict(cfg), base_model=policy_manifest.get("base_model"),
                   parents=parents, metrics=metrics, store=url, batch=batch, selection=selection,
                   prompts_sha256=prompts_sha256, system_prompt=system_prompt,
                   sampled_otherwise=stale)
    tracker.log(metrics, step=0)
    tracker.table("sample/responses", ["prompt", *(f"response_{i + 1}" for i in range(cfg.k))],
                  [[r["prompt"], *r["responses"][:cfg.k], *[""] * (cfg.k - len(r["responses"]))] for r in rows[:50]])
    log_artifact("sample", out, cfg.run.dir, parents, run=tracker.run)
    tracker.finish(metrics)
    log.info(json.dumps(metrics))
    # the run's folder too: the admin's Export button and the next hint write into it
    from align.labeling.store import safe_url  # a password in the URL masked: hints land in logs

    where = f"--run-dir {shell(cfg.run.dir)}" + (f" --db {shell(safe_url(cfg.store))}" if cfg.store else "")
    log.info("report: %s", report.write_report(cfg.run.dir))  # as every stage does: the run's, with this batch
    print_done("sample", out, f"align label {where}   (unattended: align label {where} --simulate support_style)")
    return out
