"""Bad inputs to every stage: one named error before any model loads, and nothing written.

Each case goes through `align.cli.main(argv)` and asserts the exit code, that the message
names the key, file and line where there is one, that the files under the test's folders are
exactly what they were before (no stage folder, no run directory, no probe left behind), and
that no model or adapter was loaded during the call (their from_pretrained refuses to run; SFT's
check loads the tokenizer, to render its first examples through the chat template). The good inputs beside them pass the same checks, so the checks refuse what is wrong, not
everything. The table of cases is the one in the issue's report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align import StageError
from align import config as C
from align.artifacts import discard_unfinished
from align.cli import BNB_KERNEL_REPO
from align.cli import main as align
from align.config import load_config
from align.preflight import check_stage

REPO = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "How do I sync my notes?", "input": "", "output": "Open Settings and tap Sync."}
PAIR = {"prompt": "How do I sync?", "chosen": "Open Settings and tap Sync.", "rejected": "No idea."}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def d(tmp_path_factory, tiny_model) -> Path:
    """Every input file and folder the cases point at, good and bad, made once."""
    import tokenizers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("inputs")
    jsonl(d / "good.jsonl", [GOOD] * 12)
    (d / "utf16.yaml").write_text("train:\n  lr: 1.0e-4\n", encoding="utf-16")  # with its byte-order mark
    (d / "dpo_config.yaml").write_text("beta: 0.1\nloss: sigmoid\n")  # align dpo's keys
    jsonl(d / "prompts_alpaca.jsonl", [{"instruction": "How do I sync?"}, {"instruction": "Export", "input": "as PDF"}])
    (d / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" +  # "café" in Latin-1: byte 0xe9
                                     json.dumps({**GOOD, "output": "Merci, caf\u00e9"}, ensure_ascii=False)
                                     .encode("latin-1") + b"\n")
    (d / "utf16.jsonl").write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))  # Windows' "Unicode", with its BOM
    (d / "empty.jsonl").write_text("")
    jsonl(d / "array.jsonl", ["[1, 2]", GOOD])
    jsonl(d / "null.jsonl", [GOOD, "null"])
    jsonl(d / "missing.jsonl", [GOOD, {"instruction": "q", "input": ""}])
    jsonl(d / "blank_output.jsonl", [GOOD, GOOD, {"instruction": "q", "output": "  "}])
    jsonl(d / "unknown_format.jsonl", [{"question": "q", "answer": "a"}])
    jsonl(d / "bad_json.jsonl", [GOOD, '{"instruction": "q", "output": "a"'])
    (d / "pretty.json").write_text(json.dumps(GOOD, indent=2))
    (d / "data.csv").write_text("instruction,output\nq,a\n")
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "not_a_dataset").mkdir()
    jsonl(d / "not_a_dataset" / "train.jsonl", [GOOD])
    Dataset.from_dict({}).save_to_disk(str(d / "empty_dataset"))
    jsonl(d / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(12)])
    jsonl(d / "prompts3.jsonl", [{"prompt": f"Question {i}?"} for i in range(3)])
    jsonl(d / "prompts_twice.jsonl", [{"prompt": f"Question {i % 10}?"} for i in range(12)])  # 10 distinct
    jsonl(d / "prompt_number.jsonl", [{"prompt": "ok?"}, {"prompt": 5}])
    jsonl(d / "prefs.jsonl", [{**PAIR, "prompt": f"Question {i}?"} for i in range(8)])
    jsonl(d / "prefs_system.jsonl", [{**PAIR, "prompt": f"Question {i}?", **({"system": "Be brief."} if i == 3 else {})}
                                     for i in range(8)])
    (d / "prefs_latin1.jsonl").write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    jsonl(d / "prefs_no_rejected.jsonl", [PAIR, {"prompt": "q", "chosen": "a"}])
    jsonl(d / "prefs_same.jsonl", [PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    (d / "a_file").write_text("not a folder")
    (d / "no_config").mkdir()
    (d / "no_config" / "README.md").write_text("a folder, not a model")
    shutil.copytree(tiny_model, d / "truncated_model")
    truncate(d / "truncated_model" / "model.safetensors")

    # A real LoRA adapter on the tiny model, as align writes one (weights, tokenizer, align.json).
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(d / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(d / "adapter")
    (d / "adapter" / "align.json").write_text(json.dumps({"stage": "sft", "base_model": tiny_model}))
    truncate(copy_adapter(d / "adapter", d / "adapter_truncated") / "adapter_model.safetensors")
    (copy_adapter(d / "adapter", d / "adapter_unfinished") / "align.json").unlink()
    (d / "adapter_unfinished" / "config.yaml").write_text("run: {}\n")
    # A run whose export was cut short: its preferences/ folder lacks the align.json export writes last.
    copy_adapter(d / "adapter", d / "run_cut" / "sft")
    (d / "run_cut" / "preferences").mkdir()
    (d / "run_cut" / "preferences" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    copy_adapter(d / "adapter", d / "adapter_no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / "adapter_no_tokenizer" / f).unlink()
    (copy_adapter(d / "adapter", d / "adapter_lost_base") / "align.json").write_text(
        json.dumps({"stage": "sft", "base_model": str(d / "deleted-base")}))
    copy_adapter(d / "adapter", d / "run_with_sft" / "sft")
    # An adapter of each kind by its align.json (a reward model's, without heads) or, from elsewhere, by its task type
    (copy_adapter(d / "adapter", d / "rm_adapter") / "align.json").write_text(
        json.dumps({"stage": "reward", "base_model": tiny_model}))
    copy_adapter(d / "adapter", d / "run_policy_as_reward" / "reward")
    for name, task in (("foreign_cls", "SEQ_CLS"), ("foreign_lm", "CAUSAL_LM")):
        (copy_adapter(d / "adapter", d / name) / "align.json").unlink()
        config = json.loads((d / name / "adapter_config.json").read_text())
        (d / name / "adapter_config.json").write_text(json.dumps({**config, "task_type": task}))
    (d / "run_empty_sft" / "sft").mkdir(parents=True)  # what a stage killed at once leaves
    (d / "run_killed_sft" / "sft" / "checkpoints" / "checkpoint-10").mkdir(parents=True)  # killed mid-training
    (d / "checkpoint_without_state").mkdir()
    (d / "checkpoint_without_state" / "adapter_config.json").write_text("{}")
    # A user's own model whose chat template refuses the system role (Gemma's does), and one whose tokenizer has
    # neither a template nor an EOS, with data that opens with a system turn (at once, and only on line 3).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    shutil.copytree(tiny_model, d / "model_no_system")
    tokenizer.save_pretrained(d / "model_no_system")
    shutil.copytree(tiny_model, d / "model_no_eos")
    for f in [*(d / "model_no_eos").glob("*token*"), *(d / "model_no_eos").glob("chat_template*")]:
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"[UNK]": 0, "sync": 1}, unk_token="[UNK]"))).save_pretrained(d / "model_no_eos")
    # GPT-2 with a table of 32 learned positions: a longer sequence has none to embed
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2)
                    ).save_pretrained(d / "gpt2_32_positions")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(d / "gpt2_32_positions")
    jsonl(d / "long_prompts.jsonl", [{"prompt": "How do I sync?"}, {"prompt": "How do I sync my notes? " * 4}])
    jsonl(d / "system.jsonl", [{**GOOD, "system": "You are the support desk."}] * 2)
    jsonl(d / "system_later.jsonl", [GOOD, GOOD, {**GOOD, "system": "You are the support desk."}])
    return d


# (id, argv after the stage, exit code, what the message must name). {run} is a run directory
# that does not exist yet; {tmp} the test's folder; {d} the inputs above; {tiny} the tiny model.
M = "model.name={tiny}"
# A pipeline whose every stage's own inputs pass, for the cases that need the whole pipeline checked
PIPE = "sft.model.name={tiny} sft.data.path={d}/good.jsonl sample.prompts={d}/prompts.jsonl eval.prompts={d}/prompts.jsonl"
CASES = [
    # --- numbers: every key's range, named with what is allowed
    ("lr<0", "sft train.lr=-1", 2, ["train.lr: must be in (0, 1], got -1.0"]),
    ("lr=0", "sft train.lr=0", 2, ["train.lr: must be in (0, 1], got 0.0"]),
    ("lr=1e3", "sft train.lr=1e3", 2, ["train.lr: must be in (0, 1], got 1000.0"]),
    ("lr=text", "sft train.lr=fast", 2, ["train.lr: expected float, got 'fast'"]),
    ("lr=nan", "sft train.lr=.nan", 2, ["train.lr: expected a finite number, got nan"]),
    ("batch_size=0", "sft train.batch_size=0", 2, ["train.batch_size: must be >= 1, got 0"]),
    ("batch_size<0", "dpo train.batch_size=-8", 2, ["train.batch_size: must be >= 1, got -8"]),
    ("batch_size=2.5", "reward train.batch_size=2.5", 2, ["train.batch_size: expected int, got 2.5"]),
    ("grad_accum=0", "sft train.grad_accum=0", 2, ["train.grad_accum: must be >= 1, got 0"]),
    ("epochs=0", "sft train.epochs=0", 2, ["train.epochs: must be > 0, got 0.0"]),
    ("max_steps=0", "sft train.max_steps=0", 2, ["train.max_steps: must be -1 or >= 1, got 0"]),
    ("warmup_ratio=1.5", "dpo train.warmup_ratio=1.5", 2, ["train.warmup_ratio: must be in [0, 1), got 1.5"]),
    ("seed<0", "sft train.seed=-1", 2, ["train.seed: must be in [0, 4294967296), got -1"]),
    ("eval_steps=0", "sft train.eval_steps=0", 2, ["train.eval_steps: must be >= 1, got 0"]),
    ("eval_fraction=1", "sft data.eval_fraction=1", 2, ["data.eval_fraction: must be in [0, 1), got 1.0"]),
    ("test_fraction<0", "reward data.test_fraction=-0.1", 2, ["data.test_fraction: must be in [0, 1), got -0.1"]),
    ("export test_fraction=1", "export test_fraction=1", 2, ["test_fraction: must be in [0, 1), got 1.0"]),
    ("min_agreement>1", "export min_agreement=1.5", 2, ["min_agreement: must be in [0, 1], got 1.5"]),
    ("lora.r=0", "sft lora.r=0", 2, ["lora.r: must be >= 1, got 0"]),
    ("lora.alpha=0", "sft lora.alpha=0", 2, ["lora.alpha: must be >= 1, got 0"]),
    ("lora.dropout=1", "sft lora.dropout=1", 2, ["lora.dropout: must be in [0, 1), got 1.0"]),
    ("max_length=0", "dpo model.max_length=0", 2, ["model.max_length: must be >= 1, got 0"]),
    ("k=1", "sample k=1", 2, ["k: must be in [2, 8], got 1"]),
    ("num_prompts=0", "sample num_prompts=0", 2, ["num_prompts: must be -1 or >= 1, got 0"]),
    ("max_new_tokens=0", "eval generation.max_new_tokens=0", 2, ["generation.max_new_tokens: must be >= 1, got 0"]),
    ("temperature<0", "eval generation.temperature=-0.5", 2, ["generation.temperature: must be >= 0, got -0.5"]),
    ("top_p=0", "sample generation.top_p=0", 2, ["generation.top_p: must be in (0, 1], got 0.0"]),
    ("sample greedy", "sample generation.temperature=0", 2, ["generation.temperature=0 is greedy decoding", "k=4"]),
    ("beta=0", "dpo beta=0", 2, ["beta: must be > 0, got 0.0"]),
    ("label_smoothing=0.7", "dpo loss=robust label_smoothing=0.7", 2, ["label_smoothing: must be in [0, 0.5), got 0.7"]),
    ("rl sizes do not divide", "ppo rl.rollout_prompts=6 rl.minibatch_size=4", 2,
     ["rl.rollout_prompts=6 must be a multiple of rl.minibatch_size=4"]),
    ("rl.gamma>1", "ppo rl.gamma=1.5", 2, ["rl.gamma: must be in [0, 1], got 1.5"]),
    ("grpo group of 1", "ppo algo=grpo rl.num_generations=1", 2, ["rl.num_generations: must be >= 2, got 1"]),
    ("ppo max_steps=-1", "ppo train.max_steps=-1", 2, ["train.max_steps: PPO counts steps"]),
    ("scorer and reward_model", "ppo scorer=length reward_model={d}/adapter", 2, ["the reward is one or the other"]),
    ("bootstrap=0", "eval bootstrap=0", 2, ["bootstrap: must be >= 1, got 0"]),
    ("rounds=0", "pipeline rounds=0", 2, ["rounds: must be >= 1, got 0"]),
    ("unknown stage", "pipeline stages=[sft,tune]", 2, ["stages[1]: 'tune' is not a pipeline stage; allowed values: sft, sample"]),
    ("rounds without a policy stage", "pipeline rounds=2 stages=[sft,sample,label,export,reward,eval]", 2,
     ["rounds=2", "stages must include dpo or ppo"]),
    ("empty string", "sft \"data.path=''\"", 2, ["data.path: empty"]),
    ("merge dtype", "merge dtype=int8", 2, ["dtype: 'int8' is not allowed; allowed values: float32, bfloat16, float16"]),
    # --- data: file and line named
    ("latin-1 sft data", f"sft {M} data.path={{d}}/latin1.jsonl", 2,
     ["data.path: ", "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at byte 78 of the line)", "iconv -f latin1"]),
    ("utf-16 sft data", f"sft {M} data.path={{d}}/utf16.jsonl", 2,
     ["utf16.jsonl:1: not UTF-8 text", "iconv -f utf-16 -t utf-8"]),
    ("latin-1 dpo data", "dpo sft={d}/adapter data.path={d}/prefs_latin1.jsonl", 2,
     ["prefs_latin1.jsonl:2: not UTF-8 text (byte 0xe9"]),
    ("missing data file", f"sft {M} data.path={{d}}/nope.jsonl", 2, ["data.path: ", "nope.jsonl: no such file or folder"]),
    ("empty data file", f"sft {M} data.path={{d}}/empty.jsonl", 2, ["empty.jsonl: no examples in it (empty)"]),
    ("array per line", f"sft {M} data.path={{d}}/array.jsonl", 2, ["array.jsonl:1: expected a JSON object, got array"]),
    ("null line", f"sft {M} data.path={{d}}/null.jsonl", 2, ["null.jsonl:2: expected a JSON object, got null"]),
    ("missing column", f"sft {M} data.path={{d}}/missing.jsonl", 2, ["missing.jsonl:2: missing field 'output'"]),
    ("blank completion", f"sft {M} data.path={{d}}/blank_output.jsonl", 2, ["blank_output.jsonl:3: field 'output' is empty"]),
    ("not JSON", f"sft {M} data.path={{d}}/bad_json.jsonl", 2, ["bad_json.jsonl:2: not JSON"]),
    ("unknown format", f"sft {M} data.path={{d}}/unknown_format.jsonl", 2,
     ["unknown_format.jsonl:1: cannot tell the format", "answer, question"]),
    ("pretty-printed .json object", f"sft {M} data.path={{d}}/pretty.json", 2, ["one JSON object over several lines"]),
    ("csv", f"sft {M} data.path={{d}}/data.csv", 2, ["data.csv: unsupported file type '.csv'"]),
    ("corrupt parquet", f"sft {M} data.path={{d}}/broken.parquet", 2, ["broken.parquet: not a readable parquet file"]),
    ("folder, not a dataset", f"sft {M} data.path={{d}}/not_a_dataset", 2,
     ["not_a_dataset: a folder, but not a dataset saved with datasets' save_to_disk", "pass one of those files"]),
    ("empty save_to_disk", f"sft {M} data.path={{d}}/empty_dataset", 2, ["empty_dataset: an empty dataset (saved with no rows)"]),
    ("pair without rejected", "dpo sft={d}/adapter data.path={d}/prefs_no_rejected.jsonl", 2,
     ["prefs_no_rejected.jsonl:2: missing field 'rejected'"]),
    ("chosen == rejected", "reward from_sft=false model.name={tiny} data.path={d}/prefs_same.jsonl", 2,
     ["prefs_same.jsonl:2: chosen and rejected are identical"]),
    ("prompt not a string", "sample policy={d}/adapter prompts={d}/prompt_number.jsonl", 2,
     ["prompts: ", "prompt_number.jsonl:2: field 'prompt' must be a string or a list of messages, got number"]),
    ("rollout > prompts", "ppo sft={d}/adapter scorer=length prompts={d}/prompts3.jsonl", 2,
     ["rl.rollout_prompts=8: a rollout takes that many different prompts", "prompts3.jsonl gives 3"]),
    # --- models, adapters, checkpoints, folders
    ("model.name a missing folder", "sft model.name={d}/no/such/model data.path={d}/good.jsonl", 2,
     ["model.name=", "no/such/model: no such folder"]),
    ("model.name offline Hub id", "sft model.name=someone/some-model data.path={d}/good.jsonl", 2,
     ["model.name=someone/some-model: not an embedded model name", "the Hugging Face Hub is unreachable (offline)",
      "local model folder was expected"]),
    ("chat template refuses a system turn", "sft model.name={d}/model_no_system data.path={d}/system.jsonl", 2,
     ["data.path: {d}/system.jsonl:1: the chat template of model.name={d}/model_no_system refuses this example's "
      "conversation (System role not supported); drop its system turn, or use a model whose chat template takes"]),
    ("... on a later record", "sft model.name={d}/model_no_system data.path={d}/system_later.jsonl", 2,
     ["data.path: {d}/system_later.jsonl:3: the chat template of model.name={d}/model_no_system refuses"]),
    ("... or data.system_prompt", "sft model.name={d}/model_no_system data.path={d}/good.jsonl "
     "'data.system_prompt=Be brief.'", 2,
     ["data.system_prompt: the chat template of model.name={d}/model_no_system refuses a conversation opening with "
      "it (System role not supported, on {d}/good.jsonl:1); unset data.system_prompt"]),
    ("... a preference pair's", "reward from_sft=false model.name={d}/model_no_system data.path={d}/prefs_system.jsonl",
     2, ["data.path: the chat template of {d}/model_no_system refuses its first pair with a system turn of its own "
         "(System role not supported; prompt 'Question 3?'); drop the system turns"]),
    ("tokenizer without template or EOS", "sft model.name={d}/model_no_eos data.path={d}/good.jsonl", 2,
     ["model.name={d}/model_no_eos: its tokenizer has no chat template and no EOS token"]),
    ("max_length past GPT-2's positions", "sft model.name={d}/gpt2_32_positions data.path={d}/good.jsonl", 2,
     ["model.max_length=512: {d}/gpt2_32_positions has positions for 32 tokens (n_positions in its config.json",
      "set model.max_length=32 or less"]),
    ("max_new_tokens past them", "sample policy={d}/gpt2_32_positions prompts={d}/prompts.jsonl", 2,
     ["generation.max_new_tokens=96: {d}/gpt2_32_positions has positions for 32 tokens"]),
    ("a prompt and its answer past them", "sample policy={d}/gpt2_32_positions prompts={d}/long_prompts.jsonl "
     "generation.max_new_tokens=8", 2,
     ["generation.max_new_tokens=8: 1 of the 2 prompts of {d}/long_prompts.jsonl leave fewer than 8 of the 32 "
      "positions of {d}/gpt2_32_positions for the answer", "the longest prompt is", "shorten or drop those prompts"]),
    ("model.name not a model folder", "sft model.name={d}/no_config data.path={d}/good.jsonl", 2,
     ["no_config: no config.json: not a transformers model folder"]),
    ("model.name truncated weights", "sft model.name={d}/truncated_model data.path={d}/good.jsonl", 2,
     ["truncated_model/model.safetensors is not a readable safetensors file", "truncated"]),
    ("lora target typo", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=[q_proj,q_porj]", 2,
     ["lora.target_modules: q_porj not among the modules of", "its linear layers are", "q_proj"]),
    # On the command line a lone name is a YAML string, which peft reads as a regex over whole names.
    ("lora target a string", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=bogus_proj", 2,
     ["lora.target_modules: 'bogus_proj' (a regex: whole names) not among the modules of", "q_proj"]),
    ("... one of them top-level", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=lm_head,q_proj", 2,
     ["for the modules named lm_head, q_proj, give a list: lora.target_modules=[lm_head,q_proj]"]),
    ("lora targets as a string of names", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=q_proj,v_proj", 2,
     ["lora.target_modules: a string is a regex peft matches against whole module names (such as "
      "model.layers.0.self_attn.q_proj), and 'q_proj,v_proj' matches none; for the modules named q_proj, v_proj, "
      "give a list: lora.target_modules=[q_proj,v_proj]"]),
    ("lora targets empty", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=[]", 2,
     ["lora.target_modules: empty, so LoRA would adapt nothing"]),
    ("config not UTF-8", f"sft --config {{d}}/latin1.jsonl {M}", 2, ["latin1.jsonl: not UTF-8 text (byte"]),
    ("config in UTF-16", f"sft --config {{d}}/utf16.yaml {M}", 2,
     ["utf16.yaml: not UTF-8 text (byte 0: it is UTF-16, by its byte-order mark)", "iconv -f utf-16 -t utf-8"]),
    ("another command's config", f"sft --config {{d}}/dpo_config.yaml {M}", 2,
     ["unknown key 'beta'", "dpo_config.yaml is a config of align dpo: give align sft its own)"]),
    ("--config= and no file", f"sft --config= {M}", 2, ["align: --config needs a file"]),
    ("a flow mapping's key without a space", "eval 'policies={{sft:{d}/adapter}}' prompts={d}/prompts.jsonl", 2,
     ["policies: 'sft:{d}/adapter' is read as one key with no value: in YAML a key needs a space after its colon "
      "({{sft: {d}/adapter}}, not {{sft:{d}/adapter}})"]),
    ("... a section's", f"sft {M} data.path={{d}}/good.jsonl 'train={{{{lr:1e-4}}}}'", 2,
     ["train: 'lr:1e-4' is read as one key with no value"]),
    ("a null where text is wanted", f"sft {M} data.path={{d}}/good.jsonl model.name=~", 2,
     ["model.name: expected str, got None (NoneType); YAML reads ~, null and a key with nothing after it as null"]),
    ("a LoRA target LoRA cannot adapt", f"sft {M} data.path={{d}}/good.jsonl lora.target_modules=[norm]", 2,
     ["lora.target_modules: model.norm is a LlamaRMSNorm, which LoRA cannot adapt", "q_proj"]),
    ("flex attention trained on a CPU", f"sft {M} data.path={{d}}/good.jsonl model.attn_implementation=flex_attention",
     2, ["model.attn_implementation=flex_attention trains on a GPU only"]),
    ("model.name an adapter", "sft model.name={d}/adapter data.path={d}/good.jsonl", 2, ["it is a LoRA adapter folder"]),
    ("truncated adapter to dpo", "dpo sft={d}/adapter_truncated data.path={d}/prefs.jsonl", 2,
     ["sft: ", "adapter_truncated/adapter_model.safetensors is not a readable safetensors file"]),
    ("truncated adapter to merge", "merge adapter={d}/adapter_truncated", 2,
     ["adapter: ", "adapter_truncated/adapter_model.safetensors is not a readable safetensors file"]),
    ("truncated adapter to reward", "reward sft={d}/adapter_truncated data.path={d}/prefs.jsonl", 2,
     ["adapter_truncated/adapter_model.safetensors is not a readable"]),
    ("unfinished stage folder", "dpo sft={d}/adapter_unfinished data.path={d}/prefs.jsonl", 2,
     ["sft=", "adapter_unfinished: an unfinished stage folder (no align.json"]),
    # sample said "no config.json: not a transformers model folder" of it, as if a model folder were asked for
    ("killed sft folder to sample", "sample run.dir={d}/run_killed_sft prompts={d}/prompts.jsonl", 2,
     ["run_killed_sft/sft: an unfinished stage folder (no align.json", "train.resume_from_checkpoint=latest"]),
    ("empty sft folder", "dpo run.dir={d}/run_empty_sft data.path={d}/prefs.jsonl", 2,
     ["sft (default {d}/run_empty_sft/sft)={d}/run_empty_sft/sft: an empty folder"]),
    ("killed sft folder", "reward run.dir={d}/run_killed_sft data.path={d}/prefs.jsonl", 2,
     ["run_killed_sft/sft: an unfinished stage folder (no align.json", "train.resume_from_checkpoint=latest"]),
    ("adapter without tokenizer", "merge adapter={d}/adapter_no_tokenizer", 2, ["adapter_no_tokenizer: no tokenizer in it"]),
    ("adapter on a deleted base", "dpo sft={d}/adapter_lost_base data.path={d}/prefs.jsonl", 2,
     ["sft: its base model=", "deleted-base: no such folder"]),
    ("sft= a model folder", "ppo sft={tiny} scorer=length prompts={d}/prompts.jsonl", 2,
     ["not an adapter folder (no adapter_config.json): it is a full model folder"]),
    ("policy a missing path", "sample policy=./no/such/policy prompts={d}/prompts.jsonl", 2,
     ["policy=./no/such/policy: no such folder"]),
    ("eval policy missing", "eval 'policies={{sft: {d}/adapter, dpo: {d}/gone}}' prompts={d}/prompts.jsonl", 2,
     ["policies.dpo=", "gone: no such folder"]),
    ("reward_model missing", "ppo sft={d}/adapter reward_model={d}/gone prompts={d}/prompts.jsonl", 2,
     ["reward_model=", "gone: no such folder"]),
    ("resume from a missing path", f"sft {M} data.path={{d}}/good.jsonl train.resume_from_checkpoint={{d}}/ckpt", 2,
     ["train.resume_from_checkpoint=", "ckpt: no such checkpoint folder", "or latest"]),
    ("resume from a non-checkpoint", "dpo sft={d}/adapter data.path={d}/prefs.jsonl "
     "train.resume_from_checkpoint={d}/checkpoint_without_state", 2, ["not a trainer checkpoint (no trainer_state.json)"]),
    ("ppo resume without its state", "ppo sft={d}/adapter scorer=length prompts={d}/prompts.jsonl "
     "train.resume_from_checkpoint={d}/checkpoint_without_state", 2,
     ["not a PPO checkpoint (no trainer_state.json, state.pt, value_head.safetensors, adapter_model.safetensors)"]),
    ("run.dir a file", f"sft {M} data.path={{d}}/good.jsonl run.dir={{d}}/a_file", 2, ["run.dir=", "a_file: a file, not a folder"]),
    ("run.dir under a file", f"sft {M} data.path={{d}}/good.jsonl run.dir={{d}}/a_file/run", 2,
     ["a_file is a file, so the folder cannot be made"]),
    ("merge output a file", "merge adapter={d}/adapter output={d}/a_file", 2, ["output=", "a_file: a file, not a folder"]),
    ("sample: a model.name its policy does not run on", "sample policy={d}/adapter prompts={d}/prompts.jsonl "
     "model.name=no/such-model-typo", 2, ["model.name=no/such-model-typo: this stage runs on", "leave model.name unset"]),
    ("dpo: a model.name its SFT does not run on", "dpo sft={d}/adapter data.path={d}/prefs.jsonl model.name=other/model",
     2, ["model.name=other/model: this stage runs on", "DPO trains the SFT adapter"]),
    ("eval: a model.name its policies do not run on", "eval 'policies={{sft: {d}/adapter, b: {d}/adapter}}' "
     "prompts={d}/prompts.jsonl model.name=other/model", 2, ["model.name=other/model: this stage runs on"]),
    ("eval: a baseline typo", "eval baseline=sfft prompts={d}/prompts.jsonl", 2,
     ["baseline: 'sfft' is not a policy stage; allowed values: sft, dpo"]),
    ("eval: a baseline not among the policies", "eval 'policies={{a: {d}/adapter, b: {d}/adapter}}' "
     "prompts={d}/prompts.jsonl", 2, ["baseline: 'sft' is not among the policies; allowed values: a, b"]),
    ("sample: acquisition without uncertainty", "sample policy={d}/adapter prompts={d}/prompts.jsonl "
     "acquisition=variance", 2, ["acquisition=variance is read by selection=uncertainty only"]),
    ("merge output onto an artifact", "merge adapter={d}/adapter output={d}/adapter", 2,
     ["output=", "adapter: the folder holds", "give a new or empty folder"]),
    ("no SFT in run.dir", "dpo data.path={d}/prefs.jsonl", 1, ["no SFT adapter at", "run `align sft run.dir="]),
    ("export without a store", "export store=sqlite:///{tmp}/labels.db", 1, ["no labelling store at", "align sample"]),
    ("unsupported store URL", "sample policy={d}/adapter prompts={d}/prompts.jsonl store=mysql://host/db", 2,
     ["store=mysql://host/db: not a database URL align supports"]),
    ("in-memory store", "sample policy={d}/adapter prompts={d}/prompts.jsonl store=sqlite:///", 2,
     ["store=sqlite:///: an in-memory database is gone when the command exits"]),
    ("store not a database", "export store=sqlite:///{d}/good.jsonl", 1,
     ["cannot open the labelling store", "good.jsonl: file is not a database (not an SQLite database, or a damaged one)"]),
    ("unknown scorer", "eval 'policies={{sft: {d}/adapter, b: {d}/adapter}}' prompts={d}/prompts.jsonl scorer=nope", 2,
     ["scorer 'nope': not a built-in"]),
    ("eval with no judge", "eval 'policies={{sft: {d}/adapter, b: {d}/adapter}}' prompts={d}/prompts.jsonl "
     "reward_model=none", 2, ["no judge for eval: reward_model=none and no scorer; pass scorer=support_style"]),
    ("pipeline: people label, no stage trains a judge for eval", "pipeline stages=[sft,dpo,eval] label=human "
     f"{PIPE} dpo.data.path={{d}}/prefs.jsonl", 2,
     ["no judge for eval: reward_model=none and no scorer; pass eval.scorer=support_style", "or eval.human=true"]),
    ("pipeline: bad data of a later stage", "pipeline sft.model.name={tiny} sft.data.path={d}/good.jsonl "
     "sample.prompts={d}/prompt_number.jsonl", 2, ["sample.prompts: ", "prompt_number.jsonl:2"]),
    ("pipeline: latin-1 sft data", "pipeline sft.model.name={tiny} sft.data.path={d}/latin1.jsonl", 2,
     ["sft.data.path: ", "latin1.jsonl:2: not UTF-8"]),
    ("reward on a cut-short export", "reward run.dir={d}/run_cut", 1,
     ["run_cut/preferences: an unfinished export (no align.json, which export writes last)"]),
    ("ppo: an sft folder as the reward model", "ppo sft={d}/adapter reward_model={d}/adapter prompts={d}/prompts.jsonl",
     2, ["reward_model={d}/adapter: the output of `align sft` (a policy), not a reward model; pass the folder "
         "`align reward` wrote"]),
    # eval loaded a policy as its judge (an AttributeError after every answer and the KL), a reward model as a policy
    ("eval: a policy as the reward model", "eval 'policies={{sft: {d}/adapter, b: {d}/adapter}}' "
     "prompts={d}/prompts.jsonl reward_model={d}/adapter", 2,
     ["reward_model={d}/adapter: the output of `align sft` (a policy), not a reward model; pass the folder "
      "`align reward` wrote"]),
    ("eval: run.dir's reward/ a policy", "eval 'policies={{sft: {d}/adapter, b: {d}/adapter}}' "
     "prompts={d}/prompts.jsonl run.dir={d}/run_policy_as_reward", 2,
     ["reward_model (default {d}/run_policy_as_reward/reward)={d}/run_policy_as_reward/reward: the output of "
      "`align sft` (a policy), not a reward model"]),
    ("eval: a reward model as a policy", "eval 'policies={{sft: {d}/adapter, rm: {d}/rm_adapter}}' "
     "prompts={d}/prompts.jsonl scorer=length", 2,
     ["policies.rm={d}/rm_adapter: the output of `align reward` (a reward model), not a policy; pass a policy "
      "adapter (the folder `align sft / dpo / ppo / grpo / rloo` wrote)"]),
    ("eval: a classifier's adapter from elsewhere as a policy", "eval 'policies={{sft: {d}/adapter, "
     "rm: {d}/foreign_cls}}' prompts={d}/prompts.jsonl scorer=length", 2,
     ["policies.rm={d}/foreign_cls: its adapter_config.json says task_type SEQ_CLS, and a policy is a CAUSAL_LM "
      "adapter"]),
    ("eval: a causal LM's adapter from elsewhere as the reward model", "eval 'policies={{sft: {d}/adapter, "
     "b: {d}/foreign_lm}}' prompts={d}/prompts.jsonl reward_model={d}/foreign_lm", 2,
     ["reward_model={d}/foreign_lm: its adapter_config.json says task_type CAUSAL_LM, and a reward model is a "
      "SEQ_CLS adapter"]),
    ("pipeline: dpo without sft", "pipeline stages=[dpo] dpo.data.path={d}/prefs.jsonl", 1, ["no SFT adapter at"]),
    ("pipeline: eval with nothing to compare", "pipeline stages=[sft,sample,eval]", 2,
     ["eval compares the SFT policy with one trained after it", "add dpo or ppo to stages, or set eval.policies="]),
    ("pipeline: dpo with no preference data", "pipeline stages=[sft,dpo] run.dir={d}/empty_run", 1,
     ["no preference data at", "or pass dpo.data.path=<folder or .jsonl>"]),
    ("pipeline: export with nothing ranked", "pipeline stages=[sft,sample,export] sft.model.name={tiny} "
     "sft.data.path={d}/good.jsonl sample.prompts={d}/prompts.jsonl", 2,
     ["stages: export needs submitted rankings, the store has none, and no label stage runs before it (sample, sft "
      "do not rank); add label to stages"]),
    ("pipeline: human labels without an account", "pipeline label=human sft.model.name={tiny} "
     "sft.data.path={d}/good.jsonl sample.prompts={d}/prompts.jsonl", 2,
     ["label=human: the labelling store has no accounts to sign in with", "users add NAME --admin"]),
    ("more responses than the app shows", "sample policy={d}/adapter prompts={d}/prompts.jsonl k=9", 2,
     ["k: must be in [2, 8], got 9"]),
    # --- active selection (docs/active.md)
    ("pool_factor<1", "sample pool_factor=0.5", 2, ["pool_factor: must be >= 1, got 0.5"]),
    ("pool_factor with every prompt", "sample pool_factor=2", 2, ["pool_factor=2.0", "num_prompts=-1", "give num_prompts"]),
    ("explore without uncertainty", "sample num_prompts=4 explore=0.25", 2, ["explore=0.25 applies to selection=uncertainty"]),
    ("reward model for random selection", "sample selection_reward_model={d}/adapter", 2,
     ["selection_reward_model is read by selection=uncertainty only"]),
    ("reward heads=1", "reward heads=1", 2, ["heads: must be 0 or >= 2, got 1"]),
    ("uncertainty without a reward model", "sample policy={d}/adapter prompts={d}/prompts.jsonl selection=uncertainty", 1,
     ["selection=uncertainty picks the tasks a reward model is least sure of", "{run}/reward", "heads=8",
      "selection_reward_model=", "selection=random"]),
    ("uncertainty by a model without heads", "sample policy={d}/adapter prompts={d}/prompts.jsonl "
     "selection=uncertainty selection_reward_model={d}/rm_adapter", 2,
     ["selection_reward_model={d}/rm_adapter: no reward_heads.safetensors in it", "align reward run.dir={d} heads=8`, "
      "which writes {d}/reward: point selection_reward_model there"]),
    # a reward model's LoRA where a policy goes: dpo/reward/ppo started from it, sample generated with it
    ("dpo: a reward model as its sft", "dpo sft={d}/rm_adapter data.path={d}/prefs.jsonl", 2,
     ["sft={d}/rm_adapter: the output of `align reward` (a reward model), not a policy"]),
    ("reward: a classifier's adapter as its sft", "reward sft={d}/foreign_cls data.path={d}/prefs.jsonl", 2,
     ["sft={d}/foreign_cls: its adapter_config.json says task_type SEQ_CLS, and a policy is a CAUSAL_LM adapter"]),
    ("sample: a reward model as the policy", "sample policy={d}/rm_adapter prompts={d}/prompts.jsonl", 2,
     ["policy={d}/rm_adapter: the output of `align reward` (a reward model), not a policy"]),
    ("merge: a reward model", "merge adapter={d}/rm_adapter output={d}/rm_merged", 2,
     ["adapter={d}/rm_adapter: the output of `align reward` (a reward model), not a policy"]),
    ("merge: a classifier's adapter", "merge adapter={d}/foreign_cls output={d}/cls_merged", 2,
     ["adapter={d}/foreign_cls: its adapter_config.json says task_type SEQ_CLS, and a policy is a CAUSAL_LM adapter"]),
    ("uncertainty by a policy", "sample policy={d}/adapter prompts={d}/prompts.jsonl "
     "selection=uncertainty selection_reward_model={d}/adapter", 2,
     ["selection_reward_model={d}/adapter: the output of `align sft` (a policy), not a reward model"]),
    ("uncertainty by a missing model", "sample policy={d}/adapter prompts={d}/prompts.jsonl "
     "selection=uncertainty selection_reward_model={d}/gone", 2, ["selection_reward_model=", "gone: no such folder"]),
    ("pipeline: uncertainty in one round", "pipeline sample.selection=uncertainty", 2,
     ["sample.selection=uncertainty", "round 0 has none", "rounds >= 2"]),
    ("pipeline: uncertainty without reward", "pipeline rounds=2 stages=[sft,sample,label,export,dpo] "
     "sample.selection=uncertainty", 2, ["stages must include reward"]),
    # --- what a later round needs: refused before round 0 trains, not when round 1 gets to it
    ("pipeline: every prompt with rounds", "pipeline rounds=3 "
     f"{PIPE} "
     "sample.num_prompts=-1", 2, ["sample.num_prompts=-1 (every prompt) with rounds=3: round 0 takes all 12 prompts",
                                  "set sample.num_prompts=N (at most 4 for 3 rounds)"]),
    ("pipeline: too few prompts for the rounds", "pipeline rounds=3 "
     f"{PIPE} "
     "sample.num_prompts=5", 2, ["sample.prompts={d}/prompts.jsonl: 12 distinct prompts, and rounds=3 need 15",
                                 "lower sample.num_prompts (to 4 or fewer) or rounds"]),
    ("pipeline: a prompt given twice is one prompt for the rounds", "pipeline rounds=2 sft.model.name={tiny} "
     "sft.data.path={d}/good.jsonl sample.prompts={d}/prompts_twice.jsonl eval.prompts={d}/prompts.jsonl "
     "sample.num_prompts=6", 2, ["sample.prompts={d}/prompts_twice.jsonl: 10 distinct prompts, and rounds=2 need 12",
                                 "(to 5 or fewer)"]),
    ("pipeline: too few prompts for uncertainty-picked rounds", "pipeline rounds=3 "
     f"{PIPE} "
     "sample.num_prompts=5 sample.selection=uncertainty sample.pool_factor=2 stages=[sft,sample,label,export,reward,dpo]",
     2, ["12 distinct prompts, and rounds=3 need 15", "(to 4 or fewer)"]),
    ("pipeline: ppo in later rounds without a reward model", "pipeline rounds=2 stages=[sft,sample,label,export,ppo]",
     2, ["rounds=2: ppo trains in each round on that round's reward model (<run.dir>/round-1/reward for round 1)",
         "add reward to stages, or set ppo.reward_model=<folder> (one for every round) or ppo.scorer="]),
    ("pipeline: export of a batch nobody samples", "pipeline stages=[sft,sample,label,export,dpo] "
     f"{PIPE} "
     "export.batches=[round-0,round-9]", 2, ["export.batches: 'round-9' is not a batch of the store (none yet) nor one "
                                             "this pipeline samples (round-0)", "leave export.batches unset"]),
]


def snapshot(*roots: Path) -> dict[str, object]:
    """Every path under `roots` with its file's mtime (folders by name only: a probe inside changes theirs)."""
    return {str(p): None if p.is_dir() else p.stat().st_mtime_ns for root in roots for p in root.rglob("*")}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any from_pretrained of a model or adapter fails the test while it is active. (A tokenizer loads: SFT's
    check renders the first examples through the model's chat template.)"""
    from peft import PeftModel
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the inputs were checked")

    for cls in (PreTrainedModel, PeftModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("argv, code, said", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_error_and_writes_nothing(argv, code, said, d, tiny_model, tmp_path, capsys,
                                                         no_model_loads):
    fill = {"d": d, "tiny": tiny_model, "tmp": tmp_path, "run": tmp_path / "run"}
    stage, *rest = shlex.split(argv)
    args = [stage, *(a.format(**fill) for a in rest)]
    if not any(a.startswith("run.dir=") for a in args):
        args.append(f"run.dir={fill['run']}")
    before = snapshot(tmp_path, d)
    assert align([*args, "run.wandb=disabled"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    for text in said:
        assert text.format(**fill) in err, err
    assert snapshot(tmp_path, d) == before
    assert not (tmp_path / "run").exists()


def test_the_good_inputs_beside_them_pass(d, tiny_model, tmp_path, no_model_loads):
    """The same checks accept the good files, adapters and folders, so they refuse only what is wrong."""
    run = f"run.dir={tmp_path / 'run'}"
    good = {
        "sft": (C.SFTStageConfig, [f"model.name={tiny_model}", f"data.path={d / 'good.jsonl'}",
                                   "lora.target_modules=[q_proj, self_attn.v_proj]"]),
        "sample": (C.SampleStageConfig, [f"policy={d / 'adapter'}", f"prompts={d / 'prompts_alpaca.jsonl'}"]),
        "dpo": (C.DPOStageConfig, [f"sft={d / 'adapter'}", f"data.path={d / 'prefs.jsonl'}"]),
        "reward": (C.RewardStageConfig, [f"sft={d / 'adapter'}", f"data.path={d / 'prefs.jsonl'}",
                                         "lora.target_modules=[q_proj]"]),
        "ppo": (C.PPOStageConfig, [f"sft={d / 'adapter'}", "scorer=length", f"prompts={d / 'prompts.jsonl'}"]),
        "eval": (C.EvalStageConfig, [f"policies={{sft: {d / 'adapter'}, dpo: {d / 'foreign_lm'}}}",
                                     f"prompts={d / 'prompts.jsonl'}", "scorer=length",
                                     f"reward_model={d / 'rm_adapter'}"]),
        "merge": (C.MergeStageConfig, [f"adapter={d / 'adapter'}", f"output={tmp_path / 'merged'}"]),
        "pipeline": (C.PipelineConfig, [f"sft.model.name={tiny_model}", f"sft.data.path={d / 'good.jsonl'}",
                                        f"sample.prompts={d / 'prompts.jsonl'}", f"eval.prompts={d / 'prompts.jsonl'}"]),
    }
    for stage, (cls, overrides) in good.items():
        check_stage(stage, load_config(cls, None, [*overrides, run]))
    # An sft folder about to be remade (pending) is not the chat template dpo's pairs are checked against
    from transformers import AutoTokenizer

    from align.data import DataError

    refusing = tmp_path / "refusing"
    shutil.copytree(d / "adapter", refusing / "sft")
    AutoTokenizer.from_pretrained(d / "model_no_system").save_pretrained(refusing / "sft")
    cfg = load_config(C.DPOStageConfig, None, [f"run.dir={refusing}", f"data.path={d / 'prefs_system.jsonl'}"])
    check_stage("dpo", cfg, pending={"sft"})
    with pytest.raises(DataError, match="refuses its first pair with a system turn of its own"):
        check_stage("dpo", cfg)
    # GPT-2's positions hold an example of model.max_length, and a prompt with its answer
    check_stage("sft", load_config(C.SFTStageConfig, None, [f"model.name={d / 'gpt2_32_positions'}",
                                                           f"data.path={d / 'good.jsonl'}", "model.max_length=32", run]))
    check_stage("sample", load_config(C.SampleStageConfig, None, [f"policy={d / 'gpt2_32_positions'}", run,
                                                                 f"prompts={d / 'prompts.jsonl'}",
                                                                 "generation.max_new_tokens=4"]))
    # A chat template without the system role takes data without system turns
    check_stage("sft", load_config(C.SFTStageConfig, None, [f"model.name={d / 'model_no_system'}",
                                                           f"data.path={d / 'good.jsonl'}", run]))
    check_stage("dpo", load_config(C.DPOStageConfig, None, [f"run.dir={d / 'run_with_sft'}",
                                                           f"data.path={d / 'prefs.jsonl'}"]))
    # People label and eval is judged by the reward model trained before it, whatever order `stages` lists them in
    check_stage("pipeline", load_config(C.PipelineConfig, None, [
        *good["pipeline"][1], run, "label=human", "stages=[sft,dpo,eval,reward]", f"dpo.data.path={d / 'prefs.jsonl'}",
        f"reward.data.path={d / 'prefs.jsonl'}"]))
    # Two rounds of 5 of the 12 prompts: round 1's pool of pool_factor x 5 is cut to the 7 left, not refused
    check_stage("pipeline", load_config(C.PipelineConfig, None, [
        *good["pipeline"][1], run, "rounds=2", "stages=[sft,sample,label,export,reward,dpo]", "sample.num_prompts=5",
        "sample.selection=uncertainty", "sample.pool_factor=4"]))
    # Two rounds of 5 from a file of 12 lines, 10 distinct prompts: exactly enough
    check_stage("pipeline", load_config(C.PipelineConfig, None, [
        *good["pipeline"][1], run, "rounds=2", "stages=[sft,sample,label,export,dpo]", "sample.num_prompts=5",
        f"sample.prompts={d / 'prompts_twice.jsonl'}"]))
    # PPO's later rounds on a reward model named for every round: no stage need train one
    check_stage("pipeline", load_config(C.PipelineConfig, None, [
        *good["pipeline"][1], run, "rounds=2", "stages=[sft,sample,label,export,ppo]", "sample.num_prompts=5",
        f"ppo.reward_model={d / 'rm_adapter'}"]))
    # Eval judged by people alone: no reward model, no scorer
    check_stage("eval", load_config(C.EvalStageConfig, None, [*good["eval"][1][:2], run, "human=true"]))
    assert not (tmp_path / "run").exists()


def test_run_dir_that_cannot_be_written(tmp_path, capsys):
    """A read-only place (sysfs refuses even root) is named before anything runs."""
    target = Path("/sys/align-write-check")
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a machine where /sys is writable
        target.rmdir()
        pytest.skip("/sys is writable here")
    assert align(["sft", f"run.dir={target}", "run.wandb=disabled"]) == 2
    assert "run.dir=/sys/align-write-check: cannot write in /sys" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--port", "0"], "argument --port: must be in [1, 65535], got 0"),
    (["--port", "http"], "argument --port: expected an integer, got 'http'"),
    (["--overlap", "0"], "argument --overlap: must be >= 1, got 0"),
    (["--gold-rate", "1.5"], "argument --gold-rate: must be in [0, 1], got 1.5"),
    (["--session-hours", "0"], "argument --session-hours: must be in [0.01, 8760], got 0"),
    (["--session-hours", "nan", "users", "list"], "argument --session-hours: must be in [0.01, 8760], got nan"),
    (["--annotators", "0", "--simulate", "length"], "argument --annotators: must be >= 1, got 0"),
    (["--noise", "-1", "--simulate", "length"], "argument --noise: must be >= 0, got -1"),
    (["--noise", "nan", "--simulate", "length"], "argument --noise: must be >= 0, got nan"),
])
def test_label_options_out_of_range(argv, said, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own exit: status 2 and a usage line
        align(["label", "--run-dir", str(tmp_path / "run"), *argv])
    assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, said", [
    (["--run-dir", "{d}/a_file", "status"], "--run-dir {d}/a_file: a file, not a folder"),
    (["status"], "no labelling store at {run}/labels.db"),
    (["--simulate", "nope"], "--simulate: scorer 'nope': not a built-in"),
    (["--db", "sqlite:///{tmp}/typo.db", "users", "list"],
     "no labelling store at {tmp}/typo.db: `align sample store=sqlite:///{tmp}/typo.db` makes it"),
    (["--db", "sqlite://x.db", "status"], "--db sqlite://x.db: a SQLite URL names its file after three slashes"),
    (["--db", "sqlite:///", "status"], "--db sqlite:///: an in-memory database is gone when the command exits"),
    (["gold", "x", "1,2"], "gold TASK_ID RANKS: a task number and comma-separated ranks"),
    (["users", "remove", "bob"], "unknown command 'users remove bob'"),
    (["run.dir={tmp}/r"], "run.dir={tmp}/r: align label takes flags, not key=value: --run-dir {tmp}/r"),
])
def test_label_commands_refused_before_the_store_is_made(argv, said, d, tmp_path, capsys):
    fill = {"d": d, "tmp": tmp_path, "run": tmp_path / "run"}
    args = [a.format(**fill) for a in argv]
    if "--run-dir" not in args:
        args = ["--run-dir", str(fill["run"]), *args]
    before = snapshot(tmp_path, d)
    assert align(["label", *args]) == 2
    assert said.format(**fill) in capsys.readouterr().err
    assert snapshot(tmp_path, d) == before and not fill["run"].exists()


@pytest.mark.parametrize("argv, said", [
    (["--model", "{d}/adapter_truncated", "--prompt", "q", "--response", "a"],
     "--model: {d}/adapter_truncated/adapter_model.safetensors is not a readable safetensors file"),
    (["--model", "{d}/adapter", "--jsonl", "{d}/latin1.jsonl"], "--jsonl {d}/latin1.jsonl:1: needs a JSON object with string fields 'prompt' and 'response'"),
])
def test_reward_score_names_a_bad_model_or_file(argv, said, d, capsys, no_model_loads):
    assert align(["reward", "score", *(a.format(d=d) for a in argv)]) == 2
    assert said.format(d=d) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["score", "probe"])
@pytest.mark.parametrize("size", ["0", "-2"])
def test_reward_score_and_probe_refuse_a_batch_size_below_one_before_the_model_loads(command, size, d, capsys,
                                                                                     no_model_loads):
    """`align reward probe --batch-size 0` ended in a traceback after the model loaded (a KeyError below 0)."""
    texts = ["--prompt", "q", "--response", "a"] if command == "score" else []
    with pytest.raises(SystemExit) as stopped:
        align(["reward", command, "--model", str(d / "rm_adapter"), *texts, "--batch-size", size])
    assert stopped.value.code == 2 and f"--batch-size must be >= 1, got {size}" in capsys.readouterr().err


def test_guidelines_file_checked_before_the_app(tmp_path, capsys):
    from align.labeling.store import Store

    Store(f"sqlite:///{tmp_path / 'labels.db'}").add_user("ann", "pw-1234", admin=True)
    (tmp_path / "guide.md").write_bytes(b"caf\xe9")
    assert align(["label", "--run-dir", str(tmp_path), "--guidelines", str(tmp_path / "missing.md")]) == 2
    assert "--guidelines" in capsys.readouterr().err
    assert align(["label", "--run-dir", str(tmp_path), "--guidelines", str(tmp_path / "guide.md")]) == 2
    assert "not a readable UTF-8 text file" in capsys.readouterr().err


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter from the repository (its stdout and stderr as text); it must exit 0."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)


def assert_setup_drops(code: str, dropped: str, kept: str, dropped_in_full: str) -> None:
    """`code` (which calls align.cli's setup_environment) prints `kept` but not `dropped`; without that call
    it prints `dropped_in_full`: the message the filter drops is real."""
    out = python(code)
    assert dropped not in out.stderr
    assert kept in out.stderr
    assert dropped_in_full in python(code.replace("c.setup_environment(); ", "")).stderr


def test_config_errors_and_help_import_no_torch():
    """A bad value fails, and --help answers, before torch (or the recipe) is imported: well under a second."""
    code = ("import sys, time; from align.cli import main; t = time.time(); "
            "codes = [main(['sft', 'train.lr=-1']), main(['dpo', '--help']), main(['ppo', 'rl.gamma=2'])]; "
            "print(codes, 'torch' in sys.modules, round(time.time() - t, 2))")
    out = python(code)
    codes, torch_loaded, seconds = out.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert codes.endswith("[2, 0, 2]") and torch_loaded == "False", out.stdout + out.stderr
    assert float(seconds) < 5, seconds
    assert "train.lr: must be in (0, 1], got -1.0" in out.stderr and "rl.gamma: must be in [0, 1], got 2.0" in out.stderr
    assert "gemm_4bit_forward" not in out.stderr


def test_bitsandbytes_kernels_hub_notice_is_dropped_and_nothing_else():
    """bitsandbytes' import-time notices about the `kernels` hub package (its own, and `kernels`' offline
    publisher-check notice for that one repository) are filtered; their other warnings are not."""
    code = (
        "import logging, align.cli as c; c.setup_environment(); logging.basicConfig(level=logging.INFO); "
        "import bitsandbytes; from bitsandbytes.functional import has_avx512bf16; "
        "ops = __import__('bitsandbytes.backends.cpu.ops', fromlist=['x']); "
        "print('tried', has_avx512bf16() and getattr(ops, 'gemm_4bit_forward_kernel', 0) is None); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning'); "
        "logging.getLogger('kernels._internals.hf_hub').warning(\"Skipping publisher trust check for 'org/other'\")")
    out = python(code)
    assert "Failed to load CPU gemm_4bit_forward" not in out.stderr
    assert "Skipping publisher trust check for 'kernels-community" not in out.stderr
    assert "another bitsandbytes warning" in out.stderr and "trust check for 'org/other'" in out.stderr
    # On a CPU with AVX512-BF16 (this project's) bitsandbytes did try the kernel, so the notices were raised:
    # without the filters they show (the second only where `kernels` is installed, as transformers >= 5.25 has it).
    assert out.stdout.strip() in ("tried True", "tried False")
    if out.stdout.strip() == "tried True":
        full = python(code.replace("c.setup_environment(); ", "")).stderr
        assert "Failed to load CPU gemm_4bit_forward" in full
        if importlib.util.find_spec("kernels"):
            assert f"Skipping publisher trust check for '{BNB_KERNEL_REPO}'" in full


def test_accelerate_no_length_notice_on_the_ranking_loader_is_dropped_and_nothing_else():
    """The reward stage's loader (a RankingBatchSampler: no batch size, so no length to accelerate) makes
    gather_for_metrics log that the dataset had no length; the CLI drops that one line, not accelerate's others."""
    code = (
        "import logging, align.cli as c; c.setup_environment(); logging.basicConfig(level=logging.INFO); "
        "from accelerate import Accelerator; from torch.utils.data import DataLoader; "
        "from align.preferences import RankingBatchSampler; acc = Accelerator(cpu=True); "
        "groups = ['a', 'a', 'b', 'c', 'c', 'c']; "
        "loader = acc.prepare(DataLoader(list(range(6)), batch_sampler=RankingBatchSampler(groups, 2))); "
        "[acc.gather_for_metrics(b) for b in loader]; "
        "logging.getLogger('accelerate.accelerator').info('another accelerate line')")
    assert_setup_drops(code, "had no length", "another accelerate line", "The used dataset had no length")


def test_peft_reading_a_deprecated_property_warns_no_user_and_other_warnings_still_show():
    """peft wrapping a model reads transformers 5's `is_gradient_checkpointing`, which warns at every stage;
    the CLI drops that message, and a FutureWarning of any other text still shows."""
    code = (
        "import warnings, align.cli as c; c.setup_environment(); "
        "from transformers import LlamaConfig, LlamaForCausalLM; from peft import LoraConfig, get_peft_model; "
        "m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
        "num_attention_heads=2, num_key_value_heads=2, vocab_size=64)); "
        "get_peft_model(m, LoraConfig(r=2, target_modules=['q_proj'])); m.is_gradient_checkpointing; "
        "warnings.warn('another deprecation', FutureWarning)")
    assert_setup_drops(code, "is_gradient_checkpointing", "another deprecation",
                       "is_gradient_checkpointing` is deprecated")


# ---------------------------------------------------------------------------- after a failure


def test_a_failed_stage_leaves_no_unfinished_folder(tmp_path):
    """What discard_unfinished removes, keeps and un-marks when the stage inside raises."""
    run = tmp_path / "run"
    (run / "reward").mkdir(parents=True)
    (run / "reward" / "adapter_model.safetensors").write_text("old")
    (run / "reward" / "align.json").write_text("{}")
    (run / "sft").mkdir()
    (run / "sft" / "align.json").write_text("{}")
    with pytest.raises(MemoryError), discard_unfinished(run, tmp_path / "merged"):
        (run / "dpo" / "checkpoints").mkdir(parents=True)  # nothing to resume from yet
        (run / "dpo" / "metrics.jsonl").write_text("{}\n")
        (run / "ppo" / "checkpoints" / "step-2").mkdir(parents=True)  # resumable: kept
        (run / "round-1" / "dpo").mkdir(parents=True)
        (run / "wandb" / "offline-run-1").mkdir(parents=True)  # the failed run's log: kept
        (tmp_path / "merged").mkdir()
        (tmp_path / "merged" / "config.json").write_text("{}")
        (run / "reward" / "adapter_model.safetensors").write_text("half new")  # an artifact half rewritten
        (run / "sft" / "metrics.jsonl").write_text("{}\n")  # logged to only: still the same artifact
        raise MemoryError("out of memory at step 3")
    assert not (run / "dpo").exists() and not (run / "round-1").exists() and not (tmp_path / "merged").exists()
    assert (run / "ppo" / "checkpoints" / "step-2").is_dir() and (run / "wandb" / "offline-run-1").is_dir()
    assert not (run / "reward" / "align.json").exists() and (run / "sft" / "align.json").exists()

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt), discard_unfinished(fresh):
        (fresh / "sft").mkdir(parents=True)
        raise KeyboardInterrupt
    assert not fresh.exists()


