"""`align serve`'s model side, measured: tokens/s of a greedy answer per model, the adapter switch, and
memory with N adapters loaded against one.

    python benchmarks/serve.py --run runs/quickstart                 # the run's adapters on an fp32 base
    python benchmarks/serve.py --run runs/quickstart --quantize      # the same on a 4-bit NF4 base
    python benchmarks/serve.py --run runs/quickstart --http          # + one model through HTTP and the openai client
    python benchmarks/serve.py --run runs/quickstart --versus-4bit   # + the first adapter on a 4-bit base, same rounds

Run by hand, never in the test suite. One process, the run's adapters loaded as `align serve` loads
them (align.chat_engine.ChatEngine.load), then each served model and `base` gives one warm-up
answer and, in `--repeat` rounds (each model once a round, so a burst of load hits all alike), a
greedy answer of at most `--tokens` tokens to a prompt that draws long answers; tokens/s is the
tokens generated over generate()'s time (prefill included; the median of the rounds), and the time
to the first piece of text is taken from the streaming callback. In the same rounds: the first
adapter merged into its base (peft's merge_and_unload, as `align sample` runs a policy): what serving it
unmerged, hot-swappable, costs per token; and the first adapter through peft's mixed-batch path (the
way `base` runs, align/chat_engine.py, and the way not taken for adapters). The switch: what a request does to choose its model
(`ChatEngine._select`, 200 times): alternating two adapters (peft's `set_adapter`), and
alternating an adapter and `base`; beside them the two ways not taken, timed the same:
`generate(adapter_names=...)`'s hooking and unhooking of every layer per call (peft's
`_enable_peft_forward_hooks`, entered and left) and `disable_adapter()` for `base`. Memory is the
process's resident set after the base, after each adapter, and after more copies of the first
adapter loaded under other names (up to `--adapters` in all, before any answer is generated); the
adapters' own bytes are counted from their tensors.

On a shared machine the figures move with the load: note `uptime`, compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPT = [{"role": "user", "content": "Write a detailed, step by step guide to syncing my notes between my phone and "
                                      "my laptop, covering every setting I should check."}]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def adapter_mib(model, adapter: str) -> float:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{adapter}." in n) / 2**20


def answer(engine, name: str, tokens: int, mixed: bool = False) -> tuple[int, float, float]:
    """(tokens generated, generate()'s seconds, seconds to the first piece of text) of one greedy answer;
    `mixed`: the adapter named to each layer through peft's mixed-batch path (the way not taken)."""
    from align.chat_engine import Params

    if mixed:  # the engine's own hooks, handed the adapter's name instead of "__base__"
        engine._select = lambda model, n: setattr(engine, "_rows", [engine.adapters[model]] * n) or 0.0
    seen: list[float] = []
    try:
        job = engine.prepare(name, PROMPT, Params(max_tokens=tokens, temperature=0))
        start = time.perf_counter()
        result = engine.run(job, on_text=lambda i, piece: seen.append(time.perf_counter()))
    finally:
        engine.__dict__.pop("_select", None)
    return result.completion_tokens, result.seconds, (seen[0] - start - result.switch_seconds) if seen else 0.0


def interleaved(runs: dict[str, tuple], tokens: int, repeat: int) -> dict[str, dict]:
    """Each (engine, model) answers once per round, the rounds one after the other: a burst of load on
    the machine hits every row alike, and the rows compare."""
    for engine, name, *mixed in runs.values():
        answer(engine, name, 8, *mixed)  # warm-up
    seen: dict[str, list] = {label: [] for label in runs}
    for _ in range(repeat):
        for label, (engine, name, *mixed) in runs.items():
            seen[label].append(answer(engine, name, tokens, *mixed))
    return {label: {"tokens_per_s": statistics.median(t / s for t, s, _ in rows), "tokens": rows[0][0],
                    "per_round": [round(t / s, 2) for t, s, _ in rows],
                    "first_piece_ms": 1e3 * statistics.median(f for _, _, f in rows)} for label, rows in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart", help="a run directory with finished adapters")
    parser.add_argument("--quantize", action="store_true", help="a 4-bit NF4 base (model.quantize=true)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=8, help="adapters loaded in all for the memory figure")
    parser.add_argument("--http", action="store_true", help="also one model through HTTP and the openai client")
    parser.add_argument("--versus-4bit", action="store_true",
                        help="the first adapter on a 4-bit NF4 base too, in the same rounds")
    parser.add_argument("--json", help="append the figures as one JSON line to this file")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from align.chat_engine import ChatEngine
    from align.config import ServeStageConfig, load_config
    from align.modeling import device_plan, load_base_model, load_tokenizer
    from align.serving import BASE, served_models, shared_base

    cfg = load_config(ServeStageConfig, None, [f"run.dir={args.run}", f"model.quantize={str(args.quantize).lower()}",
                                               f"limits.max_tokens={max(args.tokens, 16)}"])
    models = served_models(cfg)
    base = shared_base(models, cfg)
    out: dict = {"run": args.run, "base": base, "plan": device_plan(cfg.model).describe(), "threads":
                 torch.get_num_threads(), "load": os.getloadavg()[0], "memory_mib": {}}
    memory = out["memory_mib"]
    memory["process"] = rss_mib()
    start = time.perf_counter()
    engine = ChatEngine.load({}, base, cfg)
    out["base_load_s"] = time.perf_counter() - start
    memory["base"] = rss_mib()
    model, adapters, tokenizers = engine.model, dict(engine.adapters), dict(engine.tokenizers)
    for i, (name, folder) in enumerate(models.items()):  # as ChatEngine.load attaches them
        model = PeftModel.from_pretrained(model, str(folder), adapter_name="a0") if i == 0 else model
        if i:
            model.load_adapter(str(folder), adapter_name=f"a{i}")
        adapters[name] = f"a{i}"
        tokenizers[name] = load_tokenizer(str(folder))
        memory[f"+{name}"] = rss_mib()
    engine = ChatEngine(model.eval(), tokenizers, adapters, max_prompt_tokens=4096, max_waiting=0)
    out["adapter_mib"] = adapter_mib(model, "a0")

    # --- memory with more adapters ------------------------------------------------------------------------
    for i in range(len(models), args.adapters):
        model.load_adapter(str(models[next(iter(models))]), adapter_name=f"copy{i}")
        memory[f"{i + 1} adapters"] = rss_mib()

    # --- tokens/s per model, the first adapter merged, [on a 4-bit base]: interleaved -------------------
    names = engine.names()
    first = next(iter(models))
    runs = {name: (engine, name) for name in names}
    runs[f"{first}, mixed-batch path"] = (engine, first, True)
    if not args.quantize:  # not into a 4-bit base, where merging would round the adapter away
        merged = PeftModel.from_pretrained(
            load_base_model(replace(cfg.model, name=base), device_plan(cfg.model), training=False),
            str(models[first])).merge_and_unload()
        runs[f"{first} merged"] = (ChatEngine(merged.eval(), {BASE: engine.tokenizers[first]}, {BASE: None},
                                              max_prompt_tokens=4096, max_waiting=0), BASE)
        if args.versus_4bit:
            four = replace(cfg, model=replace(cfg.model, quantize=True))
            runs[f"{first}, 4-bit base"] = (ChatEngine.load({first: models[first]}, base, four), first)
    out["speed"] = interleaved(runs, args.tokens, args.repeat)

    # --- the switch --------------------------------------------------------------------------------------
    peft_names = [a for a in engine.adapters.values() if a] + ["__base__"]

    def timed(action, n: int = 200) -> dict:
        times = []
        for i in range(n):
            t = time.perf_counter()
            action(i)
            times.append(time.perf_counter() - t)
        times.sort()
        return {"median": 1e3 * times[n // 2], "p90": 1e3 * times[n * 9 // 10], "max": 1e3 * times[-1]}

    served = engine.names()

    def hooked(i: int) -> None:  # peft's private context manager: what generate(adapter_names=...) does per call
        with model._enable_peft_forward_hooks(adapter_names=[peft_names[i % len(peft_names)]]):
            pass

    def disabled(i: int) -> None:
        with model.disable_adapter():
            pass

    adapters_served = [n for n in served if n != BASE]
    out["switch_ms"] = {
        "another adapter (set_adapter)": timed(lambda i: engine._select(adapters_served[i % 2], 1)),
        "base after an adapter": timed(lambda i: engine._select(BASE if i % 2 else adapters_served[0], 1)),
        "not taken: generate(adapter_names=)": timed(hooked),
        "not taken: disable_adapter() for base": timed(disabled, 20)}
    engine._rows = None
    out["adapters_loaded"] = len(model.peft_config)

    # --- over HTTP ---------------------------------------------------------------------------------------
    if args.http:
        import openai

        from align.labeling.server import running
        from align.openai_api import create_app

        with running(create_app(engine, cfg)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
            client.chat.completions.create(model=first, messages=PROMPT, max_tokens=8, temperature=0)
            made, wall = 0, 0.0
            for _ in range(args.repeat):
                t = time.perf_counter()
                reply = client.chat.completions.create(model=first, messages=PROMPT, max_tokens=args.tokens,
                                                       temperature=0)
                wall += time.perf_counter() - t
                made += reply.usage.completion_tokens
            out["http_tokens_per_s"] = made / wall

    print(f"\nalign serve, {out['plan']} · {out['threads']} threads · load average {out['load']:.1f}")
    print(f"base loaded in {out['base_load_s']:.1f} s; one adapter holds {out['adapter_mib']:.1f} MiB of LoRA weights")
    print(f"{'model':<20} {'tokens/s':>9} {'tokens':>7} {'first piece':>12}   each round")
    for name, row in out["speed"].items():
        print(f"{name:<20} {row['tokens_per_s']:>9.1f} {row['tokens']:>7} {row['first_piece_ms']:>9.0f} ms   "
              f"{' '.join(f'{r:.1f}' for r in row['per_round'])}")
    print(f"per request, with {out['adapters_loaded']} adapters loaded (ms): " + "; ".join(
        f"{way} median {t['median']:.2f}, p90 {t['p90']:.2f}, max {t['max']:.2f}" for way, t in out["switch_ms"].items()))
    print("resident memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    if "http_tokens_per_s" in out:
        print(f"{first} through HTTP + openai client: {out['http_tokens_per_s']:.1f} tokens/s (wall, prefill included)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
