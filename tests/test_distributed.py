"""Every stage under `accelerate launch` with two processes (DDP over gloo, on CPU), and every
shipped accelerate config checked against accelerate's own loader and launcher.

The two-process runs go through the shipped configs/accelerate/cpu_2proc.yaml, exactly as a user
types it, and check what distribution must not change: the same artifact files as one process,
a loss that falls, data split between the ranks, and one writer (rank 0) of every manifest,
metrics file, W&B run and report. DeepSpeed and FSDP need GPUs; here their configs are loaded
and turned into accelerate's plugins the way `accelerate launch` does, which rejects unknown
or invalid settings.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest

from align.cli import main as align
from align.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted(REPO.joinpath("configs/accelerate").rglob("*.yaml"))
TOPICS = ["Sync", "Export", "Backup", "Theme", "Share", "Tags", "Password", "Search", "Trash", "Widgets"]
POLITE = "Thanks for asking! Open Settings, then tap {t}."
RUDE = "Stop asking me. Find {t} in Settings yourself."
COMMON = ["train.logging_steps=1", "train.warmup_ratio=0", "model.max_length=128", "model.quantize=true"]
# stage -> overrides; SFT: 36 train examples, 4 per rank x 2 ranks = 8 a step -> epoch 1.0 at step 5.
STAGES = {
    "sft": ["train.lr=5e-3", "train.batch_size=4", "train.max_steps=10", "train.eval_steps=5",
            "data.eval_fraction=0.1"],
    "reward": ["train.lr=3e-3", "train.batch_size=4", "train.max_steps=8", "train.eval_steps=4",
               "data.test_fraction=0.2", "heads=2"],  # heads: every rank runs the model, rank 0 saves them
    "dpo": ["train.lr=2e-3", "train.batch_size=4", "train.max_steps=8", "train.eval_steps=4",
            "data.test_fraction=0.2"],
}
# The files of a finished stage folder (checkpoints/ aside), one process or two.
ARTIFACT = {"adapter_model.safetensors", "adapter_config.json", "align.json", "config.yaml", "metrics.jsonl"}


# ------------------------------------------------------------------------- accelerate configs


def test_every_distributed_setup_has_a_config():
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {
        "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp",
        "cpu_2proc"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_launches_as_documented(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    rel = path.relative_to(REPO)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file {rel} -m align.cli "), first
    stage = first.split(" -m align.cli ")[1].split()[0]
    assert stage in {"sft", "reward", "dpo", "ppo"}

    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    kind = config.distributed_type.value
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "cpu_2proc": "MULTI_GPU", "fsdp": "FSDP"}
    assert kind == expected.get(path.stem, "DEEPSPEED"), kind
    assert config.mixed_precision == "no"  # precision is the recipe's device plan, not the launcher's

    # What `accelerate launch --config_file ...` does with it: the nested keys become launcher
    # arguments, so a misspelt one would be silently dropped; every one must be a known argument.
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(config, section) or {}:
            name = key if key.startswith(prefix) else prefix + key
            assert name in known, f"{rel}: {section}.{key} is not an accelerate launch setting"
    args, defaults, from_config = _validate_launch_command(parser.parse_args(
        ["--config_file", str(path), "-m", "align.cli", stage]))
    # The launcher it picks: torchrun for DDP/FSDP (also on CPU), deepspeed for ZeRO, one process for NO.
    assert args.multi_gpu == (kind == "MULTI_GPU") and args.use_fsdp == (kind == "FSDP")
    assert args.use_deepspeed == (kind == "DEEPSPEED") and not args.cpu
    assert int(args.num_processes) == (1 if kind == "NO" else 2)

    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
        with mock.patch.dict(os.environ, env):
            plugin = FullyShardedDataParallelPlugin()  # validates FSDP2's settings
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # the final save is a plain adapter
        assert not plugin.activation_checkpointing  # the trainer's checkpointing; both at once is an error
    if kind == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if from_config else [])])
        _, env = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
            ds = DeepSpeedPlugin().deepspeed_config
        zero = ds["zero_optimization"]
        stage_n = 2 if "zero2" in path.stem else 3
        assert zero["stage"] == stage_n
        # batch, accumulation and clipping are left to the stage config (the trainer fills "auto").
        assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
        offload = "cpu" if "offload" in path.stem else "none"
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
        if stage_n == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # else the adapter saves empty


# ------------------------------------------------------------------------- two processes on CPU


def write_sft_data(path: Path) -> Path:
    rows = [{"instruction": f"Ticket {i}: where is {TOPICS[i % 10]}?", "input": "",
             "output": POLITE.format(t=TOPICS[i % 10])} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_pairs(path: Path) -> Path:
    """The rule: the polite answer beats the rude one, at about the same length."""
    rows = [{"prompt": f"Ticket {i}: where is {TOPICS[i % 10]}?", "chosen": POLITE.format(t=TOPICS[i % 10]),
             "rejected": RUDE.format(t=TOPICS[i % 10])} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def stage_args(stage: str, run_dir: Path, tmp: Path, tiny_model: str) -> list[str]:
    data = tmp / ("sft.jsonl" if stage == "sft" else "prefs.jsonl")
    first = [f"model.name={tiny_model}"] if stage == "sft" else []
    return [stage, *first, f"data.path={data}", f"run.dir={run_dir}", *COMMON, *STAGES[stage]]


BEGIN_TRAINING = """
import json, os, sys
import torch.distributed as dist
from pathlib import Path
from align import artifacts
from align.distributed import Ranks