def test_a_failed_stage_leaves_a_stage_another_process_runs_beside_it_alone(tmp_path, monkeypatch):
    """dpo fails while another process runs reward in the same run directory: reward/ (new, unfinished, no
    checkpoints yet) is that process's, held by its lock, and stays; the failed run's own folder goes."""
    import fcntl

    from align.artifacts import holding

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MemoryError), discard_unfinished(run, command="dpo"):
        (run / "reward").mkdir()
        other = open(run / "reward" / ".align.lock", "w")  # the reward process's lock (flock's unit: an open file)
        fcntl.flock(other, fcntl.LOCK_EX)
        (run / "dpo").mkdir()
        raise MemoryError
    other.close()
    assert (run / "reward").is_dir() and not (run / "dpo").exists()
    # The lock itself: one holder; a second is refused at once, naming the first; under `accelerate launch` only
    # rank 0 takes it (the other ranks are the same run).
    with holding(run / "dpo" / ".align.lock", "dpo"):
        with pytest.raises(StageError, match=rf"{run / 'dpo'} is in use by align dpo \(pid {os.getpid()}\)"):
            with holding(run / "dpo" / ".align.lock", "dpo"):
                pass
        with holding(run / "reward" / ".align.lock", "reward"):  # another stage's folder: free
            pass
        monkeypatch.setenv("RANK", "1")
        with holding(run / "dpo" / ".align.lock", "dpo"):
            pass


