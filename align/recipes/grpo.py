"""GRPO or RLOO through TRL on the PPO stage's reward: `align ppo algo=grpo` / `algo=rloo`.

    align ppo --config configs/quickstart/ppo.yaml algo=grpo rl.num_generations=4
    align ppo run.dir=runs/NAME algo=rloo scorer=support_style
    align ppo algo=grpo train.resume_from_checkpoint=latest      # TRL's checkpoints/checkpoint-N

One command with PPO on purpose: the same config (`rl.*`, `generation.*`, `train.*`), the same
reward (the reward model past its gate, or `scorer=`) and the same starting policy; only the
algorithm differs, so `algo=` picks it and align.artifacts routes `align ppo` here.

The policy is the SFT adapter as a PeftModel (without one, a fresh LoRA on model.name); with
rl.kl_coef > 0 TRL adds a frozen "ref" copy of it as the reference, as DPO does. The reward is
wrapped as a TRL reward function. Mapping: rl.rollout_prompts → completions per step (a multiple
of rl.num_generations, the group), rl.kl_coef → beta, rl.clip_range → epsilon, generation.* → max
completion length, temperature, top_p; generation.backend=vllm → TRL's use_vllm (colocate).

Writes <run.dir>/grpo/ (or rloo/): a plain peft adapter (the policy, as "default"), tokenizer,
config.yaml, metrics.jsonl, align.json (parents sft + reward_model) and checkpoints/.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from transformers import set_seed

from align import StageError, process_count, report
from align import rl as R
from align.artifacts import (
    eval_command,
    is_main_process,
    key_prefix,
    print_done,
    stage_dir,
    system_prompt_of,
    write_manifest,
)
from align.config import ConfigError, PPOStageConfig, RLConfig, save_config, to_dict
from align.cpu import keep_trainable_in, restore_policy_from_ref, speed_up_cpu_training
from align.data import file_hash, load_prompts, with_system_prompt
from align.distributed import Ranks
from align.generation import plain_sampling
from align.gpu_training import (
    adapter_settings,
    describe_levers,
    fit_checkpointing,
    one_trainable_dtype,
    peak_gpu_mib,
    use_liger,
)
from align.modeling import (
    adapter_base_name,
    check_liger,
    device_plan,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
    unseen_quantization,
)
from align.preflight import check_stage
from align.tracking import finish_wandb, log_artifact, start_wandb_run
from align.training import MetricsJSONL, ThisRunsSettings, resume_checkpoint, train_from, train_loss, trl_args

log = logging.getLogger(__name__)


def check(cfg: PPOStageConfig) -> None:
    """What is left to check once the config's own rules (PPOStageConfig.validate) have passed."""
    if cfg.algo not in ("grpo", "rloo"):
        raise ConfigError(f"algo={cfg.algo} is run by align/recipes/ppo.py (align.artifacts.run_stage routes it)")
    R.check(cfg)
    if cfg.rl.rollout_prompts % _world():
        raise ConfigError(f"rl.rollout_prompts={cfg.rl.rollout_prompts}: a step's completions are split between "
                          f"{_world()} processes, as PPO's prompts are: it must be a multiple of {_world()}")


# rl.* keys of align's own PPO loop that TRL's GRPO and RLOO have no use for (it has its own groups,
# no value function, no reward whitening of this kind): set, they are said to be ignored.
PPO_ONLY = ("minibatch_size", "ppo_epochs", "kl_control", "kl_target", "kl_horizon", "gamma", "lam",
            "clip_range_value", "vf_coef", "whiten_rewards", "score_clip", "missing_eos_penalty")


def ignored_settings(cfg: PPOStageConfig) -> list[str]:
    """The PPO-only rl.* keys set away from their defaults (the quickstart's ppo.yaml sets several), and
    rl.missing_eos_penalty whenever it is on, as it is by default: a cut answer loses nothing under TRL's trainers
    (a user coming from PPO was not told)."""
    default = RLConfig()
    return [f"rl.{k}" for k in PPO_ONLY if (bool(cfg.rl.missing_eos_penalty) if k == "missing_eos_penalty"
                                            else getattr(cfg.rl, k) != getattr(default, k))]


def _world() -> int:
    return process_count()


def reference_of(cfg: PPOStageConfig, has_ref: bool) -> str:
    """What the manifest names as the reference: the one TRL set up. With beta = rl.kl_coef = 0 it sets up
    none (no KL term, no "ref" copy), and naming the SFT adapter's copy would name one that never existed."""
    if cfg.rl.kl_coef == 0:
        return "none: kl_coef=0"
    return "sft adapter (frozen copy)" if has_ref else "base (adapter disabled)"


