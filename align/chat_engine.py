"""The model side of `align serve`: one base in memory, every adapter on it, a chat answer per request.

    engine = ChatEngine.load(models, base, cfg)          # the base once, each adapter with peft's load_adapter
    job = engine.prepare("dpo", messages, params)        # chat template + token limits: a RequestError if bad
    result = engine.run(job, on_text=lambda i, s: ...)   # generates with the dpo adapter; on_text streams

Choosing a request's adapter: peft's `set_adapter`, only when it differs from the last request's
(a repeat costs nothing), then peft's ordinary LoRA forward. `base` is served through peft's
mixed-batch inference instead: each LoRA layer carries a forward pre-hook, put there once at
load, that hands it `adapter_names=["__base__", ...]` during a base request only, so the layers
skip their adapters for that call and nothing global is flipped. Measured on this project's
2-core CPU (under load) with the quickstart's SmolLM2 and 8 adapters loaded (benchmarks/serve.py):
`set_adapter` walks every module and resets each adapter's requires_grad, ~60 ms a switch; the
mixed-batch path makes the switch free but every token ~6 % slower (an index copy and a Python
hook per layer per token), which costs more than the switch on any answer of a few dozen
tokens; `disable_adapter()` for `base` builds peft's status report first, ~250 ms a request, and
is taken only where a LoRA layer refuses mixed batches (unmixable_layers: a MoE model's fused experts).

A request without a system message of its own gets the adapter's system prompt as its first
turn: the one the adapter was trained with (`sft.data.system_prompt`, from its align.json through
align.artifacts.system_prompt_of); one with a system (or developer) message is run as sent.

Generation runs one request at a time behind a lock (a request's `n` answers are one batch); at
most `limits.max_waiting` requests wait behind it, and one more is refused (Busy).
docs/serving.md says what that means for concurrency.

Each answer is decoded as it grows by one `StoppingCriteria` hooked into `generate` (`_Progress`):
it ends a row at EOS or at a `stop` string, hands each new piece of text to `on_text` (the
streaming response), holds back what may be the start of a stop string or half a UTF-8
character, and stops every row when the client has gone or the server is stopping. The
streamed pieces add up to exactly the text a non-streamed request returns. An answer stopped that
way did not end: it has no finish_reason, and when the server is stopping `run` raises ShuttingDown
(a 503, or an error event in a stream) rather than return it as finished; a request still waiting
for the lock then is refused the same way, as is one that arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from align.data import with_system_prompt
from align.generation import plain_sampling, stop_ids
from align.serving import BASE, warn_past_context

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server will not run, worded for the client: OpenAI's `param` and `code`, an HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


SHUTTING_DOWN = "the server is shutting down"

# A lower temperature is greedy decoding, as in vLLM (its _SAMPLING_EPS): dividing the logits by
# ~1e-40 overflows them to inf, and sampling from that fails.
MIN_TEMPERATURE = 1e-5


class Busy(RuntimeError):
    """More requests are waiting than limits.max_waiting allows."""


class ShuttingDown(RuntimeError):
    """The server is stopping (Ctrl-C): the request is refused, or its answers were cut off unfinished."""


@dataclass
class Params:
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # max_tokens is the server's default, not asked for: lowered to the room the context leaves (as vLLM does)
    default_max_tokens: bool = False
    max_tokens_key: str = "max_tokens"  # the name the request gave it by (or max_completion_tokens), for its errors


@dataclass
class Job:
    model: str
    prompt_ids: list[int]
    params: Params
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client has gone
    admitted: bool = False  # counted among the requests running or waiting (ChatEngine.admit)


@dataclass
class Choice:
    index: int
    text: str
    # stop (EOS or a stop string) | length (max_tokens reached) | None: cut short, the client gone
    finish_reason: str | None
    tokens: int  # generated tokens, up to and including the one that ended the answer


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int
    seconds: float  # generation alone, the wait for the lock not included
    switch_seconds: float = 0.0  # peft's set_adapter before it (0 when the adapter was already active)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


def unmixable_layers(model) -> list[str]:
    """The kinds of LoRA layer in `model` that refuse peft's mixed-batch `adapter_names` (peft 0.21: a fused
    parameter's ParamWrapper, MultiheadAttention), by class name; [] where every layer takes them."""
    from peft.tuners import lora

    kinds = tuple(k for k in (getattr(lora, "ParamWrapper", None), getattr(lora, "MultiheadAttention", None)) if k)
    return sorted({f"lora.{type(m).__name__}" for m in model.modules() if isinstance(m, kinds)})