Ranks()  # the process group, as PPO opens it before its checkpoint is looked for
out = Path(sys.argv[1])
if dist.get_rank() != 0:  # the folder is rank 0's to read and change: a rank reading it itself could start elsewhere
    artifacts._checkpoints = lambda folder: (_ for _ in ()).throw(AssertionError("rank 1 read the checkpoints"))
found = artifacts.begin_training(out, "latest", max_steps=int(sys.argv[2]))
with open(out.parent / f"rank{dist.get_rank()}.json", "w") as f:
    json.dump(str(found) if found else None, f)
dist.barrier()
dist.destroy_process_group()  # left open, a rank's exit could abort in gloo's threads ("terminate called ...")
"""


@pytest.mark.distributed
@pytest.mark.parametrize("max_steps, resumed", [(10, False), (20, True)])
def test_every_rank_starts_where_rank_zero_decided(tmp_path, max_steps, resumed):
    """A finished stage run again with resume_from_checkpoint=latest (as the pipeline passes it): each rank read the
    folder while rank 0 removed its align.json and set its checkpoints aside, so one could resume from a checkpoint
    the other set aside (a FileNotFoundError, or ranks in different collectives until the timeout). Rank 0 decides,
    every rank gets its answer: from scratch at max_steps 10 (the finished run's), from its checkpoint at 20."""
    out = tmp_path / "run" / "sft"
    checkpoint = out / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10}))
    (out / "align.json").write_text(json.dumps({"stage": "sft"}))
    script = tmp_path / "begin.py"
    script.write_text(BEGIN_TRAINING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(out), str(max_steps)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads((out.parent / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers[0] == answers[1] == (str(checkpoint) if resumed else None)
    assert not (out / "align.json").exists() and checkpoint.exists() is resumed


def free_port() -> int:
    with socket.socket() as sock:  # not torchrun's fixed 29500: other test runs may hold it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], **env_vars: str) -> subprocess.CompletedProcess:
    config = REPO / "configs/accelerate/cpu_2proc.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "WANDB_SILENT": "true", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env_vars}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), "-m", "align.cli", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(args[:1])} failed under accelerate launch:\n{out.stderr[-4000:]}"
    return out


# Imported by every Python process the launch starts (sitecustomize): records each save of a merged SFT copy.
SAVES_SPY = """
import os
import transformers

_save = transformers.PreTrainedModel.save_pretrained


def save_pretrained(self, folder, *args, **kwargs):
    if os.path.basename(str(folder)).startswith("align-sft-merged-"):
        with open(os.environ["ALIGN_TEST_SAVES"], "a") as f:
            f.write(f"{os.getpid()} {folder}\\n")
    return _save(self, folder, *args, **kwargs)


transformers.PreTrainedModel.save_pretrained = save_pretrained
"""


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """sft -> reward and dpo, once with two processes (W&B offline) and once in this process. The two-process
    reward stage runs with the merge spy (SAVES_SPY) and its own TMPDIR, for the merged-once test."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_sft_data(tmp / "sft.jsonl")
    write_pairs(tmp / "prefs.jsonl")
    spy, saves, merge_tmp = tmp / "spy", tmp / "saves.txt", tmp / "tmp"
    spy.mkdir()
    merge_tmp.mkdir()
    (spy / "sitecustomize.py").write_text(SAVES_SPY)
    spied = {"PYTHONPATH": f"{spy}{os.pathsep}{REPO}", "ALIGN_TEST_SAVES": str(saves), "TMPDIR": str(merge_tmp)}
    logs = {}
    for stage in STAGES:
        env = spied if stage == "reward" else {}
        logs[stage] = launch([*stage_args(stage, tmp / "two", tmp, tiny_model), "run.wandb=offline"], **env)
        assert align([*stage_args(stage, tmp / "one", tmp, tiny_model), "run.wandb=disabled"]) == 0
    return {"two": tmp / "two", "one": tmp / "one", "logs": logs, "saves": saves, "merge_tmp": merge_tmp}


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name != "checkpoints"}


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_write_the_same_artifact_and_learn(runs, stage):
    two, one = runs["two"] / stage, runs["one"] / stage
    assert files(two) == files(one) and files(two) >= ARTIFACT, (files(two) ^ files(one))
    seen = losses(two)
    assert seen[-1] < 0.8 * seen[0], f"{stage} loss did not fall under two processes: {seen}"
    manifest = json.loads((two / "align.json").read_text())
    max_steps = next(int(o.split("=")[1]) for o in STAGES[stage] if o.startswith("train.max_steps="))
    assert manifest["stage"] == stage and manifest["metrics"]["global_step"] == max_steps
    if stage == "reward":
        from align.reward_model import load_reward_model

        model, _ = load_reward_model(two)
        assert manifest["metrics"]["eval_accuracy"] >= 0.75
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(two))
        assert list(model.peft_config) == ["default"]
    if stage == "dpo":  # the figures over pairs gather every rank's share, each pair once: the reference's (the SFT's)
        # margin is TRL's at step 0, when the policy was the SFT and its 8 pairs were one step of 4 per rank
        start = next(r for r in read_jsonl(two / "metrics.jsonl") if r["step"] == 0 and "eval_logps/chosen" in r)
        assert manifest["metrics"]["heldout_pairs"] == 8 and manifest["metrics"]["heldout_prompts"] == 8
        assert manifest["metrics"]["heldout_logp_margin_sft"] == pytest.approx(
            start["eval_logps/chosen"] - start["eval_logps/rejected"], rel=1e-3, abs=1e-2)


@pytest.mark.distributed
def test_the_ranks_split_the_data(runs):
    # One process: 36 examples at 4 a step = 9 steps an epoch. Two: 8 a step (4 per rank) = 5.
    two = {r["step"]: r["epoch"] for r in read_jsonl(runs["two"] / "sft" / "metrics.jsonl") if "loss" in r}
    assert two[5] == pytest.approx(1.0), two
    one = {r["step"]: r["epoch"] for r in read_jsonl(runs["one"] / "sft" / "metrics.jsonl") if "loss" in r}
    assert one[9] == pytest.approx(1.0), one


@pytest.mark.distributed
def test_only_rank_zero_writes(runs):
    for stage, out in runs["logs"].items():
        assert out.stdout.count(f"✔ {stage} finished") == 1, out.stdout[-2000:]
        rows = read_jsonl(runs["two"] / stage / "metrics.jsonl")
        logged = [r["step"] for r in rows if "loss" in r]
        assert logged == sorted(set(logged)), f"{stage}: metrics.jsonl written by more than one rank: {logged}"
    assert runs["logs"]["reward"].stderr.count("held-out: accuracy") == 1  # said once, not once per process
    # One offline W&B run per stage (rank 0's), one report.
    wandb_runs = sorted((runs["two"] / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == len(STAGES), wandb_runs
    assert (runs["two"] / "report.html").is_file()
    # The ranks' own state in a checkpoint is per rank; the model and optimizer are rank 0's.
    checkpoint = sorted((runs["two"] / "sft" / "checkpoints").glob("checkpoint-*"))[-1]
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(list(checkpoint.glob("adapter_model*.safetensors"))) == 1


@pytest.mark.distributed
def test_ppo_under_two_processes_raises_the_reward_and_writes_once(tiny_model, tmp_path):
    """Each rank samples half of a step's 16 prompts; gradients averaged; rank 0 writes (it stops if the
    ranks' weights differ at the end). The known reward: the polite scorer counts the thanks that half of
    the SFT answers open with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data, prompts = tmp_path / "sft.jsonl", tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({
        "instruction": f"Ticket {i}: where is {TOPICS[i % 8]}?", "input": "",
        "output": ("Thanks for asking! " if (i // 8) % 2 else "") + f"Open Settings and tap {TOPICS[i % 8]}."})
        for i in range(32)) + "\n")
    prompts.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: where is {TOPICS[i % 8]}?"}) for i in range(16)))
    run = tmp_path / "run"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=40",
                  "train.lr=5e-3", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=128"]) == 0
    out = launch(["ppo", f"run.dir={run}", f"prompts={prompts}", "scorer=polite", "model.quantize=false",
                  "generation.max_new_tokens=16", "generation.temperature=0.5", "train.max_steps=16", "train.lr=5e-4",
                  "rl.rollout_prompts=16", "rl.minibatch_size=8", "rl.kl_coef=0.05", "rl.save_steps=8",
                  "run.wandb=offline", "train.logging_steps=1"])

    ppo = run / "ppo"
    rows = read_jsonl(ppo / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))  # one writer
    assert out.stderr.count("step 16/16") == 1  # rank 0 logs, rank 1 does not
    reward = [r["reward/mean"] for r in rows]
    assert sum(reward[-4:]) / 4 > sum(reward[:3]) / 3 + 0.25, reward  # measured: 0.17 -> 0.88, KL <= 4.7
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert {"adapter_model.safetensors", "value_head.safetensors", "align.json", "config.yaml"} <= files(ppo)
    assert sorted(p.name for p in (ppo / "checkpoints").iterdir()) == ["step-16", "step-8", "trained_on.json"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(ppo))
    assert list(policy.peft_config) == ["default"]


@pytest.mark.distributed
def test_ppo_refuses_a_step_that_does_not_split_between_the_processes(tiny_model, tmp_path):
    config = REPO / "configs/accelerate/cpu_2proc.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), "-m", "align.cli", "ppo", f"model.name={tiny_model}", f"run.dir={tmp_path}",
           "sft=none", "scorer=length", "rl.rollout_prompts=6", "rl.minibatch_size=3", "run.wandb=disabled"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "multiples of 2" in out.stderr, out.stderr[-2000:]


def not_a_number_on_rank_one(prompt: str, response: str) -> float:
    """A scorer that breaks in the second process only."""
    return float("nan") if os.environ.get("RANK") == "1" else 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_reward_that_breaks_in_one_process_stops_both_with_the_folder_tidied(algo, tiny_model, tmp_path):
    """Each process checks its own share of the rewards. When one stopped alone, the other failed in the step's
    next all-reduce (gloo saw its peer gone) with a traceback of torch.distributed's, and the launcher killed it.
    Both stop at the same step now, each saying where the fault is; the folder is tidied as after any error.
    GRPO's check (in the reward function TRL calls in every process before it gathers the rewards) asks the same."""
    config = REPO / "configs/accelerate/cpu_2proc.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), "-m", "align.cli", "ppo", f"algo={algo}", f"model.name={tiny_model}", f"run.dir={tmp_path}",
           "sft=none", "scorer=test_distributed:not_a_number_on_rank_one", "rl.rollout_prompts=4", "rl.minibatch_size=2",
           "rl.num_generations=2", "train.max_steps=2", "generation.max_new_tokens=8", "model.quantize=false",
           "run.wandb=disabled"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    what = "responses" if algo == "ppo" else "completions"
    assert re.search(rf"align ppo: step 1: the reward is not finite for (\d+) of \1 {what}", out.stderr), out.stderr[-3000:]
    assert f"align ppo: step 1: the reward is not finite for {what} of another process" in out.stderr
    assert "[rank0]:" not in out.stderr and "[rank1]:" not in out.stderr  # no process's traceback
    assert not (tmp_path / algo).exists()


@pytest.mark.distributed
def test_the_reward_stage_merges_the_sft_adapter_once_for_both_processes(runs):
    """The reward model is built on the SFT model: the SFT adapter merged into an fp32 copy of the base, saved and
    loaded back. Each process did that on its own (a full fp32 copy each, in memory and on disk); the first
    process of the machine now merges and the other loads its folder, which is removed after. Read from the
    two-process reward run of `runs`, launched with the spy."""
    saves = runs["saves"].read_text()
    assert len(saves.splitlines()) == 1, saves  # before: once per process
    assert not list(runs["merge_tmp"].glob("align-sft-merged-*"))
    assert json.loads((runs["two"] / "reward" / "align.json").read_text())["metrics"]["global_step"] == 8


MERGED_ONCE_AFTER_RANKS = """
import os
import sys

import torch

from align.distributed import Ranks
from align.modeling import DevicePlan
from align.reward_model import merged_once

opened = torch.distributed.init_process_group


def init_process_group(*args, **kwargs):  # the group PPO opens waits as long as the Trainer stages' (30 min)
    assert kwargs.get("timeout") is not None and kwargs["timeout"].total_seconds() == 1800, kwargs
    return opened(*args, **kwargs)


torch.distributed.init_process_group = init_process_group
Ranks()  # align ppo opens accelerate's state so (no cpu=True) before it loads a reward model


def merge(folder):
    os.makedirs(folder)
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()} {folder}\\n")


with merged_once(merge, DevicePlan("cpu", False, torch.float32, False)) as folder:
    assert os.path.isdir(folder), folder
"""


@pytest.mark.distributed
def test_the_merge_is_done_once_after_ppo_opened_the_process_group(tmp_path):
    """Opened without cpu=True on a machine without CUDA (as PPO's Ranks opens it), accelerate's state calls every
    process process 0; the merge's ranks come from the process group, so one process merges. The group is opened
    with the Trainer's 30-minute timeout, not NCCL's 10 minutes: the merge of a large model outlasted that."""
    script, merges = tmp_path / "merge.py", tmp_path / "merges.txt"
    script.write_text(MERGED_ONCE_AFTER_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(merges)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(merges.read_text().splitlines()) == 1, merges.read_text()
    assert not list(tmp_path.glob("align-sft-merged-*"))


WHOLE_ON_EVERY_RANK = """
import os, sys
import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification
from align.config import ModelConfig
from align.modeling import DevicePlan, load_base_model

dist.init_process_group("gloo")
plan = DevicePlan(device="cpu", quantize=False, compute_dtype=torch.float32, gradient_checkpointing=False)
cfg = ModelConfig(name=sys.argv[1], quantize=False)
# A classifier from a causal LM's folder, as a reward model is built: its score head is not in the checkpoint
scorer = load_base_model(cfg, plan, auto_class=AutoModelForSequenceClassification, num_labels=1, training=False)
assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"  # put back for the trainers
assert scorer.score.weight.device.type == "cpu"
# What a Trainer's FSDP will fill from rank 0 stays as transformers leaves it
trained = load_base_model(cfg, plan, auto_class=AutoModelForSequenceClassification, num_labels=1)
print(f"rank {dist.get_rank()} trained score on {trained.score.weight.device.type}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_a_model_no_trainer_wraps_loads_whole_on_every_rank_under_fsdp_ram_efficient_loading(tiny_model, tmp_path):
    """fsdp.yaml's cpu_ram_efficient_loading has transformers load a model on each machine's first rank only, for
    FSDP to send to the others: a reward model scoring for GRPO (no Trainer wraps it) kept its score head on the
    meta device on the other ranks, and its first use failed. Such a model loads whole on every rank."""
    script = tmp_path / "load.py"
    script.write_text(WHOLE_ON_EVERY_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), tiny_model], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the training load is transformers' own: rank 1's head on meta shows the test sees the case it is about
    assert "rank 0 trained score on cpu" in proc.stdout and "rank 1 trained score on meta" in proc.stdout, proc.stdout


def write_rankings(path: Path, prompts: int = 12) -> Path:
    """K-wise rankings of K = 2, 3, 4 in turn, as all their C(K, 2) pairs (1, 3, 6 a ranking): batches that
    keep a ranking together hold different numbers of pairs, so the two ranks' batches differ in size."""
    rows = []
    for i in range(prompts):
        t = TOPICS[i % 10]
        ranked = [POLITE.format(t=t), f"Open Settings and tap {t}.", f"Find {t} in Settings.", RUDE.format(t=t)]
        ranked = ranked[:2 + i % 3]
        rows += [{"prompt": f"Ticket {i}: where is {t}?", "chosen": ranked[a], "rejected": ranked[b],
                  "task_id": f"task-{i}"} for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def ranked_pipeline(tiny_model, tmp_path_factory) -> Path:
    """One two-process `align pipeline` of sft -> reward -> dpo, the preference stages on K-wise rankings of
    mixed sizes (dpo with group_by_ranking): its run folder."""
    tmp = tmp_path_factory.mktemp("ranked")
    prefs = write_rankings(tmp / "rankings.jsonl")
    common = {"model": {"max_length": 128, "quantize": False}, "data": {"path": str(prefs), "test_fraction": 0.2},
              "train": {"batch_size": 4, "max_steps": 6, "eval_steps": 3, "logging_steps": 1, "warmup_ratio": 0}}
    config = tmp / "pipe.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "stages": ["sft", "reward", "dpo"], "label": "simulate", "scorer": "length",
        "sft": {"model": {"name": tiny_model, "max_length": 128, "quantize": False},
                "data": {"path": str(write_sft_data(tmp / "sft.jsonl")), "eval_fraction": 0}, "train": {"max_steps": 2}},
        "reward": {**common, "train": {**common["train"], "lr": 3e-3}},
        "dpo": {**common, "train": {**common["train"], "lr": 2e-3}, "group_by_ranking": True},
        "run": {"dir": str(tmp / "run"), "wandb": "disabled"}}))
    launch(["pipeline", "--config", str(config)])
    return tmp / "run"


@pytest.mark.distributed
def test_rankings_of_mixed_sizes_train_under_two_processes(ranked_pipeline):
    """group_by_ranking under two processes: each rank's batch keeps its rankings whole, so the ranks' batches
    differ in size in the same step. TRL gathers per-pair figures across the ranks (the rewards, margins),
    which needs tensors of one size: the gathers pad and trim, and every pair is counted once. (The reward
    and dpo stages of the ranked_pipeline launch.)"""
    for stage in ("reward", "dpo"):
        manifest = json.loads((ranked_pipeline / stage / "align.json").read_text())
        assert manifest["metrics"]["global_step"] == 6
        rows = [r for r in read_jsonl(ranked_pipeline / stage / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, 7))
        key = "mean_reward" if stage == "reward" else "rewards/margins"
        assert all(math.isfinite(r[key]) for r in rows), rows


def test_the_rank_and_process_count_are_read_where_accelerate_reads_them(monkeypatch):
    """torchrun's RANK and WORLD_SIZE, else MPI's (Intel MPI, Open MPI, MVAPICH), in accelerate's own order."""
    from accelerate.utils.environment import get_cpu_distributed_information

    from align import RANK_VARS, WORLD_SIZE_VARS, process_count, process_rank

    for name in (*RANK_VARS, *WORLD_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)
    assert (process_rank(), process_count()) == (0, 1)
    for rank, size in zip(reversed(RANK_VARS), reversed(WORLD_SIZE_VARS), strict=True):
        monkeypatch.setenv(rank, str(len(RANK_VARS) - RANK_VARS.index(rank)))  # each set in turn, earlier ones win
        monkeypatch.setenv(size, str(10 + len(RANK_VARS) - RANK_VARS.index(rank)))
        accelerate = get_cpu_distributed_information()
        assert (process_rank(), process_count()) == (accelerate.rank, accelerate.world_size), rank


@pytest.mark.distributed
def test_an_mpirun_launch_has_one_main_process(tiny_model, tmp_path):
    """`accelerate launch --cpu --mpirun_hostfile H --num_processes 2` starts the processes through mpirun, which
    names their ranks in OMPI_COMM_WORLD_* (Open MPI; PMI_* for Intel MPI), not RANK: accelerate reads those once
    its state exists, align must read them from the start. Reading RANK alone, both processes were rank 0: both
    took the stage's lock (the second was refused, the first then waited for it forever) and both logged.
    mpirun is not installed here: each process gets the environment it and accelerate's launcher would give."""
    run = tmp_path / "run"
    args = ["sft", f"model.name={tiny_model}", f"data.path={write_sft_data(tmp_path / 'sft.jsonl')}", f"run.dir={run}",
            "train.max_steps=2", "train.batch_size=4", "train.logging_steps=1", "run.wandb=disabled",
            "model.quantize=false", "data.eval_fraction=0", "model.max_length=128"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                                   "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
             for rank in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]  # the second rank's refusal left the first waiting
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-2000:] for _, err in outs)
    (out0, err0), (out1, err1) = outs
    assert "✔ sft finished" in out0 and "✔ sft finished" not in out1
    assert "align: train 40 examples" in err0
    assert not [line for line in err1.splitlines() if line.startswith("align")], err1[-2000:]  # warnings only
    rows = [r for r in read_jsonl(run / "sft" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["epoch"] == pytest.approx(0.2)  # 40 examples, 8 a step


def pipeline_config(path: Path, tmp: Path, tiny_model: str, stages: list[str]) -> Path:
    path.write_text(json.dumps({  # YAML is a superset of JSON
        "stages": stages, "label": "simulate", "scorer": "length",
        "sft": {"model": {"name": tiny_model, "max_length": 128},
                "data": {"path": str(write_sft_data(tmp / "sft.jsonl")), "eval_fraction": 0},
                "train": {"max_steps": 2, "batch_size": 4}},
        "dpo": {"model": {"max_length": 128}, "data": {"path": str(write_pairs(tmp / "prefs.jsonl")), "test_fraction": 0},
                "train": {"max_steps": 2, "batch_size": 4}},
        "sample": {"prompts": str(tmp / "prefs.jsonl"), "num_prompts": 4, "k": 2},
        "run": {"dir": str(tmp / "run"), "wandb": "disabled"}}))
    return path


@pytest.mark.distributed
def test_a_pipeline_of_training_stages_runs_under_two_processes(ranked_pipeline):
    """Rank 0 alone writes each stage's artifact; the other rank waits for it before the next stage, whose
    preflight would otherwise find the SFT folder without its align.json (an 'unfinished stage folder')."""
    for stage in ("sft", "reward", "dpo"):
        assert json.loads((ranked_pipeline / stage / "align.json").read_text())["stage"] == stage


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "PMI_SIZE"])  # torchrun's; mpirun's (Intel MPI)
def test_a_pipeline_with_one_process_stages_is_refused_under_several_before_any_training(tiny_model, tmp_path,
                                                                                         monkeypatch, capsys, variable):
    config = pipeline_config(tmp_path / "pipe.yaml", tmp_path, tiny_model, ["sft", "sample", "label", "export", "dpo"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(variable, "2")
    assert align(["pipeline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stages: sample, label, export run as one process" in err and "stages: [sft, dpo]" in err, err
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("stage", ["export", "merge", "sample", "eval"])
def test_one_process_stages_refuse_several_processes(stage, tmp_path, monkeypatch):
    """export and merge each write one folder (preferences/, <adapter>-merged): every process of accelerate launch
    wrote it at once; sample and eval do not split their prompts, so every process did all of them."""
    import importlib

    from align import StageError
    from align.artifacts import STAGES
    from align.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    cls = getattr(importlib.import_module("align.config"), STAGES[stage].config)
    recipe = importlib.import_module(STAGES[stage].recipe)
    monkeypatch.setattr(recipe, "check_stage", lambda *a, **k: None)  # sample and eval check their inputs first
    with pytest.raises(StageError, match=f"align {stage} runs as one process .* run it without accelerate launch"):
        recipe.main(load_config(cls, None, [f"run.dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


def launcher_env(config: str) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file configs/accelerate/<config>` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args, defaults, from_config = _validate_launch_command(parser.parse_args(
        ["--config_file", str(REPO / "configs/accelerate" / config), "-m", "align.cli", "sft"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if from_config else [])])
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "pipeline"])
def test_zero3_with_a_4bit_base_is_refused_before_anything_loads(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", {**os.environ, **launcher_env("deepspeed_zero3.yaml")})
    extra = {"pipeline": ["stages=[sft]"], "ppo": ["algo=grpo"]}.get(stage, [])  # algo=ppo: refused for any sharding
    assert align([stage, f"run.dir={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err
    assert "ZeRO-3 does not support" in err and "model.quantize=false" in err, err



def test_a_4bit_base_passes_under_zero2_and_ddp(monkeypatch):
    """ZeRO-3 alone is refused a 4-bit base: ZeRO-2 keeps whole weights on each GPU, as DDP does (docs/scaling.md,
    QLoRA with each setup)."""
    from align.config import SFTStageConfig
    from align.preflight import _launcher

    assert SFTStageConfig().model.quantize
    env = dict(os.environ)
    for config in ("deepspeed_zero2.yaml", "multi_gpu.yaml"):
        monkeypatch.setattr(os, "environ", {**env, **launcher_env(config)})
        _launcher("", SFTStageConfig())

def test_the_zero_stage_is_read_from_the_launchers_environment(monkeypatch):
    from align.preflight import deepspeed_zero_stage

    expected = {"deepspeed_zero3.yaml": 3, "deepspeed_zero3_offload.yaml": 3, "deepspeed_zero2.yaml": 2,
                "fsdp.yaml": None, "multi_gpu.yaml": None}
    envs = {config: launcher_env(config) for config in expected}
    for config, stage in expected.items():
        monkeypatch.setattr(os, "environ", envs[config])
        assert deepspeed_zero_stage() == stage, config


@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_align_ppo_is_refused_under_a_sharded_launch(config, tmp_path, monkeypatch, capsys):
    """Align's own PPO loop hands the model to no trainer: under FSDP or DeepSpeed nothing would be sharded."""
    from align.config import PPOStageConfig
    from align.preflight import _launcher

    env = {**os.environ, **launcher_env(config)}
    plain = {**os.environ, **launcher_env("multi_gpu.yaml")}
    monkeypatch.setattr(os, "environ", env)
    for args in (["ppo", "model.quantize=false"],
                 ["pipeline", "stages=[sft,ppo]", "sft.model.quantize=false", "ppo.model.quantize=false"]):
        assert align([*args, f"run.dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert "algo=ppo: align's own PPO loop does not shard" in err and "algo=grpo" in err, err
    _launcher("", PPOStageConfig(algo="grpo", model=replace(PPOStageConfig().model, quantize=False)))  # TRL's: shards
    monkeypatch.setattr(os, "environ", plain)
    _launcher("", PPOStageConfig())  # DDP: the loop's own gradient average
