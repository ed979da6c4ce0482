#!/usr/bin/env bash
# `lpo bench` on one GPU: SD1.5-size (random weights, bf16, SDPA attention) and shapes-size per-step costs.
#
# How to run (from anywhere; nothing is downloaded, every model is built from its config with random weights):
#     bash scripts/gpu_bench.sh                     # JSON + logs under results/bench/
#     OUT=/some/dir bash scripts/gpu_bench.sh       # ... under $OUT instead
#     PYTHON=/path/to/python bash scripts/gpu_bench.sh
# Needs: a CUDA GPU and a python with the project's pinned packages and a CUDA build of torch (default: the
# repo's .venv/bin/python when it has CUDA, else python3 on PATH). About 3 minutes on one H100 (most of it
# building the ~2B random parameters on the CPU); every run has its own time limit so the whole script stays
# under 5 minutes. Writes one JSON per run (bench_*.json), its log (*.log) and nvidia-smi's card line (gpu.csv).
#
# Runs: SD1.5 size at B = 1 prompt per step (the paper's Tab. 5 setting: one sampling step, K = 4) and at B = 5
# (its per-GPU sampling batch), LRM training steps of 8 pairs (16 in the paper, per GPU), then the shapes size.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_CHECK='import torch, sys; sys.exit(not torch.cuda.is_available())'
pick_python() {  # $PYTHON, else the first of .venv/bin/python, python3 whose torch sees a CUDA device
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local py
    for py in .venv/bin/python python3; do
        if command -v "$py" > /dev/null && "$py" -c "$CUDA_CHECK" 2> /dev/null; then echo "$py"; return; fi
    done
    echo "gpu_bench.sh: no python whose torch sees a CUDA device (tried .venv/bin/python, python3; set PYTHON)" >&2
    exit 1
}
PY=$(pick_python)
"$PY" -c "$CUDA_CHECK" || { echo "gpu_bench.sh: $PY: torch sees no CUDA device" >&2; exit 1; }
OUT_DIR=${OUT:-results/bench}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.csv" 2>/dev/null || true
echo "gpu_bench.sh: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))') -> $OUT_DIR"

bench() {  # bench NAME LIMIT_SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$PY" -m lpo bench --device cuda --children 4 --out "$OUT_DIR/bench_$name.json" "$@" \
        > /dev/null 2> "$OUT_DIR/$name.log" || { echo "gpu_bench.sh: $name failed (see $OUT_DIR/$name.log)"; return 1; }
    echo "gpu_bench.sh: $name done in $((SECONDS - start)) s"
}

status=0
bench sd15_b1_bf16 110 --size sd15 --dtype bf16 --batch 1 --train-batch 8 --repeats 20 --warmup 3 || status=1
bench sd15_b5_bf16 110 --size sd15 --dtype bf16 --batch 5 --train-batch 8 --repeats 10 --warmup 2 || status=1
bench shapes_bf16 40 --size shapes --dtype bf16 --repeats 20 --warmup 3 || status=1

# One line per run: the three ratios and the two step times.
"$PY" - "$OUT_DIR" <<'EOF' || status=1
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    data = json.loads(path.read_text())
    for size, s in data["sizes"].items():
        t, r = s["timings_s"], s["ratios"]
        print(f"{path.name} [{data['device_name']}, {data['dtype']}] {size} B={s['settings']['prompts_per_step']}: "
              f"LPO {t['lpo_step']['median']:.4f} s, SPO {t['spo_step']['median']:.4f} s, "
              f"SPO/LPO {r['spo_over_lpo_step']:.2f}x; LRM step on-the-fly/latents "
              f"{r['on_the_fly_over_latents_lrm_step']:.2f}x; loader/train {r['loader_over_train_samples_per_s']:.1f}x")
EOF
exit $status