class ChatEngine:
    """A model (a PeftModel with every served adapter, or a plain model serving `base` alone) and its tokenizers."""

    def __init__(self, model, tokenizers: dict[str, Any], adapters: dict[str, str | None], *, max_prompt_tokens: int,
                 max_waiting: int, system_prompts: dict[str, str | None] | None = None):
        self.model = model
        self.tokenizers = tokenizers  # served name -> its tokenizer (each adapter's own chat template)
        self.adapters = adapters  # served name -> peft adapter name; None: the base, adapters disabled
        # served name -> the system prompt it was trained with, for a request that sends none
        self.system_prompts = system_prompts or {}
        self.max_prompt_tokens = max_prompt_tokens
        self.max_waiting = max_waiting
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.closing = threading.Event()  # set on shutdown: every running generation stops at its next token
        self._lock = threading.Lock()  # one generation at a time (the global RNG, the active adapter)
        # A fast tokenizer is one Rust object: encoding (which first resets its padding settings) while another
        # thread decodes with it fails with "Already borrowed". Requests are tokenized while one generates.
        self._tokenizing = threading.Lock()
        self._count = threading.Lock()
        self._inside = 0  # requests admitted: the one generating and those waiting for it
        # ["__base__"] * n during a base request, read by every LoRA layer's hook; None otherwise.
        self._rows: list[str] | None = None
        self._active = next((a for a in adapters.values() if a), None)  # peft's first adapter starts active
        # `base` with the adapters switched off (peft's disable_adapter) where a LoRA layer refuses mixed batches:
        # a fused MoE expert's (lora.ParamWrapper, what all-linear adapts on Mixtral) or an nn.MultiheadAttention's
        self._unmixable = self._active is not None and unmixable_layers(model)
        self._off = False  # during a base request served so
        if self._active is not None and not self._unmixable:
            from peft.tuners.lora import LoraLayer
            from peft.utils import AuxiliaryTrainingWrapper

            for module in model.modules():  # the layers peft's own adapter_names hooks would reach
                if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                    module.register_forward_pre_hook(self._name_adapters, with_kwargs=True)
        if self._unmixable:
            log.info("base served with the adapters switched off for each request (~250 ms): %s cannot mix adapters "
                     "in a batch", ", ".join(self._unmixable))

    @classmethod
    def load(cls, models: dict[str, Path], base: str, cfg) -> ChatEngine:
        """The base once, as the device plan says, then each adapter with peft's load_adapter."""
        from align.artifacts import system_prompt_of
        from align.cpu import keep_4bit_for_dora
        from align.modeling import device_plan, load_base_model, load_tokenizer

        plan = device_plan(cfg.model)
        log.info("base %s: %s", base, plan.describe().replace(" · gradient checkpointing off", ""))
        model = load_base_model(replace(cfg.model, name=base), plan, training=False)
        adapters: dict[str, str | None] = {BASE: None}
        tokenizers = {BASE: load_tokenizer(base)}
        # a merged model (align merge) served as the base keeps the system prompt its adapter was trained with
        system_prompts = {BASE: system_prompt_of(base)}
        if models:
            from peft import PeftModel

            # peft's own names are a0, a1, ...: a served name such as round-1/dpo is not a valid module name.
            for i, (name, folder) in enumerate(models.items()):
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(folder), adapter_name="a0")
                else:
                    model.load_adapter(str(folder), adapter_name=f"a{i}")
                adapters[name] = f"a{i}"
                tokenizers[name] = load_tokenizer(str(folder))
                system_prompts[name] = system_prompt_of(folder)
            keep_4bit_for_dora(model)  # else on CPU DoRA reads the 4-bit weights wrongly once they are repacked
        model.eval()
        engine = cls(model, tokenizers, adapters, max_prompt_tokens=cfg.limits.max_prompt_tokens,
                     max_waiting=cfg.limits.max_waiting, system_prompts=system_prompts)
        warn_past_context(cfg.limits, engine.context, base)
        return engine

    def names(self) -> list[str]:
        """The served model names: the adapters in the order given, then `base`."""
        return [n for n in self.adapters if n != BASE] + [BASE]

    # ------------------------------------------------------------------------ before the lock

    def prepare(self, model: str, messages: list[dict[str, str]], params: Params, job: Job | None = None) -> Job:
        """The request as token ids through the model's chat template, checked against the token limits; the
        model's system prompt first when the messages have no system message. Given `job` (one already
        counted in by `admit`), its prompt ids are filled in and it is returned."""
        tokenizer = self.tokenizers[model]
        if not any(m["role"] == "system" for m in messages):
            messages = with_system_prompt(messages, self.system_prompts.get(model))
        with self._tokenizing:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja's TemplateError, or a template's own raise_exception (e.g. roles)
                raise RequestError(f"messages: the model's chat template refused them ({err})",
                                   param="messages") from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the messages are {len(ids)} tokens after the chat template; this server takes at "
                               f"most {self.max_prompt_tokens} (limits.max_prompt_tokens)", param="messages",
                               code="context_length_exceeded")
        # OpenAI's own words for these two, which clients show, and some read the numbers from.
        if self.context and len(ids) + params.max_tokens > self.context:
            room = self.context - len(ids)
            if room < 1:  # no max_tokens would do
                raise RequestError(f"This model's maximum context length is {self.context} tokens. However, your "
                                   f"messages resulted in {len(ids)} tokens. Please reduce the length of the "
                                   "messages.", param="messages", code="context_length_exceeded")
            if not params.default_max_tokens:
                raise RequestError(f"This model's maximum context length is {self.context} tokens. However, you "
                                   f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the messages, "
                                   f"{params.max_tokens} in the completion). Please reduce the length of the "
                                   "messages or completion.", param=params.max_tokens_key,
                                   code="context_length_exceeded")
            params = replace(params, max_tokens=room)
        if job is None:
            return Job(model, ids, params)
        job.prompt_ids, job.params = ids, params
        return job

    def admit(self, job: Job) -> None:
        """Count `job` in (Busy when max_waiting requests already wait): a streaming response checks before
        it starts, so a refusal is a 503 and not an error inside a stream already under way."""
        with self._count:
            if job.admitted:
                return
            if self.closing.is_set():
                raise ShuttingDown(SHUTTING_DOWN)
            if self._inside > self.max_waiting:
                raise Busy(f"{self._inside} requests are running or waiting; try again shortly")
            self._inside += 1
            job.admitted = True

    def release(self, job: Job) -> None:
        """Count `job` out (run does it; a caller that admitted a job it then does not run must)."""
        with self._count:
            if job.admitted:
                self._inside -= 1
                job.admitted = False

    # ------------------------------------------------------------------------ under the lock

    def _name_adapters(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._rows is not None:
            kwargs["adapter_names"] = self._rows
        return args, kwargs

    def _select(self, model: str, n: int) -> float:
        """Make `model` the one this call's n rows run with; the seconds a switch of adapter took."""
        adapter = self.adapters[model]
        self._off = adapter is None and bool(self._unmixable)
        if adapter is None:
            self._rows = ["__base__"] * n if self._active is not None and not self._unmixable else None
            return 0.0
        self._rows = None
        if adapter == self._active:
            return 0.0
        start = time.perf_counter()
        self.model.set_adapter(adapter, inference_mode=True)
        self._active = adapter
        return time.perf_counter() - start

    @torch.no_grad()
    def run(self, job: Job, on_text: Callable[[int, str], None] | None = None) -> Result:
        """Generate `job`'s n answers with its model; `on_text(index, piece)` gets each answer as it grows."""
        from transformers import GenerationConfig

        p, tokenizer = job.params, self.tokenizers[job.model]
        eos = stop_ids(tokenizer, self.model.generation_config)
        sample = p.temperature >= MIN_TEMPERATURE
        # The request's settings alone: generate() fills every setting left unset from the model folder's
        # generation_config.json (min_p, no_repeat_ngram_size, a repetition penalty, ... some models ship),
        # swapped for a bare one while it runs (plain_sampling: a None such as min_p's cannot be set here, it
        # means unset), then from its own defaults, neutral but for top_k=50, which OpenAI's API does not have.
        settings = GenerationConfig(
            max_new_tokens=p.max_tokens, do_sample=sample, num_return_sequences=p.n if sample else 1, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id, use_cache=True, repetition_penalty=1.0,
            **({"temperature": p.temperature, "top_p": p.top_p, "top_k": 0, "typical_p": 1.0} if sample else {}))
        rows = [_Row(tokenizer, self._tokenizing, set(eos), p.stop, p.max_tokens) for _ in range(p.n)]
        self.admit(job)
        try:
            with self._lock:
                if job.cancelled.is_set():
                    return Result([], len(job.prompt_ids), 0.0)
                if self.closing.is_set():  # it waited behind a generation that Ctrl-C stopped
                    raise ShuttingDown(SHUTTING_DOWN)
                switched = self._select(job.model, p.n)  # n rows: generate() expands the prompt before the first forward
                start = time.perf_counter()
                # The global generator: safe under the lock, and a seed makes the answer the same each time.
                torch.manual_seed(p.seed) if p.seed is not None else torch.seed()
                # Greedy decoding refuses num_return_sequences > 1: its n identical answers as n prompt rows.
                ids = torch.tensor([job.prompt_ids] * (1 if sample else p.n), device=self.device)
                progress = _Progress(rows, on_text, job.cancelled, self.closing)
                try:
                    with plain_sampling(self.model), self.model.disable_adapter() if self._off else nullcontext():
                        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings,
                                            stopping_criteria=StoppingCriteriaList([progress]))
                finally:
                    self._rows, self._off = None, False
                seconds = time.perf_counter() - start
        finally:
            self.release(job)
        rest = [row.finish() for row in rows]
        if self.closing.is_set() and any(row.reason is None for row in rows):
            raise ShuttingDown(f"{SHUTTING_DOWN}: the answer was cut off before it ended")
        choices = []
        for i, (row, piece) in enumerate(zip(rows, rest, strict=True)):
            if piece and on_text:
                on_text(i, piece)
            choices.append(Choice(i, row.text, row.reason, row.count))
        return Result(choices, len(job.prompt_ids), seconds, switched)