def tokens_per_step(cfg: PPOStageConfig, tokenizer, prompts: list[list[dict]]) -> int:
    """What one process's backward holds: its completions of a step (TRL's per-device batch, rl.rollout_prompts
    over the processes), each its prompt (the longest, as TRL pads) and up to generation.max_new_tokens. The
    rollout's generation and the reference's log-probs keep no activations."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return cfg.rl.rollout_prompts // _world() * (longest + cfg.generation.max_new_tokens)


def grpo_args(cfg: PPOStageConfig, plan, out: Path):
    """TRL's GRPOConfig or RLOOConfig: the shared mapping (align.training) plus the RL keys."""
    if cfg.algo == "grpo":
        from trl import GRPOConfig as Config
    else:
        from trl import RLOOConfig as Config
    if cfg.generation.backend == "vllm" and plan.quantize:
        log.warning("generation.backend=vllm on a 4-bit base: TRL starts vLLM with bitsandbytes and loads the merged "
                    "policy's weights into it before each generation, which TRL's issues #3654 and #4973 report "
                    "failing with shape mismatches (not run here: no GPU so far). If the first step stops so, set "
                    "%smodel.quantize=false (LoRA on the bf16 base), or generation.backend=transformers",
                    key_prefix("ppo"))
    return trl_args(
        Config, cfg.train, plan, cfg.run, cfg.algo, out, has_eval=False,
        # A step's completions (rl.num_generations per prompt) over every process, as PPO splits its prompts:
        # TRL's batch is per device.
        per_device_train_batch_size=cfg.rl.rollout_prompts // _world(),
        gradient_accumulation_steps=1,
        num_generations=cfg.rl.num_generations,
        max_completion_length=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        beta=cfg.rl.kl_coef,
        epsilon=cfg.rl.clip_range,
        # As align's PPO: the log-probs of a rollout, its reference and its update are one function (TRL's
        # default keeps the adapter's dropout on, noise in every ratio and KL).
        disable_dropout=True,
        # vLLM in the training process (TRL syncs the policy's weights into it each step).
        use_vllm=cfg.generation.backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization,
        save_steps=cfg.rl.save_steps or cfg.train.max_steps,
    )


