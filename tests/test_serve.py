"""`align serve`: every adapter of a run on one base behind an OpenAI-compatible endpoint, called with
the `openai` client package over real HTTP.

The run holds real peft adapters on the tiny model with random LoRA weights (each changes the
answers from the first token): sft, dpo and round-1/dpo, and an unfinished ppo/ (no align.json)
that must be left out. The server runs from a thread of the test process (uvicorn, as `align
serve` runs it); one test starts `align serve` itself as a process and stops it with Ctrl-C. The
Playground tab's client (align/labeling/playground.py) is tested against the same server here; the tab
itself in a browser in tests/labeling/test_playground_browser.py.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from served import load_engine, random_adapter, serve_config

from align.cli import main as align

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "How do I sync my notes?"}]
NAMES = ["sft", "dpo", "round-1/dpo", "base"]
LIMITS = ["limits.max_tokens=64", "limits.max_prompt_tokens=200", "limits.max_n=3", "limits.max_body_kb=16",
          "generation.max_new_tokens=16"]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-run")
    random_adapter(tiny_model, root / "sft", 1, stage="sft")
    random_adapter(tiny_model, root / "dpo", 2, stage="dpo")
    random_adapter(tiny_model, root / "round-1" / "dpo", 3, stage="dpo")
    random_adapter(tiny_model, root / "ppo", 4, stage=None)  # unfinished: no align.json
    return root


@pytest.fixture(scope="module")
def served(run):
    """(engine, cfg, url): the run's models served from a thread."""
    from align.labeling.server import running
    from align.openai_api import create_app

    cfg = serve_config(run, *LIMITS)
    engine = load_engine(cfg)
    with running(create_app(engine, cfg)) as url:
        yield engine, cfg, url + "/v1"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2], api_key="unused", max_retries=0)


def greedy(client, model: str, messages=PROMPT, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, **{"max_tokens": 16, "temperature": 0,
                                                                            **kwargs})


def streamed(client, model: str, **kwargs) -> tuple[dict[int, str], list]:
    chunks = list(client.chat.completions.create(model=model, messages=PROMPT, stream=True, **kwargs))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


