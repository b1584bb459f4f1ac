"""The GPU levers (align/gpu_training.py) and the 4-bit preparation: each decided as documented, and
each that changes how a step is computed keeps its maths (same loss and gradients on a tiny model)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from align import StageError
from align.config import ModelConfig, SFTStageConfig, load_config
from align.gpu_training import (
    RESERVE_BYTES,
    activation_bytes_per_token,
    fit_checkpointing,
    use_liger,
    use_padding_free,
)
from align.modeling import DevicePlan, load_base_model

CUDA_PLAN = DevicePlan("cuda", quantize=True, compute_dtype=torch.bfloat16, gradient_checkpointing=True)
CPU_PLAN = DevicePlan("cpu", quantize=False, compute_dtype=torch.float32, gradient_checkpointing=False)


# ---------------------------------------------------------------------------- 4-bit base


def first_layer_input_dtype(model) -> torch.dtype:
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).dtype),
        with_kwargs=True)
    model(input_ids=torch.tensor([[1, 2, 3]]))
    hook.remove()
    return seen[0]


def test_a_4bit_base_keeps_the_residual_stream_in_the_compute_dtype(tiny_model):
    """peft's prepare_model_for_kbit_training upcasts the embedding, norms and LM head to fp32, and with them every
    layer's input: the cause of align's 1.6x peak GPU memory against TRL at batch 64. Ours leaves them bf16."""
    from peft import prepare_model_for_kbit_training

    plan = DevicePlan("cpu", quantize=True, compute_dtype=torch.bfloat16, gradient_checkpointing=False)
    ours = load_base_model(ModelConfig(name=tiny_model), plan)
    assert {p.dtype for p in ours.parameters() if type(p).__name__ != "Params4bit"} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ours.parameters())
    assert first_layer_input_dtype(ours) == torch.bfloat16

    peft_way = prepare_model_for_kbit_training(load_base_model(ModelConfig(name=tiny_model), plan, training=False),
                                               use_gradient_checkpointing=False)
    assert first_layer_input_dtype(peft_way) == torch.float32  # what the cast did


def test_a_4bit_fp16_base_computes_at_inference_as_it_trained(tiny_model):
    """Under fp16 compute the training load keeps peft's upcast (fp16's range needs the fp32 residual stream);
    loaded for inference (a reward model scoring for PPO or eval, a policy sampling) the same base ran in fp16
    throughout, so it scored otherwise than its held-out figures, the gate's, measured."""
    from align.cpu import keep_4bit_backward

    plan = DevicePlan("cpu", quantize=True, compute_dtype=torch.float16, gradient_checkpointing=False)
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    logits = {}
    for training in (True, False):
        model = load_base_model(ModelConfig(name=tiny_model), plan, training=training).eval()
        keep_4bit_backward(model)  # the CPU's eval-mode repack (another kernel) off, as the training load has it
        assert first_layer_input_dtype(model) == torch.float32
        with torch.no_grad():
            logits[training] = model(input_ids=ids).logits.float()
    assert torch.equal(logits[True], logits[False])


def test_checkpointing_counts_a_4bit_fp16_bases_fp32_stream(monkeypatch):
    """fit_checkpointing's estimate at the stream's dtype: fp32 under fp16 compute on a 4-bit base (its norms and
    embedding upcast), at twice fp16's bytes for what the layers keep, which turned checkpointing off too early."""
    from types import SimpleNamespace

    import align.gpu_training as G

    config = SimpleNamespace(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=16,
                             num_hidden_layers=24)
    model = SimpleNamespace(config=config)
    fp32 = activation_bytes_per_token(config, torch.float32) * 4096
    fp16 = activation_bytes_per_token(config, torch.float16) * 4096
    free = int((fp16 + fp32) / 2 * G.SAFETY) + RESERVE_BYTES  # enough for an fp16 stream, not for an fp32 one
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(G, "sharded", lambda: False)
    for quantize, on in ((True, True), (False, False)):
        plan = DevicePlan("cuda", quantize=quantize, compute_dtype=torch.float16, gradient_checkpointing=True)
        assert fit_checkpointing(plan, "auto", model, 4096).gradient_checkpointing is on, quantize