def main(cfg: PPOStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("ppo", cfg)  # every input (adapters, reward, prompts, paths, the machine) before any work
    check(cfg)
    check_liger(cfg.train.liger)  # a machine that cannot, refused before anything else
    if ignored := ignored_settings(cfg):
        log.warning("%s: align's PPO loop reads them, %s does not (TRL's trainer has no such setting)",
                    ", ".join(ignored), cfg.algo)
    out = stage_dir(cfg.run.dir, cfg.algo)
    sft = R.resolve_sft(cfg)
    if sft:
        cfg = replace(cfg, model=replace(cfg.model, name=adapter_base_name(sft)))  # the SFT's base
    plan = device_plan(cfg.model)
    log.info(plan.describe())
    if sft and (note := unseen_quantization(sft, plan)):  # the policy would not start as the SFT trained
        log.warning(note)
    R.check_reward(cfg)  # a wrong scorer or a reward model under the gate fails now, before any model loads

    # --- data -------------------------------------------------------------------------------
    from datasets import Dataset

    prompts_sha256 = file_hash(cfg.prompts)  # before it is read: edited while this stage trains, it is not what it read
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts > 0:
        prompts = prompts[:cfg.num_prompts]
    system_prompt = system_prompt_of(sft or cfg.model.name)  # the SFT's (or a merged SFT model's)
    data = Dataset.from_dict({"prompt": [with_system_prompt([{"role": "user", "content": p}], system_prompt)
                                         for p in prompts]})

    # --- reward, model ----------------------------------------------------------------------
    reward, gate_figures, rm = R.make_reward(cfg)

    ranks: list[Ranks] = []  # made at the first call, when the trainer has opened the process group

    def reward_fn(prompts, completions, **_) -> list[float]:
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        asked = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        scores = [float(x) for x in reward(asked, text)]
        # As PPO's loop: TRL took inf (advantages NaN, a zero loss, "reward": inf in the manifest, exit 0) and NaN
        # (the completion left out of the mean with a warning). Every process decides together: TRL gathers next.
        broken = [i for i, x in enumerate(scores) if not math.isfinite(x)]
        ranks[:] = ranks or [Ranks()]
        if ranks[0].any(bool(broken)):
            said = (f"for {len(broken)} of {len(scores)} completions (first: {text[broken[0]][:80]!r}, "
                    f"{scores[broken[0]]})" if broken else "for completions of another process")
            raise StageError(f"step {trainer.state.global_step + 1}: the reward is not finite {said}; fix the "
                             "reward model/scorer")
        return scores

    reward_fn.__name__ = "reward"  # TRL logs it as `reward`

    from peft import PeftModel

    # Seeded after the reward model has loaded (its fresh score head draws from the RNG): the policy's
    # random stream is then the same with a reward model or a scorer.
    set_seed(cfg.train.seed)
    base = load_base_model(cfg.model, plan)
    model = PeftModel.from_pretrained(base, str(sft), is_trainable=True) if sft else base
    tokenizer = load_tokenizer(str(sft) if sft else cfg.model.name)
    # device_plan left `auto` on with CUDA until the batch is known: off where its activations fit.
    # TRL starts its colocated vLLM engine with the trainer, after this check: what it will hold is not free
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, base,
                             tokens_per_step=tokens_per_step(cfg, tokenizer, data["prompt"]),
                             taken_later=cfg.generation.vllm_gpu_memory_utilization
                             if cfg.generation.backend == "vllm" else 0.0)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), compile=cfg.train.compile,
                             lora=adapter_settings(sft, cfg.lora))
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    if cfg.algo == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    start_wandb_run(cfg.run, cfg.algo)  # before the trainer: its W&B callback logs into this run
    trainer = Trainer(model=model, reward_funcs=[reward_fn], args=grpo_args(cfg, plan, out), train_dataset=data,
                      processing_class=tokenizer, peft_config=None if sft else peft_lora_config(cfg.lora),
                      callbacks=[MetricsJSONL(out), ThisRunsSettings()])
    policy = trainer.model
    has_ref = "ref" in policy.peft_config  # TRL's frozen copy of the SFT adapter, its KL reference
    # TRL rounded a 4-bit model's adapter to bf16 (PPO's lr 1e-5 is under bf16's step for most LoRA weights):
    # fp32 again on every device. An SFT adapter is restored from the exact copy TRL made as "ref", or, with
    # no KL term (rl.kl_coef=0: no "ref"), from its folder; a fresh one (B = 0) loses nothing to the rounding
    # and is cast back.
    if "ref" in policy.peft_config:
        restore_policy_from_ref(policy)
    else:
        keep_trainable_in(policy, torch.float32)
        if sft:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(policy, load_file(str(Path(sft) / "adapter_model.safetensors")),
                                      adapter_name="default")
    one_trainable_dtype(policy)  # sharded: DoRA's magnitudes too
    if plan.device == "cpu":
        speed_up_cpu_training(policy)

    # --- train ------------------------------------------------------------------------------
    checkpoint = resume_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on=R.trained_on(cfg, sft, rm))
    # TRL's rollouts through generate() took every knob it leaves unset (min_p, typical_p, no_repeat_ngram_size, ...)
    # from the model folder's generation_config.json: samples from another distribution than the softmax its
    # log-probs and ratios are computed from (align's own PPO loop samples under the same swap).
    with plain_sampling(policy):
        result = train_from(trainer, checkpoint)
    logs = [r for r in trainer.state.log_history if "reward" in r]
    metrics = {"steps": result.global_step, "reward_mean_first": logs[0]["reward"] if logs else None,
               **{k.replace("/", "_"): v for k, v in (logs[-1] if logs else {}).items()},
               **train_loss(result, out, checkpoint)}

    # --- save -------------------------------------------------------------------------------
    trainer.save_model(str(out))  # every rank (sharded weights are gathered); it writes each adapter
    if is_main_process():
        shutil.rmtree(out / "ref", ignore_errors=True)  # the frozen copy is the SFT adapter, already a parent
        tokenizer.save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    parents = {k: v for k, v in {"sft": sft, "reward_model": rm}.items() if v}
    write_manifest(
        out, stage=cfg.algo, config=to_dict(cfg), base_model=cfg.model.name, parents=parents, metrics=metrics,
        device_plan=levers, gpu_peak_mib=peak_gpu_mib(), algo=cfg.algo,
        reference=reference_of(cfg, has_ref), system_prompt=system_prompt,
        reward={"scorer": cfg.scorer} if cfg.scorer else {"reward_model": str(rm),
                                                            "eval_accuracy": gate_figures.get("eval_accuracy")},
        prompts={"path": cfg.prompts, "sha256": prompts_sha256, "count": len(prompts)},
    )
    log_artifact(cfg.algo, out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    print_done(cfg.algo, out, eval_command(cfg.run.dir, cfg.algo, sft, scorer=cfg.scorer, reward_model=rm,
                                            base=cfg.model.name))
    return out
