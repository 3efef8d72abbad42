#!/usr/bin/env bash
# The GPU benchmark set, on one CUDA device, in under 8 minutes:
#   - training speed of StackWise vs Hugging Face Llama, bf16 autocast (bench_vs_llama.py)
#   - MFU of rackwise and blockwise training against the GPU's datasheet bf16 peak, the measured
#     matmul peak beside it, with a profile of where the time goes (bench_mfu.py)
#   - peak training memory per mode, torch.cuda.max_memory_allocated (bench_memory.py)
#   - the quickstart grid, `stackwise run experiments/quickstart.yaml` with
#     --set training.device=cuda into a temporary MLflow store (bench_quickstart.py)
# Each writes its JSON to benchmarks/results/<name>_cuda.json (the CPU results stay as they are);
# `python benchmarks/report.py` then adds their rows to the README's benchmark table.
#
# Set-up: the README's, with a CUDA build of torch, plus the bench extra (transformers):
#     pip install torch -e '.[bench]'
# Run: bash benchmarks/gpu.sh   (the interpreter is $PYTHON, else `python` on the PATH)
#
# Exit status: 2 at once when torch sees no CUDA device or the bench extra is missing (checked
# before anything slow); 1 when a part failed or ran out of time; 0 when every part ran.
#
# Time: every part runs under `timeout`; the limits (90 + 110 + 80 + 150 s, plus up to 5 s each
# to stop a part that ignores the first signal) and the CUDA check keep the whole script under
# 8 minutes even when every part runs to its limit. The shapes are sized for one datacenter GPU
# (H100, H200, A100): large enough that matmuls dominate, small enough to fit the limits.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}

# -- can this machine run the set? (fast: no model is built) ------------------------------------
if ! gpu=$("$PY" - 2>&1 <<'EOF'
import importlib.util
import sys

try:
    import torch
except ImportError as error:
    sys.exit(f"torch cannot be imported ({error})")
if not torch.cuda.is_available():
    sys.exit(
        f"no CUDA device: torch.cuda.is_available() is false (torch {torch.__version__}); "
        "these benchmarks need a CUDA GPU and a CUDA build of torch"
    )
if importlib.util.find_spec("transformers") is None:
    sys.exit("transformers is missing: install the bench extra, pip install -e '.[bench]'")
print(torch.cuda.get_device_name())
EOF
); then
    echo "gpu.sh: ${gpu##*$'\n'}" >&2
    exit 2
fi

logs=$(mktemp -d "${TMPDIR:-/tmp}/stackwise-gpu-bench.XXXXXX")
echo "gpu.sh: benchmarks on ${gpu} (logs: ${logs})"

failed=0
ran=()
# part NAME LIMIT_SECONDS SCRIPT ARGS...: run benchmarks/SCRIPT with ARGS under a time limit.
part() {
    local name=$1 limit=$2 script=$3
    shift 3
    local start=$SECONDS status=0
    echo "== ${name}: python benchmarks/${script} $* (limit ${limit} s)"
    timeout --kill-after=5 "$limit" "$PY" "benchmarks/${script}" "$@" >"${logs}/${name}.log" 2>&1 ||
        status=$?
    if [[ $status -eq 0 ]]; then
        echo "   done in $((SECONDS - start)) s"
        ran+=("$name")
    else
        failed=1
        if [[ $status -eq 124 || $status -eq 137 ]]; then
            echo "   ran out of time after ${limit} s; the end of its log:"
        else
            echo "   failed (exit status ${status}); the end of its log:"
        fi
        tail -n 15 "${logs}/${name}.log" | sed 's/^/   | /'
    fi
}

# Eager only (--no-compiled): compiling four models would not fit the 8-minute budget.
part bench_vs_llama 90 bench_vs_llama.py --device cuda --precision bf16 --no-compiled \
    --shapes 1024x8,2048x8 --seq-len 1024 --batch-size 8 --rounds 6 --steps 5 --warmup 3
part bench_mfu 110 bench_mfu.py --device cuda --precision bf16 \
    --d-model 2048 --layers 4 --seq-len 1024 --batch-size 8 \
    --steps 20 --steps-per-stage 5 --profile-steps 3 --matmul-size 8192
part bench_memory 80 bench_memory.py --device cuda
echo "== bench_capacity: skipped: it caps the host memory of the whole process (a cgroup or its" \
    "peak RSS); it has no cap on GPU memory, so on a GPU machine it would measure the CPU again"
part bench_quickstart 150 bench_quickstart.py --device cuda --timeout 140

# -- summary ------------------------------------------------------------------------------------
echo
echo "Summary (${gpu}):"
"$PY" - "${ran[@]}" <<'EOF'
import json
import sys
from pathlib import Path

for name in sys.argv[1:]:
    path = Path("benchmarks/results") / f"{name}_cuda.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    for row in result["headline"]:
        met = {True: "goal met", False: "goal missed", None: "no goal"}[row["met"]]
        goal = f" ({row['goal']})" if row.get("goal") else ""
        print(f"- {row['what']}\n    {row['figure'].replace('**', '')}: {met}{goal}")
    print(f"    -> {path}")
EOF
if [[ $failed -ne 0 ]]; then
    echo "gpu.sh: some parts failed; see above and ${logs}"
    exit 1
fi
echo "Rewrite the README's table with these rows: python benchmarks/report.py"
