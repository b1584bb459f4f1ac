"""Strict config loading: unknown keys, wrong types and bad choices are named; every shipped YAML loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from align import config as C
from align.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

# Which dataclass a shipped YAML is for, by file name.
CONFIG_FOR = {
    "sft": C.SFTStageConfig, "sample": C.SampleStageConfig, "export": C.ExportStageConfig,
    "reward": C.RewardStageConfig, "dpo": C.DPOStageConfig, "ppo": C.PPOStageConfig, "grpo": C.PPOStageConfig,
    "rloo": C.PPOStageConfig, "eval": C.EvalStageConfig, "pipeline": C.PipelineConfig, "merge": C.MergeStageConfig,
    "serve": C.ServeStageConfig,
}


def test_defaults_and_dotted_overrides():
    cfg = load_config(C.SFTStageConfig, None, ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                               "lora.use_dora=true", "train.epochs=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.use_dora is True
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.name == "smollm2-135m"


def test_on_off_switches_accept_yaml_booleans_and_liger_auto():
    """YAML 1.1 reads a bare `on`/`off` as true/false: the on|off|auto switches take them as meant."""
    cfg = load_config(C.SFTStageConfig, None, ["model.gradient_checkpointing=on", "data.padding_free=off",
                                               "train.liger=auto"])
    assert cfg.model.gradient_checkpointing == "on" and cfg.data.padding_free == "off" and cfg.train.liger == "auto"
    assert load_config(C.SFTStageConfig, None, ["train.liger=true"]).train.liger is True
    with pytest.raises(C.ConfigError, match="train.liger"):
        load_config(C.SFTStageConfig, None, ["train.liger=sometimes"])


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'.*allowed keys in train: .*lr"):
        load_config(C.SFTStageConfig, path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*allowed keys in config: model, lora"):
        load_config(C.SFTStageConfig, None, ["trian.lr=1"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=eight", r"train.batch_size: expected int, got 'eight'"),
    ("train.batch_size=2.5", r"train.batch_size: expected int"),
    ("model.quantize=maybe", r"model.quantize: expected bool"),
    ("train.scheduler=steep", r"train.scheduler: 'steep' is not allowed; allowed values: cosine, linear"),
    ("lora.target_modules=5", r"lora.target_modules: expected list of str or str"),
    # a bad regex was refused only after the data and the model's config had loaded (5-10 s, not well under one)
    ("lora.target_modules=[q_proj", r"lora.target_modules: '\[q_proj' is neither all-linear nor a valid regex"),
    # past a C long it passed the range check (>= 1) and crashed in training (itertools.islice), after loading
    ("train.batch_size=100000000000000000000", r"train.batch_size: 100000000000000000000 is too large"),
    ("train=3", r"train: expected a section"),
])
def test_wrong_types_name_the_key_and_expected_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(C.SFTStageConfig, None, [override])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(C.SFTStageConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(C.SFTStageConfig, bad)
    # in one line (PyYAML's message is 8, with a caret drawing), where the sequence opened and where it broke
    assert "\n" not in str(err.value) and "line 1, column 8: while parsing a flow sequence; line 2, column 1" in str(err.value)
    # a section written twice: YAML keeps the last and drops the first (lr: 5 would never have been checked)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 5\nmodel:\n  max_length: 64\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 5: 'train' is written twice in one mapping \(first on "
                                          r"line 1\)"):
        load_config(C.SFTStageConfig, twice)
    twice.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match="line 3: 'lr' is written twice"):
        load_config(C.SFTStageConfig, twice)
    # a merge key's keys, overridden after it, are YAML's own way to share settings: not a key written twice
    shared = tmp_path / "shared.yaml"
    shared.write_text("dpo:\n  train: &t {epochs: 1, lr: 5.0e-4}\nreward:\n  train: {<<: *t, lr: 1.0e-5}\n")
    cfg = load_config(C.PipelineConfig, shared)
    assert (cfg.reward.train.epochs, cfg.reward.train.lr, cfg.dpo.train.lr) == (1, 1e-5, 5e-4)
    shared.write_text("sft: {run: &quiet {dir: runs/exp, wandb: disabled}}\n"  # a merge of a merge
                      "dpo: {run: &dpo_run {<<: *quiet, wandb: offline}}\nrun: {<<: *dpo_run, dir: runs/exp}\n")
    cfg = load_config(C.PipelineConfig, shared)
    assert (cfg.run.wandb, cfg.dpo.run.wandb, cfg.sft.run.wandb, cfg.run.dir) == ("offline", "offline", "disabled",
                                                                                  "runs/exp")


@pytest.mark.parametrize("value", ["#1 helper for Lumen Notes", "Answer: briefly", "[draft] be brief", "say {hi}"])
def test_a_text_override_is_the_text_typed(value):
    """YAML would read these as a comment (null), a mapping, a broken list: the key takes text, so text it is."""
    assert load_config(C.SFTStageConfig, None, [f"data.system_prompt={value}"]).data.system_prompt == value
    assert load_config(C.SFTStageConfig, None, ["data.system_prompt=null"]).data.system_prompt is None


def test_an_override_into_a_mapping_adds_or_replaces_one_key(tmp_path):
    """`policies.dpo=...` on the command line, beside a config file's own policies (and with none)."""
    path = tmp_path / "eval.yaml"
    path.write_text("policies: {sft: runs/a/sft}\n")
    cfg = load_config(C.EvalStageConfig, path, ["policies.dpo=runs/a/dpo"])
    assert cfg.policies == {"sft": "runs/a/sft", "dpo": "runs/a/dpo"}
    assert load_config(C.EvalStageConfig, None, ["policies.sft=runs/b/sft"]).policies == {"sft": "runs/b/sft"}
    assert load_config(C.ServeStageConfig, None, ["adapters.x=runs/a/dpo"]).adapters == {"x": "runs/a/dpo"}