@pytest.mark.parametrize("quantize, launch, device_map, moved", [
    (False, {}, {"": 0}, None),  # alone: straight onto the GPU, no copy in host RAM first
    (False, {"LOCAL_RANK": "1"}, {"": 1}, None),  # under accelerate launch: this rank's GPU
    (False, {"LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true"}, None, "cuda:1"),  # ZeRO-3 refuses a map
    (True, {"LOCAL_RANK": "1", "ACCELERATE_USE_FSDP": "true"}, {"": 1}, None),  # 4-bit: bitsandbytes places it
])
def test_a_model_loads_onto_its_gpu_with_a_device_map_unless_sharded(tiny_model, monkeypatch, quantize, launch,
                                                                      device_map, moved):
    calls = {}

    class Loaded:
        def to(self, device):
            calls["to"] = device
            return self

        def named_parameters(self):  # (load_base_model checks none was left on the meta device)
            return iter([])

    class Auto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.update(kwargs)
            return Loaded()

    for name in ("LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    plan = DevicePlan("cuda", quantize=quantize, compute_dtype=torch.bfloat16, gradient_checkpointing=False)
    load_base_model(ModelConfig(name=tiny_model), plan, auto_class=Auto, training=False)
    assert calls.get("device_map") == device_map and calls.get("to") == moved
    assert ("quantization_config" in calls) is quantize


# ---------------------------------------------------------------------------- checkpointing


def saved_activation_bytes(layers: int, dtype: torch.dtype, dropout: float, autocast: bool, tokens: int = 256) -> int:
    """The bytes autograd keeps for backward (parameters excluded) in one forward of a small LoRA Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).train()
    if not autocast:  # TRL's QLoRA recipe: adapters cast to bf16, no autocast needed for them
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 512, (4, tokens // 4))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids)
    return sum(saved.values()), config


@pytest.mark.parametrize("dtype,dropout,autocast", [(torch.bfloat16, 0.05, True), (torch.bfloat16, 0.0, True),
                                                    (torch.bfloat16, 0.05, False), (torch.float32, 0.05, False)])
def test_the_activation_estimate_bounds_what_autograd_keeps(dtype, dropout, autocast):
    two, config = saved_activation_bytes(2, dtype, dropout, autocast)
    four, _ = saved_activation_bytes(4, dtype, dropout, autocast)
    per_layer_token = (four - two) / 2 / 256  # what one more layer costs per token
    estimate = activation_bytes_per_token(config, dtype, lora_dropout=dropout > 0) / config.num_hidden_layers
    assert per_layer_token <= estimate < 1.5 * per_layer_token, (per_layer_token, estimate)


def test_checkpointing_auto_is_on_only_when_the_activations_do_not_fit(tiny_model, monkeypatch):
    from transformers import AutoConfig

    model = type("Loaded", (), {"config": AutoConfig.from_pretrained(tiny_model)})()
    per_token = activation_bytes_per_token(model.config, torch.bfloat16)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))

    free["bytes"] = RESERVE_BYTES + 2 * per_token * 4096  # room for 4096 tokens of activations, and more
    assert fit_checkpointing(CUDA_PLAN, "auto", model, tokens_per_step=4096).gradient_checkpointing is False
    free["bytes"] = RESERVE_BYTES + per_token * 4096  # exactly 4096 tokens: under the 1.25 safety margin
    assert fit_checkpointing(CUDA_PLAN, "auto", model, tokens_per_step=4096).gradient_checkpointing is True
    # What vLLM will take once the trainer starts it (GRPO colocated) is not free: of a card half free, 30 % leaves
    # room, 45 % does not
    free["bytes"] = 4 * (RESERVE_BYTES + 2 * per_token * 4096)
    assert fit_checkpointing(CUDA_PLAN, "auto", model, 4096, taken_later=0.3).gradient_checkpointing is False
    assert fit_checkpointing(CUDA_PLAN, "auto", model, 4096, taken_later=0.45).gradient_checkpointing is True
    # Asked for explicitly, on CPU, or sharded (FSDP/DeepSpeed): left as the plan says.
    free["bytes"] = 2**50
    assert fit_checkpointing(CUDA_PLAN, "on", model, 4096).gradient_checkpointing is True
    assert fit_checkpointing(CPU_PLAN, "auto", model, 4096).gradient_checkpointing is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fit_checkpointing(CUDA_PLAN, "auto", model, 4096).gradient_checkpointing is True


# ---------------------------------------------------------------------------- liger, padding-free


def test_liger_auto_is_off_without_cuda_and_true_is_refused():
    assert use_liger("auto") is False and use_liger(False) is False
    with pytest.raises(StageError, match="train.liger=true needs CUDA"):
        use_liger(True)


def test_liger_auto_is_on_with_cuda_and_the_packages_unless_align_liger_is_off(monkeypatch):
    """ALIGN_LIGER=off: what scripts/gpu_check.sh sets when Liger is installed but its preflight failed, rather
    than uninstalling a liger-kernel the machine had."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())  # liger_kernel and triton
    assert use_liger("auto") is True
    monkeypatch.setenv("ALIGN_LIGER", "off")
    assert use_liger("auto") is False and use_liger(False) is False


def test_padding_free_auto_needs_cuda_and_a_flash_attention():
    assert use_padding_free("auto", CPU_PLAN, "flash_attention_2", truncated=0) is False
    assert use_padding_free("auto", CUDA_PLAN, None, truncated=0) is False  # sdpa: correct, but O((batch*len)^2)
    assert use_padding_free("auto", CUDA_PLAN, "flash_attention_2", truncated=0) is True
    assert use_padding_free("auto", CUDA_PLAN, "kernels-community/flash-attn3", truncated=0) is True
    assert use_padding_free("auto", CUDA_PLAN, "flash_attention_2", truncated=3) is False
    assert use_padding_free("on", CPU_PLAN, None, truncated=0) is True
    with pytest.raises(StageError, match="3 examples are longer than model.max_length"):
        use_padding_free("on", CPU_PLAN, None, truncated=3)
    # packing: TRL packs padding-free whatever the setting (its bfd strategy), cutting what overflows
    for setting in ("auto", "on", "off"):
        assert use_padding_free(setting, CPU_PLAN, None, truncated=3, packing=True) is True
    from trl import SFTConfig, SFTTrainer

    assert SFTConfig.__dataclass_fields__["packing_strategy"].default == "bfd"  # what the rule above reads TRL as
    assert "packing_strategy in {\"bfd\", \"bfd_split\"}" in __import__("inspect").getsource(SFTTrainer.__init__)


def sft_trainer(tiny_model, data, tmp_path, padding_free: bool, attn: str):
    from trl import SFTTrainer

    from align.data import load_sft_dataset
    from align.modeling import load_tokenizer, peft_lora_config
    from align.recipes.sft import sft_args

    cfg = load_config(SFTStageConfig, None, [f"model.name={tiny_model}", "run.wandb=disabled", "lora.dropout=0",
                                             f"model.attn_implementation={attn}", "model.quantize=false"])
    dataset, _ = load_sft_dataset(data)
    torch.manual_seed(0)
    model = load_base_model(cfg.model, CPU_PLAN)
    lora = replace(peft_lora_config(cfg.lora), init_lora_weights=False)  # random B: every LoRA weight gets a gradient
    return SFTTrainer(model=model, args=sft_args(cfg, CPU_PLAN, tmp_path, False, padding_free), train_dataset=dataset,
                      processing_class=load_tokenizer(tiny_model), peft_config=lora)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batches_give_the_padded_loss_and_gradients(tiny_model, tmp_path, attn):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: " + "sync? " * (1 + 3 * i), "input": "",
                                          "output": "Open Settings and tap Sync." * (1 + i % 3)})
                              for i in range(6)) + "\n")
    results = {}
    for padding_free in (False, True):
        trainer = sft_trainer(tiny_model, data, tmp_path / str(padding_free), padding_free, attn)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        assert ("attention_mask" in batch) != padding_free  # padded: a mask; flat: position_ids only
        if padding_free:
            assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[padding_free] = loss.item(), grads, int((batch["input_ids"] != -1).sum())
    (padded_loss, padded_grads, padded_len), (flat_loss, flat_grads, flat_len) = results[False], results[True]
    assert flat_len < padded_len  # the padding is gone
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == flat_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(flat_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_sft_records_the_levers_it_decided(tiny_model, sft_data, tmp_path):
    from align.cli import main as align

    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={tmp_path}",
                  "run.wandb=disabled", "train.max_steps=2", "train.batch_size=4", "data.eval_fraction=0",
                  "model.max_length=96", "model.quantize=false", "data.padding_free=on"]) == 0
    manifest = json.loads((tmp_path / "sft" / "align.json").read_text())
    assert manifest["device_plan"].endswith("liger off · padding-free on · torch.compile off")
    assert manifest["gpu_peak_mib"] is None  # no CUDA here


