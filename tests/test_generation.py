"""generate_answers: each answer says whether it ended (the policy sampled EOS) or was cut at max_new_tokens."""

from __future__ import annotations

from alignment.config import GenerationConfig
from alignment.generation import Policy, chat_prompt, generate, generate_answers
from alignment.modeling import load_tokenizer

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