def test_a_text_key_takes_a_number_or_yes_no_as_typed():
    """YAML reads 1, 2024 and no as a number and a boolean; a key that takes text gets the text typed."""
    assert load_config(C.SampleStageConfig, None, ["batch=1"]).batch == "1"
    assert load_config(C.SFTStageConfig, None, ["run.dir=2024"]).run.dir == "2024"
    assert load_config(C.SFTStageConfig, None, ["data.system_prompt=no"]).data.system_prompt == "no"
    with pytest.raises(ConfigError, match=r"run.wandb: .*\('off' as typed, which YAML reads as False\)"):
        load_config(C.SFTStageConfig, None, ["run.wandb=off"])


def test_a_date_or_a_list_of_numbers_is_text_where_the_key_takes_text(tmp_path):
    """YAML reads 2024-06-01 as a date and [1] as a number's list: a folder, a batch, a list of batch names."""
    assert load_config(C.SFTStageConfig, None, ["run.dir=2024-06-01"]).run.dir == "2024-06-01"
    assert load_config(C.SampleStageConfig, None, ["batch=2024-06-01"]).batch == "2024-06-01"
    assert load_config(C.ExportStageConfig, None, ["batches=[1, round-2, no]"]).batches == ["1", "round-2", "no"]
    (tmp_path / "c.yaml").write_text("run: {dir: 2024-06-01}\n")
    assert load_config(C.SFTStageConfig, tmp_path / "c.yaml").run.dir == "2024-06-01"


def test_a_home_folder_is_expanded_in_every_path_and_no_text():
    """bash leaves `run.dir=~/x` as typed; preflight and the stages must see one folder, the user's home."""
    home = str(Path("~").expanduser())
    cfg = load_config(C.SampleStageConfig, None, ["run.dir=~/runs/a", "policy=~/sft", "prompts=~/p.jsonl",
                                                  "model.name=~/models/base", "batch=~/b"])
    assert (cfg.run.dir, cfg.policy, cfg.prompts, cfg.model.name) == (
        f"{home}/runs/a", f"{home}/sft", f"{home}/p.jsonl", f"{home}/models/base")
    assert cfg.batch == "~/b"  # a batch's name is text, not a folder
    served = load_config(C.ServeStageConfig, None, ["adapters.x=~/dpo"])
    assert served.adapters == {"x": f"{home}/dpo"}
    prompt = load_config(C.SFTStageConfig, None, ["data.system_prompt=~/not a path"]).data.system_prompt
    assert prompt == "~/not a path"


