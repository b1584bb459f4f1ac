"""generate_answers: each answer says whether it ended (the policy sampled EOS) or was cut at max_new_tokens."""

from __future__ import annotations

from align.config import GenerationConfig
from align.generation import Policy, chat_prompt, generate, generate_answers
from align.modeling import load_tokenizer

PROMPTS = ["How do I sync?", "Where is export?", "Can I share a note?", "Why was I logged out?"]


def test_an_answer_is_finished_exactly_when_it_sampled_eos(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = load_tokenizer(tiny_model)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0, batch_size=2)
    policy = Policy(model, tokenizer, "tiny", tiny_model)
    cut = generate_answers(policy, PROMPTS, gen)
    assert [[a.text for a in row] for row in cut] == generate(policy, PROMPTS, gen)
    # The random tiny model never picks its EOS in 6 greedy steps: every answer is cut.
    assert not any(a.finished for row in cut for a in row)
    # The greedy tokens of each answer, then the first token of PROMPTS[0]'s made the EOS: that
    # answer ends at once, and each other one ends exactly if its greedy tokens reach that token.
    greedy = []
    for prompt in PROMPTS:
        ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(out[0, ids.shape[1]:].tolist())
    first = greedy[0][0]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
    ended = generate_answers(policy, PROMPTS, gen)
    assert ended[0][0].finished
    assert [row[0].finished for row in ended] == [first in ids for ids in greedy]


