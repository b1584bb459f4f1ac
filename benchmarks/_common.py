"""What the benchmark scripts share: the device both sides run on, peak memory, the matmul peak,
larger stand-in models built from config (no Hub needed), the step clock both sides are timed
with, and the comparison each script prints (and appends to `--json FILE` as one JSON line).

On CUDA the plain-TRL side gets TRL's own GPU defaults (bf16, gradient checkpointing, the 4-bit
base in bf16 storage), align's side whatever align decides (its `auto` levers), and peak memory
is `torch.cuda.max_memory_allocated`; on CPU both compute in fp32 without checkpointing and peak
memory is the process's peak RSS. TRL 1.16's SFT, DPO and reward trainers cast a 4-bit model's
trainable LoRA weights to bf16 (the QLoRA paper's GPU recipe) and align casts them back on CPU
(align.cpu.keep_trainable_in), so the TRL side does too on CPU (`fp32_adapters_on_cpu`):
otherwise it would train bf16 adapters against ours' fp32 ones. Each side's trainable dtype is
printed with its figures.

Speed is counted the same way on both sides: non-padding tokens (the trainers' `num_tokens`,
the attention mask's sum; in padding-free batches every token is real) between the end of step 1
and the end of the last step, over the wall time between the two (each `on_log` follows a
`loss.item()`, so the GPU has finished the step). Step 1 is left out: it pays cuBLAS and Triton
start-up, and on CUDA the first allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Llama-architecture sizes around SmolLM2's family (vocabulary 49152, tied embeddings), for timing:
# random weights do the same FLOPs as trained ones.
SIZES = {
    "0.5b": {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 4},  # ~0.45B parameters
    "1.5b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 8},  # ~1.56B parameters
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},  # Llama-2-7B's shape: ~6.7B parameters
}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype():
    import torch

    return torch.bfloat16 if cuda() and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32


def trl_device_args() -> dict:
    """TRL config arguments matching align's DevicePlan on this machine."""
    import torch

    return {"use_cpu": not cuda(), "bf16": compute_dtype() == torch.bfloat16, "activation_checkpointing": cuda()}


def model_kwargs(quantize: bool, **extra) -> dict:
    """from_pretrained arguments for the plain-TRL side: the dtype, and the 4-bit config as align's."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": compute_dtype(), **extra}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            bnb_4bit_quant_storage=compute_dtype() if cuda() else torch.uint8)
    if cuda():
        kwargs["device_map"] = {"": 0}
    return kwargs


def fp32_adapters_on_cpu(model) -> None:
    """On CPU, TRL's bf16 cast of a 4-bit model's trainable weights undone, as align's side does (a TRL user on
    CPU must: reward's fp32 score head fails on bf16 inputs); on CUDA both keep TRL's bf16 adapters."""
    if cuda():
        return
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def trainable_dtype(model) -> str:
    """The dtype(s) of the weights the optimizer trains, e.g. "float32" or "bfloat16,float32"."""
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}))


def peak_memory_mib() -> float:
    import torch

    if cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_label() -> str:
    return "peak GPU MiB" if cuda() else "peak RSS MiB"


def matmul_peak_gflops(reps: int = 10) -> float:
    """The machine's dense matmul rate in the compute dtype: fp32 2048² on CPU, bf16 8192² on CUDA."""
    import torch

    n = 8192 if cuda() else 2048
    device = "cuda" if cuda() else "cpu"
    a = torch.randn(n, n, device=device, dtype=compute_dtype())
    b = torch.randn(n, n, device=device, dtype=compute_dtype())
    a @ b
    if cuda():
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda():
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - began) / 1e9