def test_an_override_of_a_whole_section_keeps_the_files_other_keys(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train: {max_steps: 12, batch_size: 4}\n")
    train = load_config(C.SFTStageConfig, path, ["train={lr: 1e-4}"]).train
    assert (train.max_steps, train.batch_size, train.lr) == (12, 4, 1e-4)


def test_an_override_into_a_section_left_empty_in_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  # max_steps: 12\n")
    assert load_config(C.SFTStageConfig, path, ["train.lr=1e-4"]).train.lr == 1e-4


def test_an_error_quotes_an_override_as_typed():
    with pytest.raises(ConfigError) as err:
        load_config(C.ServeStageConfig, None, ["adapters.dpo-v1.5=runs/x/dpo"])
    assert "_Override" not in str(err.value) and "'runs/x/dpo'" in str(err.value)


def test_an_override_yaml_cannot_read_names_the_key():
    with pytest.raises(ConfigError, match=r"train.lr: '\[oops' is not a value YAML reads .*expected float"):
        load_config(C.SFTStageConfig, None, ["train.lr=[oops"])
    with pytest.raises(ConfigError, match="train.max_steps: expected int, got None"):  # a comment is no number
        load_config(C.SFTStageConfig, None, ["train.max_steps=#3"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(C.SFTStageConfig, None, ["train.lr"])


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("align " in first or "accelerate launch" in first), \
        f"{path} must start with a comment giving its exact command"
    stage = path.stem
    assert stage in CONFIG_FOR, f"no config class known for {path.name}"
    load_config(CONFIG_FOR[stage], path)


def test_shipped_configs_were_found():
    assert any(p.name == "sft.yaml" for p in SHIPPED)


def test_an_attention_kernel_is_checked_before_the_model_loads():
    """A typo reached from_pretrained after the model's download; a flash kernel on a CPU box, its import."""
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attn2' is not allowed; allowed values: "
                                          "eager, sdpa"):
        load_config(C.SFTStageConfig, None, ["model.attn_implementation=flash_attn2"])
    for ok in ("sdpa", "eager", "paged|sdpa", "kernels-community/flash-attn2"):
        assert load_config(C.SFTStageConfig, None, [f"model.attn_implementation={ok}"]).model.attn_implementation == ok
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="flash_attention_2 runs on a GPU only"):
            load_config(C.SFTStageConfig, None, ["model.attn_implementation=flash_attention_2"])


def test_a_flash_attention_without_its_package_is_not_fetched_from_the_hub_unasked(monkeypatch):
    """attn_implementation=flash_attention_2 without flash-attn installed: transformers fetched kernels-community/
    flash-attn2 from the Hub in its place, USE_HUB_KERNELS=NO (align's default) notwithstanding, and offline the
    model's load failed. (CUDA-only: the GPU check is stood in for; the package is absent here.)"""
    import torch
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX

    if FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]():
        pytest.skip("flash-attn is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    for attn in ("flash_attention_2", "paged|flash_attention_2"):
        with pytest.raises(ConfigError, match=r"its package is not installed, and in its place transformers would "
                                              r"fetch kernels-community/flash-attn2 .*USE_HUB_KERNELS=YES"):
            load_config(C.SFTStageConfig, None, [f"model.attn_implementation={attn}"])
    # asked for: the kernel named, or the switch on
    assert load_config(C.SFTStageConfig, None, ["model.attn_implementation=kernels-community/flash-attn2"])
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    assert load_config(C.SFTStageConfig, None, ["model.attn_implementation=flash_attention_2"])


def test_ppo_refuses_gradient_checkpointing_its_loop_does_not_do():
    """It was recorded as on in ppo/align.json while the loop never recomputed anything."""
    with pytest.raises(ConfigError, match="model.gradient_checkpointing=on: align's own PPO loop"):
        load_config(C.PPOStageConfig, None, ["model.gradient_checkpointing=on"])
    assert load_config(C.PPOStageConfig, None, ["algo=grpo", "model.gradient_checkpointing=on"])


def test_an_override_of_a_mapping_of_names_replaces_it(tmp_path):
    """policies={...} is the whole list of policies (a section's override keeps the file's other keys; this is
    no section): merged, eval ran a policy the user had dropped."""
    path = tmp_path / "e.yaml"
    path.write_text("policies: {sft: runs/a/sft, dpo: runs/a/dpo}\n")
    cfg = load_config(C.EvalStageConfig, path, ["policies={sft: runs/b/sft, ppo: runs/b/ppo}"])
    assert cfg.policies == {"sft": "runs/b/sft", "ppo": "runs/b/ppo"}
    path.write_text("eval: {num_prompts: 8, policies: {sft: runs/a/sft, dpo: runs/a/dpo}}\n")
    cfg = load_config(C.PipelineConfig, path, ["eval={policies: {sft: runs/b/sft, ppo: runs/b/ppo}}"])
    assert cfg.eval.policies == {"sft": "runs/b/sft", "ppo": "runs/b/ppo"} and cfg.eval.num_prompts == 8


def test_an_override_changes_only_its_own_section_where_the_file_shares_one_by_an_alias(tmp_path):
    """YAML gives an anchor and its aliases one mapping: dpo.train.lr=5e-5 changed sft's lr too."""
    path = tmp_path / "p.yaml"
    path.write_text("sft: {train: &tr {max_steps: 10, lr: 4.0e-4}}\ndpo: {train: *tr}\n")
    cfg = load_config(C.PipelineConfig, path, ["dpo.train.lr=5e-5"])
    assert (cfg.sft.train.lr, cfg.dpo.train.lr, cfg.dpo.train.max_steps) == (4e-4, 5e-5, 10)
    cfg = load_config(C.PipelineConfig, path, ["sft.train={lr: 1e-4}"])
    assert (cfg.sft.train.lr, cfg.dpo.train.lr) == (1e-4, 4e-4)
    path.write_text("sft: {lora: {target_modules: &m [q_proj, *m]}}\n")  # an alias inside its own anchor
    with pytest.raises(ConfigError, match="p.yaml: an alias refers to the mapping or list it is in"):
        load_config(C.PipelineConfig, path)


def test_a_folder_or_an_unreadable_file_as_the_config_is_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"{tmp_path}: a folder, not a config file"):
        load_config(C.SFTStageConfig, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1.0e-4}\n")

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", unreadable)  # chmod 000 stops no root
    with pytest.raises(ConfigError, match=r"c.yaml: cannot read it \(Permission denied\)"):
        load_config(C.SFTStageConfig, path)