def test_an_answer_ends_at_any_eos_of_the_model_generation_config(tiny_model):
    """An instruct model that ends its turns with another EOS than the tokenizer's (Llama 3's <|eot_id|>,
    Qwen's <|endoftext|>) lists it in generation_config.json: the answer stops there and counts as finished,
    not run on to max_new_tokens and counted as cut."""
    from transformers import AutoModelForCausalLM

    from align.generation import stop_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = load_tokenizer(tiny_model)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0, batch_size=2)
    policy = Policy(model, tokenizer, "tiny", tiny_model)
    ids = tokenizer(chat_prompt(tokenizer, PROMPTS[0]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    first = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, -1].item()
    assert first != tokenizer.eos_token_id and not generate_answers(policy, PROMPTS[:1], gen)[0][0].finished
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    assert stop_ids(tokenizer, model.generation_config) == sorted({tokenizer.eos_token_id, first})
    answer = generate_answers(policy, PROMPTS[:1], gen)[0][0]
    assert answer.finished and answer.text == tokenizer.decode([first], skip_special_tokens=True).strip()


def test_nucleus_filter_keeps_exactly_what_transformers_top_p_keeps():
    import torch
    from transformers import TopPLogitsWarper

    from align.generation import NucleusFilter

    torch.manual_seed(0)
    # Rows from flat (the nucleus spans thousands of tokens: the full-sort path) to peaked (a few tokens).
    scores = torch.randn(32, 8000) * torch.linspace(0.3, 12, 32)[:, None]
    ids = torch.zeros(32, 1, dtype=torch.long)
    for top_p in (0.3, 0.9, 0.95, 0.99):
        ours = NucleusFilter(top_p)(ids, scores.clone())
        assert torch.equal(ours, TopPLogitsWarper(top_p)(ids, scores.clone()))
    kept = (ours > -float("inf")).sum(-1)
    assert kept.max() > NucleusFilter.candidates > kept.min()  # both paths ran


def test_sampling_matches_transformers_own_temperature_and_top_p(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = load_tokenizer(tiny_model)
    gen = GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.8, batch_size=len(PROMPTS), seed=3)
    ours = generate(Policy(model, tokenizer, "tiny", tiny_model), PROMPTS, gen, k=3)
    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    torch.manual_seed(3)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.8,
                         num_return_sequences=3, pad_token_id=tokenizer.pad_token_id,
                         top_k=None, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    theirs = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [a for row in ours for a in row] == [t.strip() for t in theirs]
    assert len({a for row in ours for a in row}) > len(PROMPTS)  # sampled, not greedy


def test_the_model_folders_decoding_settings_do_not_reach_sample_or_eval_answers(tiny_model):
    """generate() fills what a call leaves unset from the model's generation_config.json (Qwen2.5 ships a
    repetition_penalty of 1.05): align sample and eval answer by their generation settings alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    policy = Policy(model, load_tokenizer(tiny_model), "tiny", tiny_model)
    for gen, k in ((GenerationConfig(max_new_tokens=8, temperature=0.0, batch_size=2), 1),
                   (GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, batch_size=2, seed=5), 2)):
        clean = generate(policy, PROMPTS, gen, k=k)
        model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_p=0.5, top_k=2)
        assert generate(policy, PROMPTS, gen, k=k) == clean
        model.generation_config.update(repetition_penalty=None, no_repeat_ngram_size=None, min_p=None, top_k=None)


def test_a_dora_adapter_on_a_4bit_base_runs_as_trained_in_sample_eval_and_serve(tiny_model, tmp_path):
    """bitsandbytes repacks a 4-bit layer for its AVX512-BF16 CPU kernel on the first forward without gradients;
    peft's DoRA then dequantizes the repacked layout as a plain one for its weight norm, and the model answers with
    other logits than training computed (align.cpu.keep_4bit_for_dora). Every inference loader keeps the
    repack off under DoRA: its logits are training's, on the first forward and after it."""
    import torch
    from peft import PeftModel
    from served import load_engine, random_adapter, serve_config

    from align.config import EvalStageConfig, ModelConfig
    from align.generation import load_policy
    from align.modeling import device_plan, load_base_model
    from align.recipes.evaluate import load_adapters

    adapter = random_adapter(tiny_model, tmp_path / "run" / "sft", seed=3, dora=True)
    cfg = ModelConfig(name=tiny_model, quantize=True)
    plan = device_plan(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    trained = PeftModel.from_pretrained(load_base_model(cfg, plan), str(adapter)).eval()  # repack off, as trained
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    engine = load_engine(serve_config(tmp_path / "run", "model.quantize=true", "discover=false",
                                      f"adapters={{sft: {adapter}}}"))
    engine.model.set_adapter("a0")
    loaded = {"sample": load_policy(adapter, cfg, plan).model,
              "eval": load_adapters({"sft": adapter}, EvalStageConfig(model=cfg))[0],
              "serve": engine.model}
    for name, model in loaded.items():
        # The repack happens only on CPUs with AVX512-BF16 (bitsandbytes' has_avx512bf16): elsewhere the logits
        # below match either way, so the switch itself is checked too, whatever the machine.
        flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert flags and not any(flags), f"{name}: the repack is left on for {sum(flags)} of {len(flags)} layers"
        with torch.no_grad():
            for forward in ("first", "second"):
                diff = (model(input_ids=ids).logits - expected).abs().max().item()
                assert diff < 1e-4, f"{name}, {forward} forward: logits off training's by {diff:.3f}"


class Bar:
    """A tqdm that records where it stood after each update."""

    made: list[Bar] = []

    def __init__(self, *args, total=None, desc=None, unit=None, disable=False, **kwargs):
        self.total, self.desc, self.unit, self.n, self.seen = total, desc, unit, 0, []
        Bar.made.append(self)

    def update(self, n=1):
        self.n += n
        self.seen.append(self.n)

    def close(self):
        pass


def test_the_progress_bar_moves_while_a_batch_decodes(tiny_model, monkeypatch):
    """The bar counted batches: eval's 48 prompts in one batch sat at 0/1 until the end. It moves by decoding
    step now, and the answers are the same as without it."""
    from transformers import AutoModelForCausalLM

    import align.generation as generation

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    policy = Policy(model, load_tokenizer(tiny_model), "tiny", tiny_model)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0, batch_size=len(PROMPTS))
    monkeypatch.setattr(generation, "tqdm", Bar)
    Bar.made.clear()
    answers = generate(policy, PROMPTS, gen, desc="sampling sft")
    (bar,) = Bar.made
    assert bar.total == 6 and bar.unit == "token" and bar.seen == [1, 2, 3, 4, 5, 6]  # one batch, six steps
    # a batch whose every answer ends early counts its steps left when it returns: the bar ends at its total
    progress = generation.DecodingProgress(bar := Bar(total=10))
    with progress.decoding(10) as stopping:
        import torch

        assert stopping(torch.zeros(3, 2, dtype=torch.long), None).tolist() == [False] * 3  # never stops a sequence
    assert bar.seen == [1, 10]
    monkeypatch.undo()
    assert answers == generate(policy, PROMPTS, gen, desc=None)


def test_a_template_whose_turns_end_with_another_token_than_the_eos_stops_there(tmp_path):
    """Qwen2.5's base models: a ChatML template (turns end with <|im_end|>) and EOS <|endoftext|>, which their
    generation config lists alone. SFT teaches <|im_end|> as the answer's end, but every stage stopped at the EOS:
    the answers ran to max_new_tokens, all counted as cut. The template's turn end is the EOS now; the old
    EOS pads. A template that refuses the probe conversation, or ends turns with plain text, changes nothing."""
    from transformers import AutoTokenizer

    from align.embedded import embedded_model_dir
    from align.generation import stop_ids
    from align.modeling import template_turn_end

    base = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    assert load_tokenizer(str(embedded_model_dir())).eos_token == "<|im_end|>"  # SmolLM2: already so
    base.eos_token, base.pad_token = "<|endoftext|>", None
    base.save_pretrained(tmp_path / "qwen-base-like")
    tokenizer = load_tokenizer(str(tmp_path / "qwen-base-like"))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert stop_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    base.chat_template = "{{ raise_exception('System role not supported') }}"
    assert template_turn_end(base) is None
    base.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert template_turn_end(base) is None  # a newline is no token a turn ends with


def test_a_base_model_pretrained_with_a_bos_gets_it_from_the_fallback_template(tmp_path):
    """A tokenizer without a chat template that adds a BOS (Llama 2, Mistral v0.1 bases): the stages tokenize the
    rendered conversation without special tokens, so the fallback template must give the BOS itself."""
    from transformers import AutoTokenizer

    from align.embedded import embedded_model_dir

    base = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    base.chat_template = None
    base.save_pretrained(tmp_path / "no-template")
    plain = load_tokenizer(str(tmp_path / "no-template"))  # SmolLM2's adds no BOS: none in the template either
    conversation = [{"role": "user", "content": "Hi"}]
    assert plain.apply_chat_template(conversation, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"
    from tokenizers import processors

    base.bos_token = "<|endoftext|>"
    base.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{base.bos_token} $A", special_tokens=[(base.bos_token, base.bos_token_id)])
    base.save_pretrained(tmp_path / "adds-bos")
    with_bos = load_tokenizer(str(tmp_path / "adds-bos"))
    assert with_bos("x")["input_ids"][0] == with_bos.bos_token_id
    text = with_bos.apply_chat_template(conversation, tokenize=False)
    assert text == "<|endoftext|><|im_start|>user\nHi<|im_end|>\n"