def test_a_failed_stage_removes_only_stage_folders_and_none_an_export_is_writing(tmp_path):
    """A failure removed every folder made in run.dir meanwhile without an align.json: a user's own notes, and
    another process's export on its way in (.preferences.partial-*, or preferences/ under its export lock)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(KeyboardInterrupt), discard_unfinished(run, command="pipeline"):
        for folder in (run / "my_analysis", run / "round-1" / "my_notes", run / ".preferences.partial-x1"):
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("mine")
        (run / "preferences").mkdir()
        (run / "preferences" / "summary.json").write_text("{}")
        other = open(run / ".preferences.lock", "a")  # align.labeling.export's lock, held by the exporting process
        fcntl.flock(other, fcntl.LOCK_EX)
        (run / "round-1" / "dpo").mkdir()
        (run / "round-1" / "dpo" / "metrics.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    other.close()
    assert (run / "my_analysis" / "notes.txt").is_file() and (run / "round-1" / "my_notes" / "notes.txt").is_file()
    assert (run / ".preferences.partial-x1" / "notes.txt").is_file() and (run / "preferences").is_dir()
    assert not (run / "round-1" / "dpo").exists()


def test_a_pipeline_stopped_at_once_leaves_no_new_run_dir_behind(tiny_model, sft_data, tmp_path, monkeypatch):
    """Its lock file (run.dir/.align.lock) is not something the failed pipeline made: the new run dir still goes."""
    from align.recipes import pipeline

    def stopped(cfg):
        assert (tmp_path / "new" / ".align.lock").is_file()  # held while it runs
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "main", stopped)
    assert align(["pipeline", f"run.dir={tmp_path / 'new'}", "run.wandb=disabled", "stages=[sft]",
                  f"sft.model.name={tiny_model}", f"sft.data.path={sft_data}"]) == 130
    assert not (tmp_path / "new").exists()


def test_a_stopped_run_names_the_resume_key_its_command_takes(tmp_path, caplog):
    """The folders kept for their checkpoints are named with the key that resumes them: under `align pipeline`
    a stage's own (sft.train..., ppo.train... for grpo/), which the pipeline passes on; `train.` alone it refuses."""
    for command, prefix in (("pipeline", ("sft.", "ppo.")), ("sft", ("", ""))):
        run = tmp_path / command
        (run / "grpo").mkdir(parents=True)
        (run / "grpo" / "align.json").write_text("{}")
        caplog.clear()
        with pytest.raises(KeyboardInterrupt), discard_unfinished(run, command=command):
            (run / "sft" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
            (run / "grpo" / "align.json").unlink()  # a finished stage trained again: its manifest went as it started
            (run / "grpo" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
            raise KeyboardInterrupt
        assert (f"sft: unfinished (no align.json) but it holds checkpoints; {prefix[0]}train.resume_from_checkpoint="
                "latest continues from them") in caplog.text
        assert (f"grpo: unfinished (its align.json went as this run started training) but it holds checkpoints; "
                f"{prefix[1]}train.resume_from_checkpoint=latest continues from them") in caplog.text


def test_a_finished_stage_rerun_and_stopped_before_its_first_checkpoint_gets_its_artifact_back(tmp_path, caplog):
    """A finished sft run again (its align.json removed as training starts, its metrics log started anew) and stopped
    before its first checkpoint left the earlier run's adapter without its align.json, unusable, without a word.
    Where the rerun changed nothing else, the artifact is given back whole (align.json and log); where it had begun
    to rewrite it, the folder is left as it is (nothing deleted: the earlier adapter, a user's own notes) and said
    to be unfinished."""
    for rewritten, resumed in ((False, False), (True, False), (False, True)):
        run = tmp_path / f"rewritten-{rewritten}-{resumed}"
        sft = run / "sft"
        sft.mkdir(parents=True)
        for name in ("align.json", "adapter_model.safetensors", "config.yaml", "NOTES.md"):
            (sft / name).write_text(f"earlier run's {name}")
        (sft / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
        if resumed:  # the finished run's last checkpoint, which a resume to more steps trains on from
            (sft / "checkpoints" / "checkpoint-10").mkdir(parents=True)
        caplog.clear()
        with pytest.raises(KeyboardInterrupt), discard_unfinished(run, command="sft"):
            (sft / "align.json").unlink()  # as training starts
            if not resumed:  # a fresh run sets the finished run's checkpoints aside
                (sft / "checkpoints" / "abandoned-20261204-120000" / "checkpoint-10").mkdir(parents=True)
            (sft / "metrics.jsonl").write_text("")
            if rewritten:
                (sft / "adapter_model.safetensors").write_text("half of this run's adapter")
            raise KeyboardInterrupt
        assert (sft / "NOTES.md").read_text() == "earlier run's NOTES.md"
        assert (sft / "checkpoints" / ("checkpoint-10" if resumed else "abandoned-20261204-120000/checkpoint-10")
                ).is_dir()
        if rewritten:
            assert not (sft / "align.json").exists() and "is unfinished: this run stopped" in caplog.text
        else:
            assert (sft / "align.json").read_text() == "earlier run's align.json"
            assert (sft / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
            assert "is as it was: this run stopped before it changed the finished artifact" in caplog.text


def test_ctrl_c_is_one_line_and_the_unfinished_folder_goes(tmp_path, monkeypatch, capsys):
    from align import cli

    def interrupted(stage, cfg):
        (tmp_path / "run" / "sft").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_stage", interrupted)
    assert align(["sft", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled"]) == 130
    err = capsys.readouterr().err
    assert "align sft: interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "sft").exists()


def test_sigterm_unwinds_as_ctrl_c_does_and_the_handler_is_put_back(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    from align import cli

    def killed(stage, cfg):
        (tmp_path / "run" / "sft").mkdir(parents=True)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would
        time.sleep(5)  # the handler raises here, at once
        raise AssertionError("SIGTERM did not stop the stage")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run_stage", killed)
    assert align(["sft", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled"]) == 143
    err = capsys.readouterr().err
    assert "align sft: terminated" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "sft").exists() and signal.getsignal(signal.SIGTERM) is before


def test_a_failed_merge_leaves_no_half_written_merged_folder(tmp_path):
    """align merge with its adapter left to the default (<run.dir>/sft) writes <run.dir>/sft-merged, no stage folder:
    once Ctrl-C's tidy-up swept only stage folders, a merge stopped in save_pretrained left a half-written one."""
    from align import cli
    from align.artifacts import discard_unfinished
    from align.config import MergeStageConfig, RunConfig

    cfg = MergeStageConfig(run=RunConfig(dir=str(tmp_path)))
    assert cli._outputs("merge", cfg) == [str(tmp_path / "sft-merged")]
    (tmp_path / "sft").mkdir()
    with pytest.raises(KeyboardInterrupt), discard_unfinished(tmp_path, *cli._outputs("merge", cfg), command="merge"):
        (tmp_path / "sft-merged").mkdir()
        (tmp_path / "sft-merged" / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_merge_of_the_folder_it_runs_in_names_the_merged_folder_beside_it(tmp_path, monkeypatch, capsys):
    """`cd runs/x/sft && align merge adapter=.`: Path('.').with_name raised ValueError (a traceback) before the
    adapter was checked; the merged folder is <that folder>-merged, and an empty one is refused in one line."""
    from types import SimpleNamespace

    from align.artifacts import merge_paths
    from align.cli import main as align

    here = tmp_path / "sft"
    here.mkdir()
    monkeypatch.chdir(here)
    cfg = SimpleNamespace(adapter=".", output=None, run=SimpleNamespace(dir="runs/q"))
    assert merge_paths(cfg) == (here, tmp_path / "sft-merged")
    assert merge_paths(SimpleNamespace(adapter="a/sft/", output=None, run=cfg.run))[1] == Path("a/sft-merged")
    assert align(["merge", "adapter=.", "run.wandb=disabled"]) == 2
    assert f"adapter={here}: an empty folder" in capsys.readouterr().err


def test_a_full_disk_or_a_refused_write_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """A full disk (safetensors' own error, or an OSError from the Trainer) or a permission refused mid-stage was a
    30-line traceback; it is one line with the file, exit code 1. Any other error still raises."""
    import errno

    from align import cli

    cases = [(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "sft" / "model.safetensors")),
              f"{tmp_path / 'sft' / 'model.safetensors'}: No space left on device (free space"),
             (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "report.html")),
              f"{tmp_path / 'report.html'}: Permission denied (free space or fix the permissions"),
             (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })"), "No space left on device"),
             (ValueError("wrapped"), None)]
    for error, said in cases:
        def fails(stage, cfg, error=error):
            raise error

        monkeypatch.setattr(cli, "run_stage", fails)
        if said is None:
            with pytest.raises(ValueError):
                align(["sft", f"run.dir={tmp_path}", "run.wandb=disabled"])
            continue
        assert align(["sft", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("align sft: ") and said in err and "Traceback" not in err, err
    try:  # raised from a wrapper (transformers re-raises): the OSError underneath is found
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/x/ckpt")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert cli.disk_error(outer) == "/x/ckpt: Disk quota exceeded (free space or fix the permissions, then run it again)"


def test_a_stage_that_fails_or_is_stopped_closes_its_wandb_run_as_failed(tmp_path, monkeypatch, capsys):
    """A stage that failed after opening its W&B run, or was stopped, left the run open, and wandb's exit hook
    closed it as finished, exit code 0: in W&B it looked like a stage that ended well."""
    import json
    import subprocess
    import sys

    from align import StageError, cli
    from align.tracking import start_wandb_run

    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(key, raising=False)  # put back as they were after the test
    ways = {"stage error": (StageError("no data"), 1), "sigterm": (cli.Terminated(), 143),
            "a bug": (RuntimeError("a bug"), None)}
    for name, (error, code) in ways.items():
        run = tmp_path / name.replace(" ", "-")

        def fails(stage, cfg, error=error):
            start_wandb_run(cfg.run, stage, {"lr": 1})  # as the stage does, before its model loads
            raise error

        monkeypatch.setattr(cli, "run_stage", fails)
        if code is None:  # not the CLI's to say: the traceback, and the run closed as failed
            with pytest.raises(RuntimeError):
                align(["sft", f"run.dir={run}", "run.wandb=offline"])
        else:
            assert align(["sft", f"run.dir={run}", "run.wandb=offline"]) == code
        [folder] = (run / "wandb").glob("offline-run-*")
        info = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                          str(folder)], capture_output=True, text=True, check=True).stdout)
        assert (info["state"], info["exit_code"]) == ("failed", code or 1), (name, info)


def test_wandb_online_where_no_run_could_start_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """run.wandb=online (or WANDB_MODE=online) with no key, or a W&B server that does not answer: wandb.init failed
    (or waited 90 s and failed) when the stage opened its run, for sample and eval after all their answers were
    generated and judged, and the stage ended with no manifest. Now the check before any work says so."""
    import socket

    from align import tracking

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(tracking, "USER_MODE", "")
    run = tmp_path / "run"
    for stage in ("sample", "eval", "sft"):
        assert align([stage, f"run.dir={run}", "run.wandb=online"]) == 2
        err = capsys.readouterr().err
        assert "run.wandb=online: no W&B key for api.wandb.ai" in err and "run.wandb=offline" in err, err
    assert not (run / "sample").exists() and not (run / "eval").exists()
    monkeypatch.setattr(tracking, "USER_MODE", "online")  # the user's WANDB_MODE, under run.wandb=auto
    assert align(["sample", f"run.dir={run}"]) == 2
    assert "WANDB_MODE=online (with run.wandb=auto): no W&B key" in capsys.readouterr().err

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
    tracking.wandb_reachable.cache_clear()
    try:
        assert align(["eval", f"run.dir={run}", "run.wandb=online"]) == 2
        assert "does not answer, so no run could be started" in capsys.readouterr().err
    finally:
        tracking.wandb_reachable.cache_clear()
        closed.close()


def test_wandb_online_with_a_key_the_server_refuses_is_refused_before_any_work(wandb_server, tmp_path, capsys):
    """run.wandb=online with a key the server refuses (401): wandb.init failed with a traceback ("user is not logged
    in") when eval and sample opened their run, after all their work, and the failed eval removed the previous
    finished eval's align.json. Now one line before any work, naming run.wandb and the key, and nothing touched."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "align.json").write_text('{"stage": "eval"}')  # a previous eval, finished
    for stage in ("eval", "sample", "sft"):
        assert align([stage, f"run.dir={run}", "run.wandb=online"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run.wandb=online: 127.0.0.1 refuses the key in WANDB_API_KEY (HTTP 401: " \
            "user is not logged in), so no run could be started" in err and "run.wandb=auto" in err, err
    assert (run / "eval" / "align.json").read_text() == '{"stage": "eval"}' and sorted(run.iterdir()) == [run / "eval"]
    assert len(wandb_server.asked) == 1  # once a process