def test_train_compile_compiles_the_model_and_keeps_the_losses(tiny_model, sft_data, tmp_path):
    """train.compile reaches the trainer (the model it trains is torch.compile's), with the same losses.

    Compiled with dynamo's aot_eager backend (the traced graphs run eagerly): inductor's code generation
    takes minutes on this CPU and is torch's to get right; what align owns is that the switch compiles."""
    from accelerate.state import AcceleratorState
    from trl import SFTTrainer

    from align.data import load_sft_dataset
    from align.modeling import load_tokenizer, peft_lora_config
    from align.recipes.sft import sft_args

    def train(compile: bool):
        cfg = load_config(SFTStageConfig, None, [
            f"model.name={tiny_model}", "run.wandb=disabled", "lora.dropout=0", "model.quantize=false",
            "train.max_steps=3", "train.batch_size=4", f"train.compile={str(compile).lower()}", "model.max_length=96",
            "train.logging_steps=1", "train.warmup_ratio=0"])
        args = sft_args(cfg, CPU_PLAN, tmp_path / str(compile), False)
        assert args.torch_compile is compile
        if compile:
            args.torch_compile_backend = "aot_eager"
        AcceleratorState._reset_state(True)  # the compile settings live in accelerate's process-wide state
        torch.manual_seed(0)
        trainer = SFTTrainer(model=load_base_model(cfg.model, CPU_PLAN), args=args,
                             train_dataset=load_sft_dataset(sft_data)[0], processing_class=load_tokenizer(tiny_model),
                             peft_config=peft_lora_config(cfg.lora))
        trainer.train()
        AcceleratorState._reset_state(True)
        return type(trainer.model_wrapped).__name__, [r["loss"] for r in trainer.state.log_history if "loss" in r]

    (eager_kind, eager), (compiled_kind, compiled) = train(False), train(True)
    assert eager_kind != "OptimizedModule" and compiled_kind == "OptimizedModule"
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-5)