def n_params(model_name: str) -> int:
    """The model's parameters (the tied embedding once), counted on the meta device: no weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.modeling import resolve_model_path

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model_name)))
    return sum(p.numel() for p in model.parameters())


def sized_model(size: str) -> str:
    """A folder with a randomly initialised model of `size` and the embedded model's tokenizer, built once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from align.embedded import embedded_model_dir

    base = embedded_model_dir()
    folder = base.parent / f"bench-{size}"
    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    small = LlamaConfig.from_pretrained(str(base))
    config = LlamaConfig(**{**small.to_dict(), **SIZES[size], "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    # Initialised on the GPU where there is one: seconds instead of minutes of CPU random init.
    with torch.device("cuda" if cuda() else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    tmp = Path(str(folder) + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    print(f"built {size} stand-in: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {folder}")
    del model
    release()  # the sides run in child processes: this one holds no GPU memory meanwhile
    return str(folder)


def release() -> None:
    """Give back the GPU memory of models this (parent) process built and dropped: otherwise its ~3 GB (1.5b;
    ~13.5 GB for 7B) stay reserved while both sides run, and align's `auto` checkpointing reads the GPU's free
    memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- timing both sides alike


class StepClock:
    """(time, cumulative non-pad tokens) at every logged training step: TRL's callback, and align's too.

    Align's stages are run through `align.cli.main`, whose trainers log through
    align.training.MetricsJSONL; `watch_align()` makes that callback report to this clock as well.
    """

    def __init__(self):
        self.marks: list[tuple[float, float, int]] = []
        self.adapter_dtype = "?"  # the trainable weights' dtype, read at the first logged step

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                clock.mark(state.global_step, logs, kwargs.get("model"))

        return Clock()

    def mark(self, step: int, logs: dict | None, model=None) -> None:
        if logs and "num_tokens" in logs and "train_runtime" not in logs and not any(k.startswith("eval_") for k in logs):
            self.marks.append((time.perf_counter(), float(logs["num_tokens"]), step))
            if model is not None and self.adapter_dtype == "?":
                self.adapter_dtype = trainable_dtype(model)

    def watch_align(self) -> None:
        from align import training

        original = training.MetricsJSONL.on_log

        def on_log(callback, args, state, control, logs=None, **kwargs):
            self.mark(state.global_step, logs, kwargs.get("model"))
            return original(callback, args, state, control, logs=logs, **kwargs)

        training.MetricsJSONL.on_log = on_log

    def figures(self) -> dict:
        """tokens/s and s/step over steps 2..N, from the marks (logging_steps=1 gives one per step)."""
        if len(self.marks) < 2:
            raise RuntimeError(f"need at least 2 logged steps to time, got {len(self.marks)}: run more steps")
        (t0, n0, s0), (t1, n1, s1) = self.marks[0], self.marks[-1]
        return {"tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / (s1 - s0),
                "tokens_per_step": (n1 - n0) / (s1 - s0), "timed_steps": s1 - s0, "adapter_dtype": self.adapter_dtype}


def peak_memory() -> dict:
    """Peak memory of this process: GPU allocated and reserved on CUDA, RSS always."""
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda():
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    else:
        out["peak_mib"] = out["peak_rss_mib"]
    return out


BOOL = {"type": lambda s: s.lower() in ("1", "true", "yes", "on")}  # --flag true / false


def side_by_side_parser(doc: str, *, batch: int, batch_help: str | None = None,
                        model_help: str | None = None) -> argparse.ArgumentParser:
    """The options every align-against-TRL script takes; each adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=model_help)
    parser.add_argument("--size", choices=sorted(SIZES), help="a stand-in model of this size built from config "
                        "(random weights, the embedded tokenizer; replaces --model)")
    parser.add_argument("--quantize", default=True, **BOOL)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=batch, help=batch_help)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="align overrides for our side")
    parser.add_argument("--json", help="append the figures to this file as one JSON line")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    return parser


def parse_or_run_child(parser: argparse.ArgumentParser, child, check=None) -> argparse.Namespace | None:
    """The parent's arguments (--size resolved to its stand-in's folder), or None once `child` has run a side.
    `check(parser, args)` refuses what will not run (parser.error) before a stand-in is built for it."""
    args = parser.parse_args()
    if args.child:
        child(args)
        return None
    if check:
        check(parser, args)
    if args.size:
        args.model = sized_model(args.size)
    return args


def compare_sides(script: str, args: argparse.Namespace, *extra: str) -> tuple[dict, float]:
    """Both sides run with the shared options and `extra`; their RESULT dicts, and the matmul peak: the best
    of a measurement before and after (on a shared machine one alone can be low)."""
    peak = matmul_peak_gflops()
    results = run_sides(script, ["--quantize", str(args.quantize), "--steps", str(args.steps), "--batch",
                                 str(args.batch), "--max-length", str(args.max_length), *extra, "--ours", *args.ours])
    return results, max(peak, matmul_peak_gflops())


def settings(args: argparse.Namespace) -> str:
    """The title's tail: the base's precision and our side's overrides."""
    mode = "QLoRA (4-bit NF4 base)" if args.quantize else "LoRA (unquantized base)"
    return mode + (f" · ours: {' '.join(args.ours)}" if args.ours else "")


def work_share(stage_folder: Path) -> dict:
    """Align's reward and DPO run each distinct response of a batch once (align.training.UniqueRows), while
    tokens are counted over every pair's rows, as TRL's are: the share of those rows align ran, from the
    stage's manifest, so its GFLOP/s counts the work it did (with K=3 rankings, about half)."""
    manifest = json.loads((stage_folder / "align.json").read_text())
    return {"work_share": manifest["metrics"].get("train_distinct_rows", 1.0)}


def child_result(result: dict) -> None:
    """The line a child process ends with; the parent reads the last one."""
    print("RESULT " + json.dumps({**result, **peak_memory()}), flush=True)


def run_sides(script: str, child_args: list[str], sides=("trl", "ours"), timeout: float | None = None) -> dict:
    """Each side in its own process, one after the other (so peak memory is its own); their RESULT dicts."""
    repo = Path(script).resolve().parents[1]
    # The Hub's kernels the same way on both sides: off, as align runs (align.cli.setup_environment), unless
    # USE_HUB_KERNELS is set (plain TRL under transformers >= 5.25 would load them on CUDA, align not)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "USE_HUB_KERNELS": os.environ.get("USE_HUB_KERNELS", "NO"),
           "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    results = {}
    for side in sides:
        cmd = [sys.executable, script, "--child", side, *child_args]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        results[side] = json.loads(line[-1][7:])
    return results


def report(bench: str, title: str, results: dict, flops_per_token: float, peak_gflops: float,
           json_path: str | None, extra: dict | None = None) -> dict:
    """Print the comparison table and the ratio; append the same figures to `json_path` as one line."""
    label = "peak GPU MiB" if cuda() else "peak RSS MiB"
    print(f"\n{title}")
    print(f"{'':8}{'tokens/s':>10}{'s/step':>9}{'tok/step':>9}{label:>14}{'GFLOP/s':>10}{'% of peak':>11}"
          f"{'adapters':>10}")
    for side, r in results.items():  # tokens/s: the pairs' tokens, the same work on both sides
        r["gflops"] = flops_per_token * r["tokens_per_s"] * r.get("work_share", 1.0) / 1e9
        r["pct_of_peak"] = 100 * r["gflops"] / peak_gflops
        print(f"{side:8}{r['tokens_per_s']:>10.1f}{r['s_per_step']:>9.2f}{r['tokens_per_step']:>9.0f}"
              f"{r['peak_mib']:>14.0f}{r['gflops']:>10.1f}{r['pct_of_peak']:>10.1f}%{r.get('adapter_dtype', '?'):>10}")
    for side, r in results.items():
        if r.get("work_share", 1.0) != 1.0:
            print(f"{side}: GFLOP/s counts the rows it ran, {100 * r['work_share']:.0f} % of the pairs' rows (each "
                  f"distinct response once); tokens/s counts every pair's tokens on both sides")
    ratio = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    memory = results["ours"]["peak_mib"] / results["trl"]["peak_mib"]
    kind = "bf16" if cuda() else "fp32"
    print(f"ratio ours/TRL tokens/s: {ratio:.2f}x · peak memory ours/TRL {memory:.2f} · {kind} matmul peak measured "
          f"now: {peak_gflops:.0f} GFLOP/s")
    record = {"bench": bench, "step": os.environ.get("GPU_CHECK_STEP"), "title": title, "device": device_name(), "ratio": ratio, "memory_ratio": memory,
              "peak_gflops": peak_gflops, "flops_per_token": flops_per_token, **(extra or {}), "sides": results}
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda() else "cpu"
