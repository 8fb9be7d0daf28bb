#!/usr/bin/env bash
# caploc on an accelerator: what CI (CPU only) cannot check. Run from the repository root on a machine with a
# GPU, caploc and its test extras installed:  bash bench/device_check.sh [DEVICE] [OUT] [MODEL_DIR]
#   1. the tiny-model unit tests with every model on DEVICE (CAPLOC_TEST_DEVICE; the embedded model's tests
#      skip), among them every ablation path against weight zeroing and the joint gates at 0 and 1;
#   2. `caploc locate` through the CLI on DEVICE (a tiny random Llama saved as a model directory), whose heads
#      must be the CPU run's;
#   3. bench/eval_throughput.py on DEVICE, when MODEL_DIR (a model directory: its config and tokenizer are
#      enough) is given: random weights of that model's shapes.
# Each step's log goes to OUT (default device_check); the exit status is the number of steps that failed.
set -u
device=${1:-cuda}
out=${2:-device_check}
model_dir=${3:-}
mkdir -p "$out"
work=$(mktemp -d)  # the saved tiny model and the stores: not results
failed=0
python=${PYTHON:-python3}
parallel=$($python -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")  # pytest-xdist, where installed

CAPLOC_TEST_DEVICE=$device timeout "${TEST_TIMEOUT:-600}" $python -m pytest -q -p no:cacheprovider -m "not slow" \
    $parallel --junitxml="$out/tests.xml" -o junit_family=xunit1 \
    tests/test_ablation.py tests/test_architecture.py tests/test_analysis.py tests/test_cgc.py \
    tests/test_evaluator.py tests/test_heads.py tests/test_joint.py tests/test_localization.py \
    tests/test_methods.py tests/test_neurons.py tests/test_reference.py tests/test_shortcuts.py \
    > "$out/tests.log" 2>&1 || failed=$((failed + 1))
tail -n 30 "$out/tests.log"

# a tiny random Llama with the byte tokenizer, saved as a model directory the CLI loads like any other
$python - "$work/tiny_model" <<'EOF'
import sys
sys.path.insert(0, "tests")
from tiny import build, byte_tokenizer
build("llama").save_pretrained(sys.argv[1])
byte_tokenizer().save_pretrained(sys.argv[1])
EOF
for where in cpu "$device"; do
    timeout 600 $python -m caploc locate --model "$work/tiny_model" --device "$where" --dtype float32 \
        --task arithmetic --subtask 2D+ --n 16 --n-validate 16 --k 3 --store "$work/store_$where.sqlite" \
        --json-file "$out/locate_$where.json" > "$out/locate_$where.log" 2>&1 || failed=$((failed + 1))
done
$python - "$out" "$device" <<'EOF' || failed=$((failed + 1))
import json, sys
out, device = sys.argv[1:]
runs = {where: json.load(open(f"{out}/locate_{where}.json")) for where in ("cpu", device)}
heads = {where: [h["head"] for h in run["heads"]] for where, run in runs.items()}
print("locate heads:", heads)
sys.exit(0 if heads["cpu"] == heads[device] else "the device's heads differ from the CPU's")
EOF

if [ -n "$model_dir" ]; then
    timeout 900 $python bench/eval_throughput.py --model "$model_dir" --random-weights --device "$device" \
        ${THROUGHPUT_ARGS:-} > "$out/throughput.log" 2>&1 || failed=$((failed + 1))
    cat "$out/throughput.log"
fi
rm -rf "$work"
echo "device check on $device: $failed step(s) failed"
exit $failed