def test_liger_never_swaps_in_a_causal_lm_forward(monkeypatch, tmp_path):
    """Liger's fused linear cross-entropy replaces the model's forward with a causal LM's, which calls
    lm_head: TRL turns it off in its sft, dpo and grpo trainers but not in RewardTrainer, whose
    sequence-classification model has no lm_head. trl_args turns it off for every stage."""
    from trl import DPOConfig, RewardConfig

    from align import training
    from align.config import RunConfig, TrainConfig

    for liger, expected in ((True, {"fused_linear_cross_entropy": False}), (False, None)):
        monkeypatch.setattr(training, "use_liger", lambda setting, on=liger: on)
        for config_class in (RewardConfig, DPOConfig):
            args = training.trl_args(config_class, TrainConfig(), CPU_PLAN, RunConfig(dir=str(tmp_path), wandb="disabled"),
                                     "reward", tmp_path, has_eval=False)
            assert args.use_liger_kernel is liger and args.liger_kernel_config == expected


def test_auto_compute_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 or V100 too (emulated: slower than fp32); auto asks
    for hardware bf16 and falls back to fp32 there."""
    from align.modeling import device_plan

    hardware = {"bf16": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or hardware["bf16"])
    cfg = ModelConfig(name="any", quantize=False)
    assert device_plan(cfg).compute_dtype == torch.float32
    hardware["bf16"] = True
    assert device_plan(cfg).compute_dtype == torch.bfloat16


@pytest.fixture
def cuda_128_with_bnb_built_for_130(monkeypatch):
    """torch cu128 (the README's GPU install) and a bitsandbytes that has only its CUDA 13.0 build (what gpu_prep.sh
    once kept): bitsandbytes' import succeeds, its native library is a stand-in that raises on every call."""
    from bitsandbytes import cextension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cextension, "get_available_cuda_binary_versions", lambda: ["13.0"])
    mock = cextension.ErrorHandlerMockBNBNativeLibrary(
        "No compatible CUDA binary found at /site-packages/bitsandbytes/libbitsandbytes_cuda128.so")
    monkeypatch.setattr(cextension, "lib", mock)
    return cextension


def test_qlora_on_cuda_is_planned_only_where_bitsandbytes_loaded_its_cuda_library(cuda_128_with_bnb_built_for_130,
                                                                                  monkeypatch, caplog):
    """The plan kept 4-bit on, and every QLoRA stage failed at its first 4-bit layer with bitsandbytes' error."""
    import logging

    from align.modeling import bitsandbytes_cuda_problem, device_plan

    problem = bitsandbytes_cuda_problem()
    assert problem and "CUDA 12.8" in problem and "its builds: 13.0" in problem and "libbitsandbytes_cuda128" in problem
    with caplog.at_level(logging.WARNING, logger="align.modeling"):
        plan = device_plan(ModelConfig(name="any", quantize=True))
    assert plan.quantize is False and "unquantized base + LoRA" in plan.describe()
    assert any("QLoRA cannot run here" in r.getMessage() for r in caplog.records)

    cextension = cuda_128_with_bnb_built_for_130  # a CUDA library that loaded: 4-bit as asked
    monkeypatch.setattr(cextension, "lib", object.__new__(cextension.CudaBNBNativeLibrary))
    assert bitsandbytes_cuda_problem() is None
    assert device_plan(ModelConfig(name="any", quantize=True)).quantize is True