def reference(tiny_model: str, adapter: Path | None, max_new_tokens: int = 16) -> str:
    """The greedy answer of the adapter alone on a freshly loaded base (peft's own loading), or of the plain base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = load_tokenizer(str(adapter or tiny_model))
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------- the API


def test_models_are_the_runs_finished_adapters_and_base(client, caplog):
    assert [m.id for m in client.models.list()] == NAMES  # ppo/ has no align.json: left out
    card = client.models.retrieve("round-1/dpo")
    assert card.id == "round-1/dpo" and card.owned_by == "align"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ppo")


def test_each_model_answers_as_it_does_alone_and_switching_leaks_nothing(client, run, tiny_model):
    """Interleaved requests: each model's greedy answer is the same every time, whatever ran before it,
    and equals that adapter loaded alone on a fresh base (base: the plain model's own generate)."""
    answers: dict[str, list[str]] = {}
    for name in ["sft", "dpo", "base", "round-1/dpo", "sft", "base", "dpo", "round-1/dpo", "sft"]:
        reply = greedy(client, name)
        assert reply.model == name and reply.object == "chat.completion"
        answers.setdefault(name, []).append(reply.choices[0].message.content)
    assert all(len(set(texts)) == 1 for texts in answers.values()), answers
    assert len({texts[0] for texts in answers.values()}) == 4, answers  # four different models
    folders = {"sft": run / "sft", "dpo": run / "dpo", "round-1/dpo": run / "round-1" / "dpo", "base": None}
    for name, folder in folders.items():
        assert answers[name][0] == reference(tiny_model, folder), name


def test_a_dora_adapter_is_served_beside_lora_ones(run, tiny_model, tmp_path):
    """A DoRA adapter beside LoRA ones: made active with set_adapter like them, skipped for `base` through
    peft's mixed-batch path (which refuses DoRA adapters by name, not `__base__`); every model answers as
    it does alone, in any order."""
    from align.chat_engine import Params

    dora = random_adapter(tiny_model, tmp_path / "dora", 7, stage="sft", dora=True)
    engine = load_engine(serve_config(run, "discover=false", f"adapters={{dora: {dora}, dpo: {run / 'dpo'}}}"))
    expected = {"dora": reference(tiny_model, dora), "dpo": reference(tiny_model, run / "dpo"),
                "base": reference(tiny_model, None)}
    assert len(set(expected.values())) == 3
    for name in ["dora", "dpo", "base", "dora", "base", "dpo", "dora"]:
        result = engine.run(engine.prepare(name, PROMPT, Params(max_tokens=16, temperature=0)))
        assert result.choices[0].text == expected[name], name


def test_base_is_served_beside_adapters_on_layers_that_refuse_mixed_batches(tiny_model):
    """On a MoE model all-linear adapts the fused expert weights (peft's lora.ParamWrapper), which refuse peft's
    mixed-batch adapter_names: every `base` request was a 500. There `base` runs with the adapters switched off
    (peft's disable_adapter), and the adapter's answers are its own before and after."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from align.chat_engine import ChatEngine, Params, unmixable_layers
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)).eval()
    prompt = torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]])

    def greedy(m) -> list[int]:
        return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                          top_k=None, pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()

    plain = greedy(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                           adapter_name="a0").eval()
    adapted = greedy(model)
    assert adapted != plain and unmixable_layers(model) == ["lora.ParamWrapper"]
    engine = ChatEngine(model, {"base": tokenizer, "sft": tokenizer}, {"base": None, "sft": "a0"},
                        max_prompt_tokens=200, max_waiting=4)
    expected = {name: tokenizer.decode(ids, skip_special_tokens=True) for name, ids in (("sft", adapted),
                                                                                     ("base", plain))}
    assert expected["sft"] != expected["base"]
    for name in ["sft", "base", "sft", "base"]:
        assert engine.run(engine.prepare(name, PROMPT, Params(max_tokens=8, temperature=0))).choices[0].text == \
            expected[name], name


def test_a_merged_model_served_alone_keeps_the_system_prompt_it_was_trained_with(tiny_model, tmp_path):
    """align merge records the adapter's system prompt in the merged folder; served as `base` (model.name=<the
    folder>) the prompt was left out, and the merged model answered otherwise than its adapter (27 prompt tokens
    against 54). It is added as it is for an adapter: when the request has no system message."""
    from align.chat_engine import Params

    merged = Path(shutil.copytree(tiny_model, tmp_path / "merged"))
    (merged / "align.json").write_text(json.dumps({"stage": "merge", "system_prompt": "You answer in one line."}))
    engine = load_engine(serve_config(tmp_path / "run", "discover=false", f"model.name={merged}"))
    params = Params(max_tokens=4, temperature=0)
    told = [{"role": "system", "content": "You answer in one line."}, *PROMPT]
    assert engine.prepare("base", PROMPT, params).prompt_ids == engine.prepare("base", told, params).prompt_ids
    assert engine.prepare("base", [{"role": "system", "content": "Other."}, *PROMPT], params).prompt_ids != \
        engine.prepare("base", told, params).prompt_ids  # a request's own system message is kept


def test_the_model_folders_decoding_settings_do_not_reach_a_request(tiny_model, tmp_path):
    """generate() fills every setting a call leaves unset from the model folder's generation_config.json,
    which may switch on sampling and processors (min_p, no_repeat_ngram_size, a repetition penalty, top_k):
    served, an answer depends on the request alone. Greedy is the plain model's greedy, and a seeded sample
    is plain softmax sampling, each as on the same model without those settings."""
    import torch
    from transformers import AutoModelForCausalLM

    from align.chat_engine import Params
    from align.modeling import load_tokenizer

    shipped = Path(shutil.copytree(tiny_model, tmp_path / "shipped"))
    settings = json.loads((shipped / "generation_config.json").read_text())
    settings.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, repetition_penalty=1.3,
                    no_repeat_ngram_size=2, min_p=0.2)
    (shipped / "generation_config.json").write_text(json.dumps(settings))
    engine = load_engine(serve_config(tmp_path, "discover=false", f"model.name={shipped}"))

    def served(**kwargs) -> str:
        return engine.run(engine.prepare("base", PROMPT, Params(max_tokens=16, **kwargs))).choices[0].text

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(tiny_model)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(7)
    out = model.generate(**ids, max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0)
    sampled = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)
    assert served(temperature=0) == reference(tiny_model, None)
    assert served(temperature=1.0, seed=7) == sampled
    assert engine.model.generation_config.min_p == 0.2  # the model's own, left as it was


def test_usage_and_finish_reason_length(client):
    reply = greedy(client, "sft", max_tokens=12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    default = client.chat.completions.create(model="sft", messages=PROMPT, temperature=0)
    assert default.usage.completion_tokens == 16  # generation.max_new_tokens


def test_a_stop_string_ends_the_answer_before_it(client):
    full = greedy(client, "dpo").choices[0].message.content
    start = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    cut = greedy(client, "dpo", stop=[stop, "never-there"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 16
    texts, _ = streamed(client, "dpo", max_tokens=16, temperature=0, stop=stop)
    assert texts[0] == full[:full.index(stop)]


def test_streaming_returns_the_same_text_as_one_reply(client):
    plain = greedy(client, "dpo")
    texts, chunks = streamed(client, "dpo", max_tokens=16, temperature=0, stream_options={"include_usage": True})
    assert texts == {0: plain.choices[0].message.content}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # pieces, as generated
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_a_seed_repeats_a_sampled_answer_and_n_gives_several(client):
    kwargs = {"max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    first = client.chat.completions.create(model="sft", messages=PROMPT, **kwargs)
    again = client.chat.completions.create(model="sft", messages=PROMPT, **kwargs)
    other = client.chat.completions.create(model="sft", messages=PROMPT, **{**kwargs, "seed": 8})
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts
    assert first.usage.completion_tokens == 36
    stream, _ = streamed(client, "sft", **kwargs)
    assert [stream[i] for i in range(3)] == texts


def test_n_greedy_answers_are_the_greedy_answer_n_times(client):
    # transformers refuses num_return_sequences > 1 without sampling; OpenAI answers it. A temperature
    # too small to divide by (1e-40 makes the logits inf) is greedy too, as in vLLM.
    one = greedy(client, "dpo").choices[0].message.content
    for temperature in (0, 1e-40):
        reply = greedy(client, "dpo", n=2, temperature=temperature)
        assert [c.message.content for c in reply.choices] == [one, one] and [c.index for c in reply.choices] == [0, 1]
    stream, _ = streamed(client, "dpo", max_tokens=16, temperature=0, n=2)
    assert stream == {0: one, 1: one}


def test_a_null_max_completion_tokens_leaves_max_tokens(served):
    body = {"model": "sft", "messages": PROMPT, "temperature": 0, "max_completion_tokens": None, "max_tokens": 3}
    reply = httpx.post(f"{served[2]}/chat/completions", json=body).json()
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    # a field this server does not know, sent as null by a client that writes every field: unset, not a 400
    reply = httpx.post(f"{served[2]}/chat/completions", json={**body, "reasoning_effort": None, "nonsense": None})
    assert reply.status_code == 200, reply.text


def test_a_left_out_max_tokens_is_the_default_as_far_as_the_context_goes(served, run, monkeypatch):
    """A request without max_tokens (the Playground sends none) gets generation.max_new_tokens lowered to
    the room the model's context leaves after the messages, rather than a refusal to lower a max_tokens it
    never sent; a max_tokens asked for beyond that room is refused, and so are messages that fill it."""
    from align.chat_engine import Params, RequestError
    from align.labeling.playground import ServeClient
    from align.labeling.server import running
    from align.openai_api import create_app

    engine = served[0]
    monkeypatch.setattr(engine, "max_prompt_tokens", 4096)  # the default: more than the tiny model's 512 positions
    long = [{"role": "user", "content": "How do I sync my notes? " * 24}]  # ~330 tokens: room for less than 256
    job = engine.prepare("sft", long, Params(max_tokens=256, temperature=0, default_max_tokens=True))
    assert job.params.max_tokens == engine.context - len(job.prompt_ids) < 256
    cfg = serve_config(run, *LIMITS, "generation.max_new_tokens=256", "limits.max_tokens=256")
    with running(create_app(engine, cfg)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="sft", messages=long, temperature=0)
        assert reply.usage.prompt_tokens == len(job.prompt_ids)
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= engine.context
        assert "".join(ServeClient(url + "/v1").stream("sft", long, temperature=0)) == reply.choices[0].message.content
        err = _error(lambda: client.chat.completions.create(model="sft", messages=long, max_tokens=256))
        assert err.status_code == 400 and err.param == "max_tokens" and err.code == "context_length_exceeded"
    monkeypatch.setattr(engine, "context", len(job.prompt_ids))
    with pytest.raises(RequestError, match="maximum context length") as full:
        engine.prepare("sft", long, Params(max_tokens=256, temperature=0, default_max_tokens=True))
    assert full.value.param == "messages" and full.value.code == "context_length_exceeded"


def test_a_request_past_the_models_context_is_refused_in_openais_words(client, served, monkeypatch):
    """The model's positions (the tiny model's 512, lowered here to just past the prompt) bound the messages
    and max_tokens together: past them a 400 context_length_exceeded worded as OpenAI words it, naming
    max_tokens, or the messages when they alone fill the context; a left-out max_tokens (the server's 16)
    is lowered to the room left and answers."""
    engine = served[0]
    from align.chat_engine import Params

    prompt = len(engine.prepare("sft", PROMPT, Params(max_tokens=1, temperature=0)).prompt_ids)
    monkeypatch.setattr(engine, "context", prompt + 5)
    err = _error(lambda: greedy(client, "sft", max_tokens=16))
    assert isinstance(err, openai.BadRequestError) and err.status_code == 400
    assert err.type == "invalid_request_error" and err.param == "max_tokens" and err.code == "context_length_exceeded"
    newer = _error(lambda: client.chat.completions.create(model="sft", messages=PROMPT, max_completion_tokens=16))
    assert newer.param == "max_completion_tokens" and newer.code == "context_length_exceeded"  # the name it was sent by
    assert err.body["message"] == (
        f"This model's maximum context length is {prompt + 5} tokens. However, you requested {prompt + 16} tokens "
        f"({prompt} in the messages, 16 in the completion). Please reduce the length of the messages or completion.")
    reply = client.chat.completions.create(model="sft", messages=PROMPT, temperature=0)  # no max_tokens: 5 at most
    assert reply.usage.prompt_tokens == prompt and 1 <= reply.usage.completion_tokens <= 5
    assert reply.choices[0].finish_reason in ("stop", "length")
    monkeypatch.setattr(engine, "context", prompt)  # no room for one token, whatever max_tokens says
    for kwargs in ({"max_tokens": 1}, {}):
        err = _error(lambda kwargs=kwargs: client.chat.completions.create(model="sft", messages=PROMPT, **kwargs))
        assert err.status_code == 400 and err.param == "messages" and err.code == "context_length_exceeded"
        assert err.body["message"] == (f"This model's maximum context length is {prompt} tokens. However, your "
                                       f"messages resulted in {prompt} tokens. Please reduce the length of the messages.")


def test_limits_past_the_models_context_are_a_warning_at_start(run, tiny_model, tmp_path, caplog, monkeypatch):
    """limits.max_prompt_tokens + limits.max_tokens (4096 + 1024 by default) beyond the model's positions
    (the tiny model's 512) is said once at start, on either backend, and the server still starts; within
    them (200 + 64) nothing is said. vLLM's --max-model-len is the positions then."""
    from align.serving import _max_positions, vllm_command

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "positions" in r.getMessage()]

    alone = ["discover=false", f"model.name={tiny_model}"]
    load_engine(serve_config(run, *alone, *LIMITS))
    assert warnings() == []
    engine = load_engine(serve_config(run, *alone))
    assert warnings() == [f"limits.max_prompt_tokens=4096 + limits.max_tokens=1024 is more than the 512 positions of "
                          f"{tiny_model}: a request for both is refused (a 400), one that leaves out max_tokens gets "
                          "what the context leaves; set the two to 512 or less in all for limits that say so"]
    assert engine.context == 512 and engine.names() == ["base"]
    caplog.clear()
    command = vllm_command({}, tiny_model, serve_config(run, *alone), 8123)
    assert command[command.index("--max-model-len") + 1] == "512" and len(warnings()) == 1
    # a base under the home folder, written with ~, is that folder (vLLM took "~/..." for a Hub id)
    monkeypatch.setenv("HOME", str(Path(tiny_model).parent))
    command = vllm_command({}, f"~/{Path(tiny_model).name}", serve_config(run, *alone), 8123)
    assert command[command.index("serve") + 1] == str(Path(tiny_model).resolve())
    gpt2 = tmp_path / "gpt2"  # GPT-2's config.json names its positions n_positions
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    assert _max_positions(str(gpt2)) == 1024


def test_vllm_gets_a_hub_bases_own_positions_from_the_cache(run, tmp_path, monkeypatch, caplog):
    """A Hub id's positions come from its cached config.json (vLLM refuses a --max-model-len past them: limits'
    4096 + 1024 against TinyLlama's 2048), a multimodal config's from its text_config; a base whose config is
    not to be had is said at start, and vLLM gets limits' context."""
    from huggingface_hub import constants

    from align.serving import _max_positions, vllm_command

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def cached(repo: str, config: dict) -> None:
        folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(config))

    cached("TinyLlama/TinyLlama-1.1B-Chat-v1.0", {"model_type": "llama", "max_position_embeddings": 2048})
    cached("org/vision-chat", {"model_type": "llava", "text_config": {"max_position_embeddings": 8192}})
    cfg = serve_config(run, "discover=false", "model.name=TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    command = vllm_command({}, "TinyLlama/TinyLlama-1.1B-Chat-v1.0", cfg, 8123)
    assert command[command.index("--max-model-len") + 1] == "2048"
    assert _max_positions("org/vision-chat") == 8192
    caplog.clear()
    assert _max_positions("org/not-cached") is None
    assert any("positions of org/not-cached are unknown" in r.getMessage() for r in caplog.records)


def test_text_parts_developer_and_assistant_turns_go_through_the_chat_template(client, served):
    engine = served[0]
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "How do I "}, {"type": "text", "text": "sync?"}]},
             {"role": "assistant", "content": "Open Settings."}, {"role": "user", "content": "And then?"}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I sync?"},
             {"role": "assistant", "content": "Open Settings."}, {"role": "user", "content": "And then?"}]
    from align.chat_engine import Params

    ids = engine.prepare("sft", plain, Params(max_tokens=4, temperature=0)).prompt_ids
    assert greedy(client, "sft", messages=parts).usage.prompt_tokens == len(ids)
    template = engine.tokenizers["sft"].decode(ids)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in template and template.endswith("<|im_start|>assistant\n")


