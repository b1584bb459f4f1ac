"""Sample K responses per prompt from a policy into the labelling store.

    align sample --config configs/quickstart/sample.yaml
    align sample policy=runs/quickstart/dpo round=1 batch=round-1

Each prompt becomes one task (the prompt and its K responses) in batch `batch` of the store,
written one transaction per generation batch, with provenance: the policy's manifest, the
generation settings and the time. Re-running the same command adds nothing twice: prompts
already in the batch are skipped before any generation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from alignment import StageError
from alignment.artifacts import print_done, read_manifest, round_batch, stage_dir, store_url, write_manifest
from alignment.config import SampleStageConfig, save_config, to_dict
from alignment.data import file_hash, load_prompts
from alignment.generation import generate, load_policy
from alignment.modeling import device_plan
from alignment.preflight import check_stage
from alignment.tracking import Tracker, log_artifact

log = logging.getLogger(__name__)


def resample_duplicates(policy, prompt: str, responses: list[str], cfg: SampleStageConfig) -> list[dict]:
    """Re-draw responses identical to an earlier one; mark those still identical after that."""
    meta: list[dict] = [{} for _ in responses]
    for attempt in range(1, cfg.max_resample + 1):
        dup = [i for i, r in enumerate(responses) if r in responses[:i] or not r.strip()]
        if not dup:
            return meta
        gen = replace(cfg.generation, seed=cfg.generation.seed + 7919 * attempt, batch_size=1)
        fresh = generate(policy, [prompt], gen, k=len(dup), desc=None)[0]
        for i, text in zip(dup, fresh, strict=True):
            responses[i] = text
    for i, r in enumerate(responses):
        if r in responses[:i]:
            meta[i]["duplicate_of"] = responses.index(r)
    return meta


def main(cfg: SampleStageConfig) -> Path:
    from labeling.store import Store

    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("sample", cfg)  # every input (policy, prompts, store, paths, the machine) before any work
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StageError("align sample runs as one process (it does not split prompts between processes): "
                         "run it without accelerate launch")
    policy_dir = Path(cfg.policy) if cfg.policy else stage_dir(cfg.run.dir, "sft")
    if cfg.policy is None and not policy_dir.exists():
        raise StageError(f"no policy at {policy_dir}: run `align sft run.dir={cfg.run.dir}` first, "
                         "or pass policy=<adapter or model folder>")
    batch = cfg.batch or round_batch(cfg.round)
    out = stage_dir(cfg.run.dir, "sample")
    out.mkdir(parents=True, exist_ok=True)
    url = store_url(cfg.store, cfg.run.dir)
    store = Store(url)

    # --- data -------------------------------------------------------------------------------
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts > 0:
        prompts = prompts[:cfg.num_prompts]
    done = store.task_prompts(batch)
    todo = [p for p in prompts if p not in done]
    log.info("%d prompts, %d already in batch %r, sampling %d × k=%d", len(prompts), len(prompts) - len(todo),
             batch, len(todo), cfg.k)

    # --- model ------------------------------------------------------------------------------
    plan = device_plan(cfg.model)
    added = duplicates = 0
    policy_manifest: dict = {}
    if todo:
        policy = load_policy(policy_dir if policy_dir.exists() else cfg.policy, cfg.model, plan,
                             load_model=cfg.generation.backend != "vllm")
        try:
            policy_manifest = read_manifest(policy_dir)
        except FileNotFoundError:
            policy_manifest = {"source": str(policy_dir)}
        source = {"policy": str(policy_dir), "policy_stage": policy_manifest.get("stage"),
                  "policy_created": policy_manifest.get("created"), "base_model": policy.base_model,
                  "generation": asdict(cfg.generation), "k": cfg.k, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

        # --- sample → store, one transaction per generation batch ---------------------------
        step = cfg.generation.batch_size
        with tqdm(total=len(todo), desc="sampling", unit="prompt") as bar:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                gen = replace(cfg.generation, seed=cfg.generation.seed + start)
                responses = generate(policy, chunk, gen, k=cfg.k, desc=None)
                items = []
                for prompt, resp in zip(chunk, responses, strict=True):
                    meta = resample_duplicates(policy, prompt, resp, cfg)
                    duplicates += sum("duplicate_of" in m for m in meta)
                    items.append({"prompt": prompt, "responses": resp,
                                  "response_meta": [{"policy": str(policy_dir), **m} for m in meta]})
                added += store.add_tasks(batch, items, source=source, round=cfg.round)
                bar.update(len(chunk))

    # --- save -------------------------------------------------------------------------------
    rows = store.batch_tasks(batch)
    if rows:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(out / "samples"))
    save_config(cfg, out / "config.yaml")
    metrics = {"prompts": len(prompts), "new_tasks": added, "k": cfg.k, "duplicates_marked": duplicates,
               "tasks_in_batch": len(rows)}
    write_manifest(out, stage="sample", config=to_dict(cfg), base_model=policy_manifest.get("base_model"),
                   parents={"policy": policy_dir}, metrics=metrics, store=url, batch=batch,
                   prompts_sha256=file_hash(cfg.prompts))
    tracker = Tracker(cfg.run, "sample", out, to_dict(cfg))
    tracker.log(metrics, step=0)
    tracker.table("sample/responses", ["prompt", *(f"response_{i + 1}" for i in range(cfg.k))],
                  [[r["prompt"], *r["responses"][:cfg.k], *[""] * (cfg.k - len(r["responses"]))] for r in rows[:50]])
    log_artifact("sample", out, cfg.run.dir, {"policy": policy_dir}, run=tracker.run)
    tracker.finish(metrics)
    log.info(json.dumps(metrics))
    print_done("sample", out, f"align label --run-dir {cfg.run.dir}   (unattended: align label --run-dir {cfg.run.dir} --simulate support_style)")
    return out