def test_sharded_reads_what_accelerate_launch_sets(monkeypatch):
    from align.gpu_training import sharded

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert sharded() is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharded() is True


def test_sharded_training_gets_one_trainable_dtype(tiny_model, monkeypatch):
    """QLoRA + DoRA under FSDP: TRL leaves DoRA's magnitude vectors fp32 beside bf16 LoRA weights, and FSDP2
    refuses a layer whose trainable weights mix dtypes. Sharded, all are fp32 (in bf16, with no fp32 copy kept
    by FSDP2, an AdamW step at lr 4e-4 left every magnitude near 1 where it was); frozen weights are left as
    they are, and an unsharded run is not touched."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.gpu_training import one_trainable_dtype

    def dora_as_trl_leaves_it():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
        for name, param in model.named_parameters():
            if param.requires_grad and "magnitude" not in name:
                param.data = param.data.to(torch.bfloat16)
        return model

    trainable = lambda m: {p.dtype for p in m.parameters() if p.requires_grad}  # noqa: E731
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    model = dora_as_trl_leaves_it()
    one_trainable_dtype(model)
    assert trainable(model) == {torch.bfloat16, torch.float32}  # one process: as it was
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    one_trainable_dtype(model)
    assert trainable(model) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32}
    magnitudes = [p for n, p in model.named_parameters() if "magnitude" in n]
    before = [m.detach().clone() for m in magnitudes]
    sum(m.sum() for m in magnitudes).backward()
    torch.optim.AdamW(magnitudes, lr=4e-4).step()
    assert all((m != b).all() for m, b in zip(magnitudes, before, strict=True))  # every one moved


def test_packing_keeps_its_length_when_padding_free_is_on(tmp_path):
    """Padding-free alone leaves max_length to TRL (every example was checked to fit); packing needs it as
    the length it packs to, and TRL refused packing with max_length None."""
    from align.recipes.sft import sft_args

    cfg = load_config(SFTStageConfig, None, ["data.packing=true", "model.max_length=256", f"run.dir={tmp_path}",
                                             "run.wandb=disabled"])
    assert sft_args(cfg, CPU_PLAN, tmp_path, False, padding_free=True).max_length == 256
    plain = replace(cfg, data=replace(cfg.data, packing=False))
    assert sft_args(plain, CPU_PLAN, tmp_path, False, padding_free=True).max_length is None


def test_the_device_plan_names_the_adapter_a_stage_continues(tiny_model, tmp_path):
    """dpo, ppo and grpo continue the SFT adapter: a DoRA one was recorded as "LoRA" in their device plan (sft and
    reward name their own lora section's). The SFT folder's own peft config says what they train."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.config import LoraConfig as Section
    from align.gpu_training import adapter_name, adapter_settings, describe_levers
    from align.modeling import DevicePlan

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, use_dora=True, use_rslora=True, target_modules=["q_proj"])).save_pretrained(tmp_path)
    plan = DevicePlan("cpu", False, torch.float32, False)
    assert "unquantized base + DoRA with rsLoRA scaling" in describe_levers(
        plan, liger=False, lora=adapter_settings(tmp_path, Section()))  # the SFT's, not the section's
    assert adapter_name(adapter_settings(None, Section(use_dora=True))) == "DoRA"
    assert "base + LoRA (QLoRA)" in DevicePlan("cuda", True, torch.bfloat16, False).describe(adapter_name(None))


def test_the_training_autocast_is_taken_off_the_model_before_a_reward_model_is_scored(tmp_path):
    """accelerate wraps a model's forward in the bf16 autocast for training and leaves it on: a reward model's
    held-out accuracy and probes (what the PPO gate reads) were scored in bf16 on a GPU while every later reader
    (load_reward_model) scores without it. Run in a process of its own: accelerate's state is one per process."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import os, torch
        from accelerate import Accelerator
        from align.gpu_training import without_training_autocast

        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model, sharded = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Sequential(torch.nn.Linear(4, 4))
        seen = []  # what the layer inside computes in (the wrapper hands its outputs back in fp32)
        for m in (model, sharded):
            m[0].register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
            accelerator.prepare_model(m)(torch.ones(1, 4))
        without_training_autocast(model)
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # FSDP's forward is its own: left as it is
        without_training_autocast(sharded)
        model(torch.ones(1, 4))
        sharded(torch.ones(1, 4))
        print(" ".join(seen))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.bfloat16"]