def test_an_override_into_a_mapping_an_earlier_override_gave(tmp_path):
    """`train={lr: 1e-4} train.max_steps=3` was refused ("'train' is a value") while the other order worked."""
    path = tmp_path / "t.yaml"
    path.write_text("train: {batch_size: 4}\n")
    for overrides in (["train={lr: 1e-4}", "train.max_steps=3"], ["train.max_steps=3", "train={lr: 1e-4}"]):
        train = load_config(C.SFTStageConfig, path, overrides).train
        assert (train.lr, train.max_steps, train.batch_size) == (1e-4, 3, 4)
    cfg = load_config(C.PipelineConfig, None, ["sft={train: {lr: 1e-4}}", "sft.train.max_steps=3",
                                               "sft.data.system_prompt=#1 helper"])
    assert (cfg.sft.train.lr, cfg.sft.train.max_steps, cfg.sft.data.system_prompt) == (1e-4, 3, "#1 helper")
    assert load_config(C.EvalStageConfig, None, ["policies={a: x}", "policies.b=2"]).policies == {"a": "x", "b": "2"}
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        load_config(C.SFTStageConfig, None, ["train={lr: 1e-4}", "train.lr.x=3"])


@pytest.mark.parametrize("typed, form, read", [("010", "an octal number", 8), ("0x10", "a hexadecimal number", 16),
                                               ("1:30", "a base-60 number", 90), ("1_000", "a number with underscores",
                                                                                  1000)])
def test_an_integer_not_in_plain_decimal_is_refused_where_a_number_is_meant(tmp_path, typed, form, read):
    """YAML 1.1 reads 010 as 8, 0x10 as 16 and 1:30 as 90: train.max_steps=010 trained 8 steps without a word."""
    message = f"train.max_steps: {typed} is {form} in YAML 1.1, read as {read}; write the number in plain decimal"
    with pytest.raises(ConfigError, match=message):
        load_config(C.SFTStageConfig, None, [f"train.max_steps={typed}"])
    (tmp_path / "c.yaml").write_text(f"train: {{max_steps: {typed}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(C.SFTStageConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=f"train.lr: {typed} is {form}"):
        load_config(C.SFTStageConfig, None, [f"train.lr={typed}"])
    assert load_config(C.SampleStageConfig, None, [f"batch={typed}"]).batch == typed  # text, as typed
    assert load_config(C.ExportStageConfig, None, [f"batches=[{typed}]"]).batches == [typed]


def test_an_integer_in_plain_decimal_is_read_as_ever():
    for typed, read in (("0", 0), ("12", 12), ("+5", 5)):
        assert load_config(C.SFTStageConfig, None, [f"train.seed={typed}"]).train.seed == read
    assert load_config(C.SFTStageConfig, None, ["train.max_steps=-1"]).train.max_steps == -1


@pytest.mark.parametrize("cls, stage", [(C.PPOStageConfig, "align ppo (algo=ppo)"), (C.SampleStageConfig, "align sample"),
                                        (C.EvalStageConfig, "align eval"), (C.ServeStageConfig, "align serve")])
def test_model_max_length_is_refused_where_no_stage_reads_it(cls, stage):
    """PPO, GRPO, RLOO, sample, eval and serve cut no prompt: ppo.yaml's max_length: 384 did nothing."""
    with pytest.raises(ConfigError, match=re.escape(f"model.max_length=384: {stage} does not read it")):
        load_config(cls, None, ["model.max_length=384"])
    assert load_config(cls, None, ["model.max_length=512"])  # the default, as a saved config.yaml has it
    with pytest.raises(ConfigError, match=r"ppo.model.max_length=384: align ppo \(algo=grpo\) does not read it"):
        load_config(C.PipelineConfig, None, ["ppo.algo=grpo", "ppo.model.max_length=384"])
    assert load_config(C.DPOStageConfig, None, ["model.max_length=384"]).model.max_length == 384