class _Row:
    """One answer as it grows: its tokens, the text shown so far, and why it ended."""

    def __init__(self, tokenizer, lock: threading.Lock, eos: set[int], stops: list[str], max_tokens: int):
        self.tokenizer, self.lock, self.eos, self.stops, self.max_tokens = tokenizer, lock, eos, stops, max_tokens
        self.ids: list[int] = []
        self.count = 0
        self.text = ""  # the answer so far (cut at a stop string)
        self.shown = 0  # characters of it handed out
        self.reason: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def feed(self, token: int) -> str:
        """Take the next token; the text that can now be shown."""
        self.count += 1
        if token in self.eos:
            self.reason = "stop"
            return self._flush()
        self.ids.append(token)
        # No clean-up of spaces: decoding one more token then only ever appends, so the streamed pieces
        # add up to the whole text.
        with self.lock:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.reason = self.text[:cut], "stop"
            return self._flush()
        # Hold back what could be the start of a stop string, and half a UTF-8 character (decoded as U+FFFD).
        held = max((len(s) - 1 for s in self.stops), default=0)
        end = len(self.text) - held
        while end > self.shown and self.text[end - 1] == "\ufffd":
            end -= 1
        return self._flush(end)

    def finish(self) -> str:
        """Generation is over: the rest of the text not handed out yet. A row that neither hit EOS nor a stop
        string ran out of tokens (`length`), or was stopped before it ended (the client gone, the server
        stopping): its reason stays None, never `stop`, which would say the answer is whole."""
        if self.reason is None and self.count >= self.max_tokens:
            self.reason = "length"
        return self._flush()

    def _flush(self, end: int | None = None) -> str:
        end = len(self.text) if end is None else end
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown:end], end
        return piece


class _Progress(StoppingCriteria):
    """Called by generate() after each new token of every row: feeds the rows, says which are finished."""

    def __init__(self, rows: list[_Row], on_text: Callable[[int, str], None] | None, *halts: threading.Event):
        self.rows, self.on_text, self.halts = rows, on_text, halts
        self.undeliverable = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        halt = self.undeliverable or any(h.is_set() for h in self.halts)
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if not row.done:
                piece = row.feed(last[i])
                if piece and self.on_text and not halt:
                    try:
                        self.on_text(i, piece)
                    except Exception:  # the receiver is gone (a closed event loop): stop generating for nobody
                        log.exception("a streamed piece could not be delivered; generation stops")
                        self.undeliverable = halt = True
        return torch.tensor([row.done or halt for row in self.rows], dtype=torch.bool, device=input_ids.device)