def test_a_reply_message_sent_back_as_it_is_continues_the_conversation(client):
    """A client that appends the reply's message as the openai package gives it (the object, or its
    model_dump(): refusal, tool_calls, audio, ... all null) gets the answer to the plain {role, content}
    turn; an unsupported field that holds something is still refused, naming it."""
    message = greedy(client, "sft").choices[0].message
    dumped = message.model_dump()
    assert dumped["tool_calls"] is None and dumped["refusal"] is None
    follow = {"role": "user", "content": "And on Android?"}
    plain = greedy(client, "sft", messages=[*PROMPT, {"role": "assistant", "content": message.content}, follow])
    for sent in (message, dumped, {**dumped, "annotations": [], "audio": {}, "refusal": ""}):
        reply = greedy(client, "sft", messages=[*PROMPT, sent, follow])
        assert reply.choices[0].message.content == plain.choices[0].message.content
        assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    called = {**dumped, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    err = _error(lambda: greedy(client, "sft", messages=[*PROMPT, called, follow]))
    assert err.status_code == 400 and err.param == "messages[1].tool_calls", err.body


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(("kwargs", "status", "param", "code"), [
    ({"model": "nope"}, 404, "model", "model_not_found"),
    ({"max_tokens": 65}, 400, "max_tokens", None),
    ({"max_tokens": 0}, 400, "max_tokens", None),
    ({"max_completion_tokens": 1000}, 400, "max_completion_tokens", None),
    ({"temperature": 2.5}, 400, "temperature", None),
    ({"top_p": 0}, 400, "top_p", None),
    ({"n": 4}, 400, "n", None),
    ({"seed": 2**70}, 400, "seed", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": ["user"], "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": {}, "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "sync " * 300}]}, 400, "messages", "context_length_exceeded"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ({"logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"extra_body": {"nonsense": 1}}, 400, "nonsense", "unknown_parameter"),
], ids=lambda v: str(v)[:40])
def test_bad_requests_are_openai_errors_naming_the_field(client, kwargs, status, param, code):
    request = {"model": "sft", "messages": PROMPT, "max_tokens": 8, **kwargs}
    err = _error(lambda: client.chat.completions.create(**request))
    assert err.status_code == status and err.param == param and err.code == code, err.body
    assert err.type == "invalid_request_error" and "Traceback" not in err.response.text


def test_refusals_before_the_json_is_read(served):
    url = served[2]
    big = json.dumps({"model": "sft", "messages": [{"role": "user", "content": "x" * 20_000}]})
    with httpx.Client() as http:
        cases = [
            http.post(f"{url}/chat/completions", content=big, headers={"Content-Type": "application/json"}),
            # chunked, no Content-Length: counted as it arrives
            http.post(f"{url}/chat/completions", content=iter([big.encode()[i:i + 4096] for i in range(0, len(big), 4096)]),
                      headers={"Content-Type": "application/json"}),
            http.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
            http.post(f"{url}/chat/completions", content=b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                      headers={"Content-Type": "application/json"}),  # deeper than json.loads recurses
            http.post(f"{url}/chat/completions", content=b'{"model": "sft", "max_tokens": ' + b"9" * 5000 + b"}",
                      headers={"Content-Type": "application/json"}),  # longer than Python converts to an int
            # lone surrogates: in a message (the tokenizer cannot encode it), in a name an error reply would quote
            http.post(f"{url}/chat/completions", content=b'{"model": "sft", "messages": [{"role": "user", '
                      b'"content": "hi \\ud800"}]}', headers={"Content-Type": "application/json"}),
            http.post(f"{url}/chat/completions", content=b'{"model": "\\ud800", "messages": []}',
                      headers={"Content-Type": "application/json"}),
            http.post(f"{url}/chat/completions", content=b'{"model": "sft"}', headers={"Content-Type": "text/plain"}),
            http.get(f"{url}/no/such/path"),
            http.delete(f"{url}/models"),
        ]
    assert [r.status_code for r in cases] == [413, 413, 400, 400, 400, 400, 400, 415, 404, 405]
    assert "surrogate" in cases[5].json()["error"]["message"]
    assert "more than 4300 digits" in cases[4].json()["error"]["message"]
    for response in cases:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_failure_is_a_500_without_the_traceback(served, client, monkeypatch):
    engine = served[0]

    def broken(*args, **kwargs):
        raise RuntimeError("/very/secret/path leaked")

    monkeypatch.setattr(engine, "run", broken)
    err = _error(lambda: greedy(client, "sft"))
    assert err.status_code == 500 and err.type == "server_error"
    assert "secret" not in err.response.text and "Traceback" not in err.response.text
    chunks = client.chat.completions.create(model="sft", messages=PROMPT, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError) as caught:
        list(chunks)
    assert "secret" not in str(caught.value)


def test_a_full_queue_is_503_and_the_waiting_request_still_runs(served, client, monkeypatch):
    engine = served[0]
    monkeypatch.setattr(engine, "max_waiting", 0)
    answers = []
    with engine._lock:  # a generation under way
        waiting = threading.Thread(target=lambda: answers.append(greedy(client, "sft")))
        waiting.start()
        deadline = time.monotonic() + 10
        while engine._inside < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        err = _error(lambda: greedy(client, "dpo"))
        assert err.status_code == 503 and err.code == "server_busy"
        stream = _error(lambda: client.chat.completions.create(model="dpo", messages=PROMPT, stream=True))
        assert stream.status_code == 503  # refused before the stream starts
        # refused before its chat template and tokenizer run: a flood of big bodies costs no tokenizing
        long = [{"role": "user", "content": "sync " * 300}]
        assert _error(lambda: greedy(client, "dpo", messages=long)).status_code == 503
    waiting.join(timeout=30)
    assert answers and answers[0].choices[0].finish_reason == "length" and engine._inside == 0
    # a request refused after it was counted in is counted out
    assert _error(lambda: greedy(client, "dpo", messages=long)).code == "context_length_exceeded"
    assert engine._inside == 0


def test_a_stream_queued_behind_a_generation_keeps_its_client_reading(served, monkeypatch):
    """A streamed request waiting its turn got its first chunk, then no byte until the generation before it
    ended: the Playground's client (a 120 s read timeout) gave up on it behind a few long answers. Now it
    is sent an SSE comment while it waits, which the openai client skips as its parser does."""
    import align.openai_api as api

    engine = served[0]
    monkeypatch.setattr(api, "KEEPALIVE_S", 0.2)
    lines = []
    with engine._lock:  # a generation under way: the request waits 1.5 s, more than its client's read timeout
        def waiting():
            with httpx.Client(timeout=httpx.Timeout(1.0)) as http, http.stream(
                    "POST", f"{served[2]}/chat/completions", json={"model": "sft", "messages": PROMPT,
                                                                   "max_tokens": 4, "stream": True}) as response:
                lines.extend(response.iter_lines())

        thread = threading.Thread(target=waiting)
        thread.start()
        time.sleep(1.5)
    thread.join(timeout=30)
    assert ": waiting" in lines and "data: [DONE]" in lines, lines  # a read timeout: no [DONE]
    # sampled at the default temperature, unseeded: 4 tokens, or an end of turn before them
    assert any('"finish_reason": "length"' in line or '"finish_reason": "stop"' in line for line in lines)


def test_a_client_that_goes_away_stops_its_generation(served):
    from align.chat_engine import Params

    engine = served[0]
    job = engine.prepare("sft", PROMPT, Params(max_tokens=64, temperature=0))
    result = engine.run(job, on_text=lambda index, piece: job.cancelled.set())  # gone after the first piece
    assert result.choices[0].tokens < 8
    # and over HTTP: a stream dropped after its first chunk leaves the server serving
    with httpx.Client() as http, http.stream("POST", f"{served[2]}/chat/completions", json={
            "model": "sft", "messages": PROMPT, "max_tokens": 64, "stream": True}) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while engine._inside and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine._inside == 0
    # the rows' adapters are cleared once a call ends, however it ended; one hook per LoRA layer, never more
    assert engine._rows is None
    assert {len(m._forward_pre_hooks) for m in engine.model.modules() if hasattr(m, "lora_A")} == {1}


def test_a_client_that_goes_away_before_its_whole_answer_stops_its_generation(served, monkeypatch):
    """A non-streamed request whose client gave up (its read timeout: the openai client then sends it again)
    ran to max_tokens for nobody, holding the one generation lock from everyone behind it. Now it stops at the
    next token, or at once when it was still waiting for its turn."""
    from align import chat_engine

    engine = served[0]
    run, generated = engine.run, []

    def recorded(job, on_text=None):
        result = run(job, on_text)
        generated.append(result.completion_tokens)
        return result

    def gone(body):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served[2]}/chat/completions", json=body, timeout=httpx.Timeout(0.7))

    def settled():
        deadline = time.monotonic() + 30
        while (not generated or engine._inside) and time.monotonic() < deadline:
            time.sleep(0.02)

    prepare, jobs = engine.prepare, []

    def kept(*args, **kwargs):
        jobs.append(prepare(*args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(engine, "run", recorded)
    monkeypatch.setattr(engine, "prepare", kept)
    body = {"model": "sft", "messages": PROMPT, "max_tokens": 64, "temperature": 0}
    with engine._lock:  # a generation under way: the request waits its turn, and its client goes
        gone(body)
        deadline = time.monotonic() + 10
        while not jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs[0].cancelled.wait(10)  # the server saw it go before its turn came (a fixed 0.3 s was a race)
    settled()
    assert generated == [0], generated
    progress = chat_engine._Progress.__call__

    def slow(self, *args, **kwargs):  # a token every 50 ms, as on a real model: 64 of them take 3 s
        time.sleep(0.05)
        return progress(self, *args, **kwargs)

    monkeypatch.setattr(chat_engine._Progress, "__call__", slow)
    generated.clear()
    gone(body)
    settled()
    assert len(generated) == 1 and generated[0] < 32, generated
    assert greedy(openai.OpenAI(base_url=served[2], api_key="unused", max_retries=0), "sft", max_tokens=4
                  ).usage.completion_tokens == 4  # a client that stays gets its whole answer


def test_an_api_key_is_required_when_set(served):
    from align.labeling.server import running
    from align.openai_api import create_app

    engine, cfg = served[0], served[1]
    key = "test-key-0123456789"
    with running(create_app(engine, cfg, api_key=key)) as url:
        with pytest.raises(openai.AuthenticationError) as wrong:
            openai.OpenAI(base_url=url + "/v1", api_key="nope-nope-nope", max_retries=0).models.list()
        assert wrong.value.code == "invalid_api_key"
        missing = httpx.get(url + "/v1/models")
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200  # says it is up, nothing else
        good = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert greedy(good, "base").choices[0].finish_reason == "length"
        # with a key, any Host name is fine (a reverse proxy may use its own)
        assert httpx.get(url + "/v1/models", headers={"Host": "models.example", "Authorization": f"Bearer {key}"}
                         ).status_code == 200
    # without a key (loopback only) a page that rebinds another name to 127.0.0.1 is refused
    rebound = httpx.get(served[2] + "/models", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 400 and httpx.get(served[2] + "/models",
                                                    headers={"Host": "localhost:8000"}).status_code == 200


def test_a_key_pasted_with_spaces_or_a_newline_is_the_key_without_them(tmp_path, monkeypatch):
    """HTTP strips a header value, so a client sends the key without the spaces or newline it was pasted
    with: the server reads and compares it without them too (it refused everyone with them)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from align.openai_api import Guard
    from align.serving import api_key

    inner = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("ok"))])
    for pasted in (" a-long-enough-key", "a-long-enough-key \n"):
        monkeypatch.setenv("ALIGN_SERVE_API_KEY", pasted)
        key = api_key(serve_config(tmp_path))
        assert key == "a-long-enough-key"
        for guarded in (Guard(inner, api_key=key, loopback=True), Guard(inner, api_key=pasted, loopback=True)):
            client = TestClient(guarded)
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert client.get("/v1/models", headers={"Authorization": "Bearer a-long-enough"}).status_code == 401
    monkeypatch.setenv("ALIGN_SERVE_API_KEY", "   ")
    assert api_key(serve_config(tmp_path)) == ""  # refused by preflight as too short, not taken as no key


def test_without_a_key_any_loopback_address_is_a_host_and_no_other_name(served):
    """`align serve` listens without a key on any loopback address (host=127.0.0.2 too); it answers to
    such an address or localhost in the Host header, and still refuses another name (DNS rebinding)."""
    from align.labeling.server import running
    from align.openai_api import create_app

    engine, cfg = served[0], served[1]
    with running(create_app(engine, cfg), host="127.0.0.2") as url:
        assert httpx.get(url + "/v1/models").status_code == 200
        for host in ("127.9.9.9", "[::1]:8000", "LOCALHOST:8000"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "127.0.0.1.attacker.example", "localhost.attacker.example:8000", "0.0.0.0"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 400, host


# ---------------------------------------------------------------------------- pieces of an answer


def test_pieces_hold_back_a_stop_string_and_half_characters(tiny_model):
    from align.chat_engine import _Row
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    eos = {tokenizer.eos_token_id}
    ids = tokenizer("Thanks for reaching out! Open Settings.", add_special_tokens=False)["input_ids"]
    row = _Row(tokenizer, threading.Lock(), eos, ["Open Set"], 100)
    pieces = [row.feed(i) for i in ids[:-1]]
    assert "".join(pieces) == "Thanks for reaching out! " and row.reason == "stop" and row.text == "Thanks for reaching out! "
    row = _Row(tokenizer, threading.Lock(), eos, [], 100)
    text = "Café ☕ naïve"  # multi-byte characters: byte-level tokens that split them decode to U+FFFD alone
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [row.feed(i) for i in ids] + [row.feed(tokenizer.eos_token_id)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert row.reason == "stop" and row.count == len(ids) + 1
    row = _Row(tokenizer, threading.Lock(), eos, [], len(ids))
    pieces = [row.feed(i) for i in ids] + [row.finish()]
    assert "".join(pieces) == text and row.reason == "length"


# ---------------------------------------------------------------------------- what is served, checked first


def test_names_and_bases_are_checked_before_anything_loads(run, tiny_model, tmp_path, monkeypatch):
    from align import StageError
    from align.config import ConfigError
    from align.preflight import check_stage
    from align.serving import served_models

    check_stage("serve", serve_config(run))
    other_base = Path(shutil.copytree(tiny_model, tmp_path / "other-base"))
    elsewhere = random_adapter(str(other_base), tmp_path / "elsewhere", 5, base_model=str(other_base))
    reward = Path(shutil.copytree(run / "sft", tmp_path / "reward"))  # a reward model's folder, by its align.json
    (reward / "align.json").write_text(json.dumps({**json.loads((reward / "align.json").read_text()), "stage": "reward"}))
    cases = [
        (ConfigError, [f"adapters={{rm: {reward}}}"], "the output of `align reward`"),
        (ConfigError, ["adapters={base: %s}" % (run / "sft")], "`base` is the base model"),
        (ConfigError, ["adapters={sft: %s}" % (run / "dpo")], "already serves"),
        (ConfigError, ["adapters={'my model': %s}" % (run / "dpo")], "letters, digits"),
        (ConfigError, [f"adapters={{far: {elsewhere}}}"], "different base models"),
        (ConfigError, [f"model.name={other_base}"], "the adapters were trained on"),
        (ConfigError, [f"adapters={{gone: {tmp_path / 'gone'}}}"], "no such folder"),
        (ConfigError, ["host=0.0.0.0"], "ALIGN_SERVE_API_KEY"),
        (ConfigError, ["host=0.0.0.0", "api_key=a-long-enough-key", "generation.backend=vllm"],
         "vLLM's API key guards only its /v1 routes"),
        (ConfigError, ["api_key=short"], "too short"),
        (ConfigError, ["limits.max_waiting=40"], "limits.max_waiting"),
    ]
    monkeypatch.delenv("ALIGN_SERVE_API_KEY", raising=False)
    for error, overrides, said in cases:
        with pytest.raises(error, match=said.replace("(", r"\(")):
            check_stage("serve", serve_config(run, *overrides))
    monkeypatch.setenv("ALIGN_SERVE_API_KEY", "a-long-enough-key")
    check_stage("serve", serve_config(run, "host=0.0.0.0"))  # with a key it may listen beyond loopback
    for empty in (tmp_path / "empty-run", tmp_path / "no-such-run"):
        empty.mkdir(exist_ok=empty.name == "empty-run")
        with pytest.raises(StageError, match="align sft run.dir="):
            check_stage("serve", serve_config(empty))
    assert list(served_models(serve_config(run, "discover=false", f"adapters={{dpo: {run / 'dpo'}}}"))) == ["dpo"]


def test_cli_refusals_are_one_line_and_exit_codes(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGN_SERVE_API_KEY", raising=False)
    assert align(["serve", f"run.dir={run}", "host=0.0.0.0"]) == 2
    assert "host=0.0.0.0: binding beyond this machine needs an API key" in capsys.readouterr().err
    assert align(["serve", f"run.dir={tmp_path}"]) == 1
    assert "no finished adapter" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert align(["serve", f"run.dir={run}", "generation.backend=vllm"]) == 1
        assert "generation.backend=vllm needs a CUDA GPU" in capsys.readouterr().err


def test_vllm_command_serves_the_same_names_on_one_base(run, tiny_model, tmp_path, monkeypatch):
    """vLLM cannot run here (no GPU): the command is checked, and run by a stand-in `vllm` package that records it."""
    from align.recipes.serve import run_vllm
    from align.serving import served_models, shared_base, vllm_command

    random_adapter(tiny_model, tmp_path / "wide", 6, r=12, stage="dpo")
    cfg = serve_config(run, *LIMITS, f"adapters={{wide: {tmp_path / 'wide'}}}", "generation.temperature=0.7")
    models = served_models(cfg)
    command = vllm_command(models, shared_base(models, cfg), cfg, 8123)
    assert command[1:6] == ["-P", "-m", "vllm.entrypoints.cli.main", "serve", tiny_model]

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--served-model-name") == "base" and value("--port") == "8123" and value("--host") == "127.0.0.1"
    assert value("--max-lora-rank") == "16" and value("--max-loras") == "4"  # r=12 rounds up to vLLM's 16
    assert value("--max-model-len") == "264"  # max_prompt_tokens + max_tokens, under the model's 512 positions
    # vLLM reads max_new_tokens as every request's ceiling (not a default): limits.max_tokens, not 16
    assert json.loads(value("--override-generation-config")) == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64}
    assert json.loads(value("--allowed-origins")) == []  # vLLM's CORS allows every origin unless told
    assert "--enable-lora" in command and value("--generation-config") == "vllm"
    modules = [json.loads(m) for m in command[command.index("--lora-modules") + 1:][:4]]
    assert [(m["name"], m["base_model_name"]) for m in modules] == [
        ("sft", "base"), ("dpo", "base"), ("round-1/dpo", "base"), ("wide", "base")]
    assert modules[3]["path"] == str((tmp_path / "wide").resolve())

    stub = tmp_path / "stub" / "vllm" / "entrypoints" / "cli"
    stub.mkdir(parents=True)
    for folder in (stub, stub.parent, stub.parent.parent):
        (folder / "__init__.py").write_text("")
    record = tmp_path / "vllm-was-called.json"
    (stub / "main.py").write_text(
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}}))\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'stub'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    key = "vllm-key-0123456789"
    run_vllm(models, shared_base(models, cfg), cfg, key, 8123, [*models, "base"])
    called = json.loads(record.read_text())
    assert called["argv"] == command[4:] and called["key"] == key and key not in " ".join(called["argv"])


# ---------------------------------------------------------------------------- `align serve` itself


def test_align_serve_starts_prints_how_to_call_it_and_stops_on_ctrl_c(run, tmp_path):
    key = "cli-key-0123456789"
    env = {**os.environ, "ALIGN_SERVE_API_KEY": key, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "align.cli", "serve", f"run.dir={run}", "port=0", *LIMITS],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    printed: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda pipe=pipe, into=into: into.extend(pipe), daemon=True)
               for pipe, into in ((child.stdout, printed), (child.stderr, errors))]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("serving on" in line for line in printed):
            assert child.poll() is None and time.monotonic() < deadline, "".join(errors)
            time.sleep(0.1)
        url = next(line for line in printed if "serving on" in line).split()[2]
        # a stage that another process is writing beside the server (no align.json yet)
        (run / "reward").mkdir()
        (run / "reward" / "adapter_model.safetensors").write_bytes(b"half-written")
        reply = greedy(openai.OpenAI(base_url=url, api_key=key, max_retries=0), "round-1/dpo")
        assert reply.choices[0].finish_reason == "length"
        # the two printed snippets, pasted into a shell as they are, with the key in the environment
        text = "".join(printed)
        curl = text[text.index("curl "):text.index("\n\n", text.index("curl "))]
        python = text[text.index("python -c '"):text.index(")'\n", text.index("python -c '")) + 2]
        shell = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        ran = [subprocess.run(["bash", "-c", snippet], env=shell, capture_output=True, text=True, timeout=120)
               for snippet in (curl, python)]
        assert [r.returncode for r in ran] == [0, 0], [r.stderr for r in ran]
        # The snippet samples at the server's default temperature, unseeded: the tiny model ends its answer early
        # now and then (CI saw "stop" once), so either ending is an answer
        answered = json.loads(ran[0].stdout)
        assert answered["object"] == "chat.completion" and isinstance(answered["choices"][0]["message"]["content"], str)
        assert answered["choices"][0]["finish_reason"] in ("length", "stop")
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    for reader in readers:
        reader.join(timeout=10)
    out, err = "".join(printed), "".join(errors)
    printed_all = out
    assert child.returncode == 0 and "align serve: stopped" in out and "Traceback" not in err, err
    assert "models: sft, dpo, round-1/dpo, base" in printed_all
    assert f"curl {url}/chat/completions" in printed_all and "from openai import OpenAI" in printed_all
    assert key not in printed_all + err  # the key is never printed
    assert "left out" in err and "ppo" in err  # the unfinished ppo/ is named
    assert (run / "reward" / "adapter_model.safetensors").is_file()  # Ctrl-C tidies nobody else's folder
    shutil.rmtree(run / "reward")


def shut_down_while_answering(engine, cfg, requests: list[tuple[str, bool]]) -> list[tuple[int, list]]:
    """Ctrl-C as `align serve` takes it (align/recipes/serve.py's server, its handle_exit) while the first of
    `requests` (model, stream) is being generated and the others wait behind it: each one's status and
    what it got, the JSON body or the stream's events."""
    from align.openai_api import create_app
    from align.recipes.serve import bind, make_server

    listener = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"
    server = make_server(create_app(engine, cfg), engine)
    serving = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    serving.start()
    got: list = [None] * len(requests)

    def ask(i: int, model: str, stream: bool) -> None:
        body = {"model": model, "messages": PROMPT, "max_tokens": 64, "temperature": 0, "stream": stream}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            if not stream:
                got[i] = (response.status_code, [json.loads(response.read())])
                return
            got[i] = (response.status_code, [json.loads(line[5:]) for line in response.iter_lines()
                                             if line.startswith("data:") and line != "data: [DONE]"])

    askers = [threading.Thread(target=ask, args=(i, *r), daemon=True) for i, r in enumerate(requests)]
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for i, asker in enumerate(askers):
            asker.start()
            while engine._inside <= i and time.monotonic() < deadline:  # counted in: running or waiting
                time.sleep(0.02)
        time.sleep(0.5)  # the first answer is a few tokens in
        server.handle_exit(signal.SIGINT, None)
        for asker in askers:
            asker.join(timeout=30)
        serving.join(timeout=30)
    finally:
        engine.closing.clear()  # the engine is the module's, served on
    assert not serving.is_alive() and engine._inside == 0
    return got


def test_ctrl_c_never_sends_a_cut_answer_as_finished(served, monkeypatch):
    """Ctrl-C stops the answer being generated at its next token. It did not end there, so it is not
    sent as one that did (finish_reason stop, status 200, as it was): a 503 with OpenAI's error body,
    or in a stream an error event; the requests waiting behind it are refused the same way."""
    from align.chat_engine import _Progress

    engine, cfg = served[0], served[1]
    step = _Progress.__call__

    def paced(self, input_ids, scores, **kwargs):  # a token every 50 ms, as on a real model: 64 take seconds
        time.sleep(0.05)
        return step(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(_Progress, "__call__", paced)
    for requests in ([("sft", False), ("dpo", True), ("base", False)], [("dpo", True), ("sft", False)]):
        got = shut_down_while_answering(engine, cfg, requests)
        for (model, stream), (status, events) in zip(requests, got, strict=True):
            reasons = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
            assert "stop" not in reasons and "length" not in reasons, (model, events)
            error = events[-1]["error"]
            assert (status, error["code"], error["type"]) == (200 if stream else 503, "server_shutting_down",
                                                              "server_error"), (model, events)
            assert "shutting down" in error["message"]
        first = got[0][1][-1]["error"]["message"]
        assert "cut off" in first  # the one being generated; those waiting were not started


def test_a_port_in_use_is_refused_before_the_model_loads(run, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert align(["serve", f"run.dir={run}", f"port={port}"]) == 2
    assert f"port={port}: cannot listen there" in capsys.readouterr().err


def test_a_host_not_of_this_machine_is_named_not_the_port(run, capsys, monkeypatch):
    """host=nosuchhost.invalid said "cannot listen there (Name or service not known); choose another port", and an
    address of another machine "(Cannot assign requested address)" with the same advice: no port would do."""
    import errno

    monkeypatch.setenv("ALIGN_SERVE_API_KEY", "k" * 32)  # a host that is not loopback needs a key first
    hosts = [("nosuchhost.invalid", "")]  # .invalid: a name that never resolves (RFC 6761)
    if _unassignable("192.0.2.1"):  # TEST-NET-1: no machine's own address
        hosts.append(("192.0.2.1", os.strerror(errno.EADDRNOTAVAIL)))
    for host, reason in hosts:
        assert align(["serve", f"run.dir={run}", f"host={host}", "port=0"]) == 2
        err = capsys.readouterr().err
        assert f"host={host}: cannot listen there ({reason}" in err and "give an address of this machine" in err
        assert "choose another port" not in err, err


def _unassignable(host: str) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------------- the Playground's client


def test_playground_client_lists_and_streams(served, client):
    from align.labeling.playground import ServeClient

    playground = ServeClient(served[2], max_tokens=16)
    assert playground.models() == NAMES
    assert "".join(playground.stream("dpo", PROMPT, temperature=0)) == greedy(client, "dpo").choices[0].message.content


def test_playground_send_answers_both_sides_as_escaped_text(served, client):
    from align.labeling.playground import ServeClient, send

    playground = ServeClient(served[2], max_tokens=16)
    steps = list(send(playground, ("sft", "base"), "How do I sync my notes? <b>now</b>", ([], []), temperature=0))
    left, right, left_html, right_html = steps[-1]
    assert [t["role"] for t in left] == ["user", "assistant"] and left[1]["model"] == "sft"
    assert left[1]["content"] == greedy(client, "sft", messages=[{"role": "user", "content": left[0]["content"]}]
                                        ).choices[0].message.content
    assert right[1]["content"] == greedy(client, "base", messages=[{"role": "user", "content": left[0]["content"]}]
                                         ).choices[0].message.content
    assert "&lt;b&gt;now&lt;/b&gt;" in left_html and "<b>now" not in left_html and "align-pg-assistant" in right_html
    # a second turn carries each side's own history; a failing side keeps its conversation and says why
    steps = list(send(playground, ("sft", "gone"), "And then?", (left, right), temperature=0))
    left2, right2, _, right_html2 = steps[-1]
    assert len(left2) == 4 and left2[:2] == left and right2 == right
    assert "does not exist here" in right_html2 and "align-error" in right_html2
    with pytest.raises(ValueError, match="type a message"):
        next(send(playground, ("sft", "dpo"), "  ", ([], [])))
    # the page's dropdowns take any value (Gradio forgets their choices on a restart): send checks the names
    for models in (("sft", None), ("sft", "../../v1/x?"), ("sft", ["dpo"])):
        with pytest.raises(ValueError, match="choose a model for each side"):
            next(send(playground, models, "Hi", ([], [])))
    # the turn limit holds for each side: a side that kept failing is not the measure of the other
    from align.labeling.playground import MAX_TURNS

    with pytest.raises(ValueError, match="Clear to start a new one"):
        next(send(playground, ("sft", "dpo"), "Hi", ([], [{"role": "user", "content": "x"}] * MAX_TURNS)))


def test_the_playground_says_when_an_answer_was_cut_at_the_token_limit(served, client):
    """An answer that stopped at max_tokens did not end there: its pane says so (as the labelling tasks
    do, handlers.text_html's cut_off), on that turn and the next ones."""
    from align.labeling.playground import ServeClient, conversation_html, send

    note = "cut off at the length limit"
    assert greedy(client, "sft", max_tokens=4).choices[0].finish_reason == "length"
    pieces = ServeClient(served[2], max_tokens=4).stream("sft", PROMPT, temperature=0)
    while True:
        try:
            next(pieces)
        except StopIteration as end:
            assert end.value == "length"
            break
    playground = ServeClient(served[2], max_tokens=4)
    left, right, left_html, right_html = list(send(playground, ("sft", "base"), "Hi", ([], []), temperature=0))[-1]
    assert left[-1]["cut_off"] and note in left_html and note in right_html
    left, _, left_html, _ = list(send(playground, ("sft", "base"), "And?", (left, right), temperature=0))[-1]
    assert left_html.count(note) == 2 and [t["role"] for t in left] == ["user", "assistant"] * 2
    assert note not in conversation_html([{"role": "assistant", "content": "Open Settings.", "model": "sft"}])


def test_an_abandoned_playground_send_stops_both_generations(served, monkeypatch):
    """Nobody reads the answers any more (the tab closed: Gradio closes the generator): both streams are
    closed and the server stops generating them, rather than holding its one generation lock for both
    answers to their end while Gradio's concurrency limit already lets the next send in."""
    from align.labeling.playground import ServeClient, send

    engine = served[0]
    run, generated = engine.run, []

    def paced(job, on_text=None):  # a token every 50 ms, as on a real model: 64 of them take seconds
        def slow(index, piece):
            time.sleep(0.05)
            on_text(index, piece)

        result = run(job, slow if on_text else None)
        generated.append(result.completion_tokens)
        return result

    monkeypatch.setattr(engine, "run", paced)
    steps = send(ServeClient(served[2], max_tokens=64), ("sft", "dpo"), "Tell me everything", ([], []),
                 temperature=0)
    next(steps)  # the first redraw
    steps.close()
    deadline = time.monotonic() + 30
    while (len(generated) < 2 or engine._inside) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(generated) == 2 and max(generated) < 10, generated  # each stopped within a few tokens


def test_the_playground_says_what_to_do_when_the_server_refuses_its_key_or_is_down(served):
    """A refused key showed the endpoint's own words, "send the header `Authorization: Bearer <key>`", which nobody
    on the page can do: the pane now names the variable `align label` reads it from. A server that is not up
    read "stopped answering" in the panes, as if it had answered before."""
    import socket

    from align.labeling.playground import PlaygroundError, ServeClient, send
    from align.labeling.server import running
    from align.openai_api import create_app

    engine, cfg = served[0], served[1]
    with running(create_app(engine, cfg, api_key="test-key-0123456789")) as url:
        for key in (None, "wrong-key-0123456789"):
            client = ServeClient(url + "/v1", key)
            with pytest.raises(PlaygroundError, match="restart it with ALIGN_SERVE_API_KEY set"):
                client.models()
            *_, left_html, _ = list(send(client, ("sft", "dpo"), "Hi", ([], [])))[-1]
            assert "answered" not in left_html and "401" in left_html and "ALIGN_SERVE_API_KEY" in left_html
        assert client.http.get(url + "/v1/models").status_code == 401
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    *_, left_html, right_html = list(send(ServeClient(f"http://127.0.0.1:{port}/v1"), ("sft", "dpo"), "Hi", ([], [])))[-1]
    assert "is not answering" in left_html and "align serve` running?" in right_html


def test_playground_fetches_only_its_url(tmp_path):
    from align.labeling.playground import PlaygroundError, ServeClient, check_url

    hits = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PlaygroundError, match="answered 302"):
            ServeClient(f"http://127.0.0.1:{server.server_port}/v1").models()
    finally:
        server.shutdown()
    assert hits == ["/v1/models"]  # the redirect was not followed
    for bad in ("ftp://host/v1", "http://user:pw@host/v1", "http://host/v1?x=1", "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            check_url(bad)


def test_a_vllm_server_slow_to_stop_is_stopped_harder_never_left_running():
    """After a Ctrl-C, align serve gave vLLM's server 60 s and then ended in a traceback (TimeoutExpired), leaving
    it running and holding the GPU; so did a second Ctrl-C. Now SIGTERM follows, then SIGKILL."""
    from align.recipes.serve import stop_child

    def server(ignored: str) -> subprocess.Popen:
        # the default handlers first: a pytest-xdist worker's children inherit SIGINT ignored
        child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                  "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                                  "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                                  f"for s in ({ignored}): signal.signal(s, signal.SIG_IGN)\n"
                                  "print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "up\n"
        return child

    polite = server("signal.SIGINT,")  # stops on SIGTERM
    assert stop_child(polite, grace=0.3, term_grace=5) == -signal.SIGTERM
    deaf = server("signal.SIGINT, signal.SIGTERM")
    assert stop_child(deaf, grace=0.3, term_grace=0.3) == -signal.SIGKILL
    quick = server("")
    assert stop_child(quick, grace=5) == -signal.SIGINT or quick.returncode == 1  # Python's KeyboardInterrupt: 1
    for child in (polite, deaf, quick):
        assert child.poll() is not None
        child.stdout.close()
