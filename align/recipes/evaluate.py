"""Did it work? Compare policies on held-out prompts: win-rate, reward, KL, length, diversity.

    align eval --config configs/quickstart/eval.yaml
    align eval policies='{sft: runs/q/sft, dpo: runs/q/dpo}' scorer=support_style
    align eval human=true          # blind A/B tasks for annotators; rerun it for the leaderboard

Every policy answers the same prompts with the same settings and seeds. Judges: the reward
model (default <run.dir>/reward when present; `reward_model=none`: none) and, optionally, a programmatic scorer (same interface as the
simulated annotators) as an independent check on a policy that games the reward model. Each
non-baseline policy gets a win-rate against the baseline with a Wilson interval over
prompts, and a KL from the baseline (the SFT policy, i.e. the reference), measured on answers the
policy samples at temperature 1 (`kl_samples` per prompt): the judged answers are greedy, and a
KL along them is one fixed path's, not the policy's. With human=true the A/B tasks go to `store`, by default
the store the run's sample (else export) used, as its align.json records it, else the run's labels.db (a later
round's: the root run's): the one the annotators rank in.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align import StageError, refuse_several_processes
from align import evaluation as ev
from align import report as report_module
from align.artifacts import (
    STORE_FILE,
    key_prefix,
    parent_path,
    print_done,
    read_manifest,
    recorded_path,
    resolve_policies,
    run_store,
    shell,
    stage_dir,
    stages_of_kind,
    system_prompt_of,
    write_manifest,
)
from align.config import EvalStageConfig, save_config, to_dict
from align.cpu import keep_4bit_for_dora
from align.data import file_hash, load_prompts, read_sft_examples
from align.generation import (
    DecodingProgress,
    Policy,
    chat_prompt,
    folded,
    generate_answers,
    lora_rank,
    plain_sampling,
    stop_ids,
)
from align.modeling import adapter_base_name, device_plan, is_adapter_dir, load_base_model, load_tokenizer
from align.preflight import check_stage
from align.rl import resolve_scorer, response_mask, scorer_scores
from align.tracking import Tracker, log_artifact, scalars

log = logging.getLogger(__name__)

def trained_prompts(folder: Path, seen: set[Path] | None = None, unread: list[str] | None = None) -> set[str]:
    """The user prompts in the training data of a policy and of the policies it started from, from the
    manifests: SFT's instructions (its held-out share included), the prompts of DPO's training pairs,
    PPO's (or GRPO's, RLOO's) rollout prompts. Each file is read where its stage read it (recorded_path);
    one that cannot be read is added to `unread` ("<file> (<stage> of <folder>): <why>")."""
    from align.preferences import load_preferences

    seen = seen if seen is not None else set()
    if folder in seen or not (folder / "align.json").is_file():
        return set()
    seen.add(folder)
    manifest = read_manifest(folder)
    config, parents = manifest.get("config") or {}, manifest.get("parents") or {}
    found: set[str] = set()
    source = None
    try:
        if manifest.get("stage") == "sft":
            source = recorded_path(config["data"]["path"], folder, manifest)
            # as the stage read it (its format), skipping what it may have skipped (data.on_error=skip): every user turn
            prompts, _, _ = read_sft_examples(source, config["data"].get("format", "auto"), on_error="skip")
            found |= {m["content"] for prompt in prompts for m in prompt if m["role"] == "user"}
        elif manifest.get("stage") == "dpo" and "preferences" in parents:
            source = parent_path(parents["preferences"]["path"], folder, manifest)
            data, _ = load_preferences(str(source), test_fraction=config["data"]["test_fraction"],
                                       seed=config["train"]["seed"], on_error="skip")
            found |= {m["content"] for row in data["train"]["prompt"] for m in row if m["role"] == "user"}
        elif config.get("prompts"):  # PPO, GRPO, RLOO: the first num_prompts (-1: all) of its prompts
            source = recorded_path(config["prompts"], folder, manifest)
            used = load_prompts(source)
            found |= set(used[:config["num_prompts"]] if config.get("num_prompts", -1) > 0 else used)
    except Exception as err:  # noqa: BLE001 - a moved or deleted file: the check is advice, not a gate
        if unread is not None:
            unread.append(f"{source or 'its data'} ({manifest.get('stage')} of {folder}): {err}")
    for parent in parents.values():
        if isinstance(parent, dict) and parent.get("stage") in stages_of_kind("policy"):
            found |= trained_prompts(parent_path(parent["path"], folder, manifest), seen, unread)
    return found


def seen_in_training(paths: dict[str, Path], prompts: list[str]) -> dict[str, int | None]:
    """Per policy, how many of the eval prompts its training data (or its parents') holds, warning of each; None,
    with a warning saying which file, where a training file could not be read and none of them was found in
    the others (not 0: nothing says they were held out)."""
    counts: dict[str, int | None] = {}
    for name, folder in paths.items():
        unread: list[str] = []
        trained = trained_prompts(Path(folder), unread=unread)
        n = sum(p in trained for p in prompts)
        for why in unread:
            log.warning("the training data of %s could not be read, so eval cannot say whether its prompts were "
                        "held out from it: %s", name, why)
        counts[name] = None if unread and not n else n
        if n:
            log.warning("%d of the %d eval prompts are in the training data of %s (its own or its parents'): "
                        "its figures are not on held-out prompts; point eval.prompts at prompts no stage trained on",
                        n, len(prompts), name)
    return counts


def load_adapters(paths: dict[str, Path], cfg: EvalStageConfig):
    """One base in memory with every policy as an adapter (they must share the base): (model, tokenizer, base
    name, {policy: its adapter name in the model})."""
    from dataclasses import replace

    from peft import PeftModel

    bases = {name: adapter_base_name(p) for name, p in paths.items()}
    if len(set(bases.values())) > 1:
        raise StageError(f"policies on different base models cannot be compared on one base: {bases}")
    plan = device_plan(cfg.model)
    base = load_base_model(replace(cfg.model, name=next(iter(bases.values()))), plan, training=False)
    adapters = adapter_names(paths)
    names = list(paths)
    model = PeftModel.from_pretrained(base, str(paths[names[0]]), adapter_name=adapters[names[0]])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=adapters[name])
    keep_4bit_for_dora(model)  # else on CPU DoRA reads the 4-bit weights wrongly once they are repacked
    model.eval()
    return model, load_tokenizer(str(paths[cfg.baseline])), next(iter(bases.values())), adapters


def adapter_names(paths: dict[str, Path]) -> dict[str, str]:
    """Each policy's adapter name in the peft model, made of its position, not its name: peft names modules
    after their adapter, and torch takes no module name with a "." or one a ModuleDict already has as an
    attribute (`policies={sft: ..., dpo-b0.1: ...}` ended in a KeyError, so would a policy called `values`)."""
    return {name: f"policy{i}" for i, name in enumerate(paths)}


# Answers whose full-vocabulary logits sampled_kl holds at once, per adapter: 64 answer tokens over SmolLM2's
# 49k-token vocabulary are 12.6 MB a row in fp32, and the log-softmaxes double it. Larger chunks only cost memory,
# and on 2 CPU cores time: the quickstart's KL (its 48 answers sampled in one batch) took 63 s in one chunk, 42 s
# in chunks of 16.
KL_ROWS = 16


@torch.no_grad()
def sampled_kl(model, tokenizer, prompts: list[str], policy: str, reference: str, *, k: int = 1,
               max_new_tokens: int = 64, seed: int = 0, batch_size: int = 8,
               system_prompt: str | None = None, label: str | None = None) -> list[float]:
    """Per prompt, KL(policy ‖ reference) over the first `max_new_tokens` tokens of an answer, in nats.

    The policy samples `k` answers at temperature 1 with no top-p or top-k (its own distribution),
    and each answer contributes the sum, over its tokens, of the full next-token KL at that prefix
    (evaluation.sequence_kl); their mean is an unbiased estimate of the sequence KL. On the greedy
    answers the win-rate is judged on it would not be: one fixed path, not the policy's distribution.
    The sampled token ids are scored as they are (no decode and re-encode), EOS only where sampled.
    Each prompt opens with `system_prompt`, the policy's own, as its answers for the win-rate do; the
    reference is read on the same context.
    """
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device  # the ids go where the model is (a GPU refuses CPU ids)
    eos = stop_ids(tokenizer, model.generation_config)
    out: list[float] = []
    # a model whose forward has no logits_to_keep (remote code) computes them all: sliced below alike
    trims = "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters
    batches = range(0, len(prompts), batch_size)
    # A step per decoding step of a batch's answers, then one per chunk of KL_ROWS answers scored (both adapters):
    # the quickstart's 48 prompts, one batch, moved its bar once, at the end of 71 s.
    chunks = [-(-len(prompts[start:start + batch_size]) * k // KL_ROWS) for start in batches]
    bar = tqdm(total=len(batches) * max_new_tokens + sum(chunks), unit="step",
               desc=f"KL {label or policy} (sampled: {max_new_tokens} tokens, then {sum(chunks)} chunks scored)")
    progress = DecodingProgress(bar)
    for b, start in enumerate(batches):
        chunk = [chat_prompt(tokenizer, p, system_prompt) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(seed + b)
        # the policy's own distribution, not its folder's decoding settings
        with folded(model, policy), plain_sampling(model), progress.decoding(max_new_tokens) as stopping:
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, stopping_criteria=stopping, use_cache=True)
        width = enc["input_ids"].shape[1]
        # 1 on each answer token up to and including the first EOS (all of a cut answer), 0 on the padding after
        answer = response_mask(ids[:, width:], eos)[0].long()
        prompt_mask = enc["attention_mask"].repeat_interleave(k, 0)
        attention = torch.cat([prompt_mask, answer], 1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)  # as generate numbered the left-padded rows
        keep = ids.shape[1] - width + 1  # the logits at the last prompt token and each answer token's
        trim = {"logits_to_keep": keep} if trims else {}
        per_answer = []
        for rows in range(0, len(ids), KL_ROWS):
            part = slice(rows, rows + KL_ROWS)
            logits = {}
            for name in (policy, reference):
                model.set_adapter(name)
                logits[name] = model(input_ids=ids[part], attention_mask=attention[part], position_ids=positions[part],
                                     **trim).logits[:, -keep:-1]  # those that predict the answer's tokens
            per_answer.append(ev.sequence_kl(logits[policy], logits[reference], answer[part]))
            del logits
            bar.update(1)
        out += torch.cat(per_answer).view(-1, k).mean(1).tolist()
    bar.close()
    return out


def reward_model_path(cfg: EvalStageConfig) -> Path | None:
    """The reward model that judges: `reward_model`, else the run's own (used when it exists); None with
    reward_model=none."""
    if cfg.reward_model == "none":
        return None
    return Path(cfg.reward_model) if cfg.reward_model else stage_dir(cfg.run.dir, "reward")


def judge(cfg: EvalStageConfig, prompts: list[str], responses: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    """{judge name: {policy: scores}} from the reward model and/or the scorer."""
    judges: dict[str, dict[str, list[float]]] = {}
    rm_path = reward_model_path(cfg)
    if rm_path is not None and rm_path.exists():
        from align.reward_model import load_reward_model, score

        rm, rm_tok = load_reward_model(rm_path)
        system_prompt = system_prompt_of(rm_path)  # the one it was trained with
        # Every policy's answers in one call: it scores each distinct conversation once, so an answer two
        # policies share gets one score and ties (scored apart, padding would move the last bits of it).
        names, n = list(responses), len(prompts)
        flat = score(rm, rm_tok, prompts * len(names), [a for name in names for a in responses[name]],
                     system_prompt=system_prompt)
        judges["reward_model"] = {name: flat[i * n:(i + 1) * n] for i, name in enumerate(names)}
        del rm
    elif rm_path is not None and cfg.reward_model:
        raise StageError(f"reward model {rm_path} not found")
    if cfg.scorer:
        fn = resolve_scorer(cfg.scorer)
        judges[f"scorer:{cfg.scorer}"] = {n: scorer_scores(fn, cfg.scorer, prompts, r) for n, r in responses.items()}
    for name, by_policy in judges.items():
        for policy, scores in by_policy.items():
            bad = next((i for i, v in enumerate(scores) if not math.isfinite(v)), None)
            if bad is not None:
                raise StageError(f"judge {name} gave {scores[bad]} to {policy}'s answer to prompt {bad + 1} "
                                 f"({prompts[bad][:60]!r}): a win-rate needs a finite score for every answer")
    if not judges and not cfg.human:
        why = f"no reward model at {rm_path}" if rm_path is not None else "reward_model=none"
        p = key_prefix("eval")
        raise StageError(f"no judge: {why} and no scorer; pass {p}scorer=support_style "
                         f"(or any module:function), {p}reward_model=<folder>, or {p}human=true")
    return judges


def policy_version(folder: str | Path) -> str:
    """A short fingerprint of the policy a folder holds now: its manifest's (rewritten whenever the stage
    trains again), else its path (a model name)."""
    import hashlib

    manifest = Path(folder) / "align.json"
    text = manifest.read_bytes() if manifest.is_file() else str(folder).encode()
    return hashlib.sha256(text).hexdigest()[:10]


def human_eval(cfg: EvalStageConfig, prompts: list[str], responses: dict[str, list[str]],
               system_prompts: dict[str, str | None] | None = None, versions: dict[str, str] | None = None) -> dict:
    """Blind A/B tasks into the store (`store`: the run's, run_store); once labelled, Bradley-Terry ratings (an
    arena board).

    The batch and each answer carry the policy's version (policy_version): a policy trained again gets
    new tasks with its new answers, and the board counts only verdicts on the policies as they are now
    (those on an earlier version are counted apart, as `stale_comparisons`). A policy this eval does not
    load is as its run's stage folder (<run.dir>/ppo, ...) holds it now; with no such folder, its verdicts are
    stale too: nothing says they judge a policy that still exists. An answer flagged unsafe never wins against
    one not flagged (the export's rule): such a verdict is the other answer's win (`unsafe_overridden` counts
    those it turned); `unsafe_answers` counts each policy's answers flagged."""
    from align.labeling.export import verdicts_fingerprint
    from align.labeling.store import Store, unsafe_replies

    versions = dict(versions or {})
    store = Store(run_store(cfg.store, cfg.run.dir, key_prefix("eval") + "store"))
    added, batches = 0, []

    def tag(name: str) -> str:
        return f"{name}@{versions[name]}" if versions.get(name) else name

    for name, texts in responses.items():
        if name == cfg.baseline:
            continue
        meta = [{"policy": n, "version": versions.get(n)} for n in (name, cfg.baseline)]
        items = [{"prompt": p, "responses": [a, b], "response_meta": meta}
                 for p, a, b in zip(prompts, texts, responses[cfg.baseline], strict=True)]
        source = {"stage": "eval", "system_prompts": {n: (system_prompts or {}).get(n) for n in (name, cfg.baseline)}}
        batches.append(f"eval-{tag(name)}-vs-{tag(cfg.baseline)}")
        added += store.add_tasks(batches[-1], items, source=source, kind="pairwise")
    def version_now(name: str) -> str | None:  # None: unknown, every verdict on it counts (a policy of this eval)
        if name not in responses and name not in versions:
            folder = stage_dir(cfg.run.dir, name) if name in stages_of_kind("policy") else None
            versions[name] = policy_version(folder) if folder and is_adapter_dir(folder) else "(not in the run)"
        return versions.get(name)

    comparisons, prompts_of, stale, overridden = [], [], 0, 0
    unsafe: dict[str, int] = {}  # per policy: its answers an annotator flagged unsafe, in the verdicts counted
    rows = store.submitted_rankings()
    for row in rows:
        if row.get("kind") != "pairwise" or not str(row.get("batch", "")).startswith("eval-"):
            continue
        if row.get("unreadable"):  # a verdict the app never wrote: named, not counted as either policy's
            raise StageError(row["unreadable"])
        metas = [r["meta"] for r in row["responses"]]
        if any(version_now(m["policy"]) and m.get("version") != version_now(m["policy"]) for m in metas):
            stale += 1  # a verdict on answers of a policy since trained again
            continue
        (a, b), (ra, rb) = [m["policy"] for m in metas], row["ranks"]
        score = 1.0 if ra < rb else 0.0 if rb < ra else 0.5
        # The export's unsafe rule (guidelines.md): an answer flagged unsafe is never the better side against one
        # nobody flagged; the verdict, a tie included, is the unflagged side's win
        flagged = unsafe_replies(row.get("flags")) & {0, 1}
        for i in flagged:
            unsafe[(a, b)[i]] = unsafe.get((a, b)[i], 0) + 1
        if len(flagged) == 1:
            ruled = 0.0 if 0 in flagged else 1.0
            overridden += ruled != score
            score = ruled
        comparisons.append((a, b, score))
        prompts_of.append(row["prompt"])
    # waiting: this eval's A/B tasks with no verdict yet (the hint asks for a rerun only while there are some)
    board = {"tasks_added": added, "comparisons": len(comparisons), "stale_comparisons": stale,
             "ties": sum(score == 0.5 for *_, score in comparisons),
             "unsafe_answers": dict(sorted(unsafe.items())), "unsafe_overridden": overridden,
             "waiting": sum(store.pending_count(b) for b in batches),
             "verdicts_sha256": verdicts_fingerprint(rows)}  # what the board read: the pipeline reruns on a change
    if comparisons:
        # the interval resamples prompts: each prompt's verdicts (every annotator, every policy pair) go together;
        # the baseline is 1000 in the ratings and in every resample, so each rating is its difference from it
        ratings = ev.bradley_terry(comparisons, anchor=cfg.baseline)
        cis = ev.bradley_terry_ci(comparisons, groups=prompts_of, n=cfg.bootstrap, anchor=cfg.baseline)
        board["leaderboard"] = sorted(({"policy": p, "rating": r, "ci": cis[p]} for p, r in ratings.items()),
                                      key=lambda x: -x["rating"])
    return board


def label_where(cfg: EvalStageConfig) -> str:
    """`align label`'s arguments for the store the A/B tasks went to: --db unless it is run.dir's own labels.db."""
    from align.labeling.store import safe_url, sqlite_path

    url = run_store(cfg.store, cfg.run.dir)
    own = sqlite_path(url) is not None and Path(sqlite_path(url)).resolve() == (Path(cfg.run.dir) / STORE_FILE).resolve()
    return f"--run-dir {shell(cfg.run.dir)}" + ("" if own else f" --db {shell(safe_url(url))}")  # password masked


def human_figures(board: dict) -> dict[str, int | float]:
    """The human board as W&B's summary and metrics.jsonl keep it: human/<policy>/rating with its interval
    (rating_ci_low, rating_ci_high), and the verdicts counted (human/comparisons, human/stale_comparisons)."""
    figures = {f"human/{k}": board[k] for k in ("comparisons", "stale_comparisons") if k in board}
    for row in board.get("leaderboard", []):
        figures.update(scalars({f"human/{row['policy']}/rating": row["rating"],
                                f"human/{row['policy']}/rating_ci": row["ci"]}))
    return figures


def main(cfg: EvalStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("eval", cfg)  # every input (policies, prompts, judges, paths, the machine) before any work
    refuse_several_processes("eval", "it does not split prompts between processes")
    paths = resolve_policies(cfg)
    out = stage_dir(cfg.run.dir, "eval")
    out.mkdir(parents=True, exist_ok=True)
    prompts_sha256 = file_hash(cfg.prompts)  # before it is read: edited while this stage runs, it is not what it read
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts > 0:
        prompts = prompts[:cfg.num_prompts]
    log.info("evaluating %s on %d prompts (baseline %s)", ", ".join(paths), len(prompts), cfg.baseline)
    seen = seen_in_training(paths, prompts)

    # --- model: one base, every policy an adapter; same prompts, settings and seeds ----------
    model, tokenizer, base_name, adapters = load_adapters(paths, cfg)
    system_prompts = {name: system_prompt_of(path) for name, path in paths.items()}  # each policy's own
    # generation.backend=vllm answers on the base the KL below runs on: 4-bit when it is, in model.compute_dtype
    vllm = {"quantize": bool(getattr(model, "is_loaded_in_4bit", False)), "compute_dtype": cfg.model.compute_dtype,
            "max_lora_rank": max(lora_rank(path) for path in paths.values())}  # one engine for them all
    responses: dict[str, list[str]] = {}
    cut: dict[str, float] = {}  # the share of each policy's answers cut at max_new_tokens
    for name in paths:
        with folded(model, adapters[name]):
            policy = Policy(model, tokenizer, str(paths[name]), base_name, system_prompts[name], **vllm)
            answers = [r[0] for r in generate_answers(policy, prompts, cfg.generation, desc=f"sampling {name}")]
            responses[name] = [a.text for a in answers]
            cut[name] = ev.mean([float(not a.finished) for a in answers])
        if cfg.scorer and len(responses) == 1 and prompts:
            # The scorer on the first answer now: one that returns no number (or raises) stops here, not once every
            # policy has answered and the KL is measured
            scorer_scores(resolve_scorer(cfg.scorer), cfg.scorer, prompts[:1], responses[name][:1])
    kl = {name: sampled_kl(model, tokenizer, prompts, adapters[name], adapters[cfg.baseline], k=cfg.kl_samples,
                           max_new_tokens=cfg.generation.max_new_tokens, seed=cfg.generation.seed,
                           batch_size=cfg.generation.batch_size, system_prompt=system_prompts[name], label=name)
          for name in paths if name != cfg.baseline and cfg.kl_samples}
    del model, policy  # the policies leave the GPU before the reward model comes onto it

    # --- judge ------------------------------------------------------------------------------
    judges = judge(cfg, prompts, responses)
    metrics: dict[str, int | float] = {}
    table: dict[str, dict] = {}
    for name, texts in responses.items():
        # cut: a judge that marks a cut answer down (support_style does) favours the policy cut less often
        row = {"length": ev.mean([len(t.split()) for t in texts]), "cut": cut[name], "distinct_1": ev.distinct_n(texts, 1),
               "distinct_2": ev.distinct_n(texts, 2), "repetition": ev.mean([ev.repetition(t) for t in texts])}
        if name in kl:
            row["kl"] = ev.mean(kl[name])
        for jname, scores in judges.items():
            row[f"{jname}/mean"] = ev.mean(scores[name])
            if name != cfg.baseline:
                base_scores = scores[cfg.baseline]
                row[f"{jname}/win_rate"] = ev.win_rate(scores[name], base_scores)
                row[f"{jname}/win_rate_ci"] = ev.win_rate_ci(scores[name], base_scores)
                row.update({f"{jname}/{k}": n for k, n in ev.win_counts(scores[name], base_scores).items()})
                metrics[f"{name}/{jname}/prompts"] = len(prompts)
        table[name] = row
        # every number, each interval as _ci_low and _ci_high: W&B's summary and metrics.jsonl had the win-rates alone
        metrics.update({f"{name}/{k}": v for k, v in scalars(row).items()})
    board = human_eval(cfg, prompts, responses, system_prompts,
                       {name: policy_version(folder) for name, folder in paths.items()}) if cfg.human else None
    if board is not None:
        metrics.update(human_figures(board))

    # --- save -------------------------------------------------------------------------------
    with open(out / "samples.jsonl", "w") as fh:
        for i, prompt in enumerate(prompts):
            rec = {"prompt": prompt, **{n: responses[n][i] for n in responses}}
            rec["scores"] = {j: {n: s[n][i] for n in s} for j, s in judges.items()}
            fh.write(json.dumps(rec) + "\n")
    save_config(cfg, out / "config.yaml")
    # The judge is a parent too: a retrained reward model makes these figures stale (align pipeline reruns eval).
    judged_by = {"reward_model": reward_model_path(cfg)} if "reward_model" in judges and "reward_model" not in paths \
        else {}
    tracker = Tracker(cfg.run, "eval", out, to_dict(cfg))  # before the manifest, which records its W&B run
    write_manifest(out, stage="eval", config=to_dict(cfg), base_model=base_name, parents={**paths, **judged_by},
                   metrics=metrics, policies=table, baseline=cfg.baseline, human=board,
                   interval="wilson",  # how win_rate_ci is made: the report labels it by this (bootstrap before)
                   prompts=len(prompts), prompts_seen_in_training=seen, system_prompts=system_prompts,
                   prompts_sha256=prompts_sha256,
                   # human=true: the verdicts its board read (align pipeline reruns it when there are others)
                   **({"rankings_sha256": board["verdicts_sha256"]} if board is not None else {}))
    tracker.log(metrics, step=0)
    tracker.table("eval/samples", ["prompt", *responses],
                  [[p, *(responses[n][i] for n in responses)] for i, p in enumerate(prompts[:50])])
    log_artifact("eval", out, cfg.run.dir, {**paths, **judged_by}, run=tracker.run)
    tracker.finish(metrics)

    # --- report -----------------------------------------------------------------------------
    for name, row in table.items():
        if name == cfg.baseline:
            continue
        for jname in judges:
            lo, hi = row[f"{jname}/win_rate_ci"]
            print(f"{name} vs {cfg.baseline} · {jname}: win-rate {row[f'{jname}/win_rate']:.1%} [{lo:.1%}, {hi:.1%}] "
                  f"{report_module.over_prompts(len(prompts), row[f'{jname}/ties'])}"
                  + (f" · KL {row['kl']:.2f} nats" if row.get("kl") is not None else ""))
    if board is not None:
        for row in board.get("leaderboard", []):
            lo, hi = row["ci"]
            flagged = board.get("unsafe_answers", {}).get(row["policy"], 0)
            print(f"human A/B · {row['policy']}: rating {row['rating']:.0f} [{lo:.0f}, {hi:.0f}]"
                  + (f" · {flagged} answers flagged unsafe" if flagged else ""))
        if board.get("unsafe_overridden"):
            print(f"human A/B: {board['unsafe_overridden']} verdicts counted for the answer nobody flagged unsafe, "
                  "against the verdict (an answer flagged unsafe is never the better side)")
        print(f"human A/B: {board['tasks_added']} new tasks, {board['comparisons']} verdicts so far"
              + (f" ({board['stale_comparisons']} on earlier versions, not counted)" if board["stale_comparisons"] else ""))
    html = report_module.write_report(cfg.run.dir)
    if board is not None and board["waiting"]:
        print_done("eval", out, f"open {shell(html)}; annotators judge the {board['waiting']} A/B tasks waiting in "
                                f"align label {label_where(cfg)}, then rerun align eval with human=true (or the align pipeline that "
                                f"ran it) for the board")
    else:
        print_done("eval", out, f"open {shell(html)}")
    return out
