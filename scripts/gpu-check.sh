#!/usr/bin/env bash
# scripts/gpu-check.sh — sdbench's GPU check: one command for a bare GPU machine, done in
# at most eight minutes on one H100 / H200 (three on a CPU with --dry-run).
#
#   scripts/gpu-check.sh [--dry-run] [--wheels DIR] OUT
#
# Stages, each timed (its elapsed time is printed and written to OUT/stages.tsv):
#   install   the prepared wheels (--wheels DIR, or $SDBENCH_WHEELS), into $WORK/site
#   doctor    python -m harness doctor (its failures are reported, the check goes on)
#   synth     sd15-fp16 (tiny-fp16 with --dry-run) synthesised in fp16, hub folder + safetensors
#   pytest    python -m pytest -m "gpu and not slow": the real-device twins of the CPU tests
#   table-*   scenarios/gpu-check.yaml: both backends, offload none / medvram / lowvram
#             (one stage each), batch 1, 4, 16, repeats 3, warm-up 1
#   compile   one torch.compile cell per backend (--dry-run sets TORCH_COMPILE_DISABLE=1:
#             inductor needs minutes on a small CPU; the GPU run compiles for real)
#   report    OUT/table.md, OUT/report.html, OUT/results.jsonl, OUT/environment.json,
#             OUT/doctor.json, OUT/stages.tsv, OUT/gpu-check.log (7 files, no images)
#
# Budget (seconds; GPU / dry run). A stage runs under `timeout` for the smaller of its cap and
# the time left before the deadline, less what the later stages reserve; one that would get
# less than its floor is skipped, and the check says so. A stage cut at its budget keeps what
# it finished (results are appended cell by cell).
#   stage      cap GPU    cap dry    expected on an H200 (estimated: not yet run there)
#   install    40         30         5
#   doctor     20         20         5
#   synth      90         30         30   (sd15-fp16 took 35 s on a 2-core CPU)
#   pytest     90         45         45
#   table-*    60/60/120  60/15/15   40 / 40 / 100 (none / medvram / lowvram)
#   compile    150        60         120  (two first compilations)
#   report     30         30         10
#   deadline   480        180
#
# The machine: a CUDA build of torch, no network. Its image (Python 3.12) has torch,
# transformers, accelerate, huggingface_hub, safetensors, pandas, jinja2, scipy, pillow,
# psutil, pyyaml, tqdm, pytest, pytest-benchmark, peft and nvidia-ml-py, but not diffusers,
# pydantic or torchsde and their pure-Python dependencies. Carry those as wheels, made where
# pip reaches PyPI (for the Python of the GPU machine; 9 wheels, 8.7 MB):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d wheels \
#       diffusers==0.42.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
#       typing-inspection==0.4.2 torchsde==0.2.6 trampoline==0.1.2 \
#       importlib-metadata==10.2.0 lazy-importer==0.1.0
#
# then `scripts/gpu-check.sh --wheels wheels OUT`. The install stage checks every module
# sdbench imports and names the missing ones (another image may lack more: add their wheels).
# Environment: PYTHON (default python3), SDBENCH_CACHE (zoo cache; default $WORK/cache),
# WORK (scratch space for the cache and results, default a new temporary folder: the sd15
# files take 4.2 GB, so not OUT).
set -uo pipefail

DRY=0
WHEELS="${SDBENCH_WHEELS:-}"
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu-check: one OUT folder, got $OUT and $1" >&2; exit 2; }
           OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || { echo "usage: scripts/gpu-check.sh [--dry-run] [--wheels DIR] OUT" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/sdbench-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
PYTHON="${PYTHON:-python3}"
RESULTS="$WORK/results"
rm -rf "$RESULTS" "$OUT/stages.tsv" "$OUT/gpu-check.log"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
cd "$ROOT" || exit 2

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export SDBENCH_CACHE="${SDBENCH_CACHE:-$WORK/cache}"
export HF_HUB_CACHE="${HF_HUB_CACHE:-$WORK/hf}"

# Stage caps in seconds: install doctor synth pytest none medvram lowvram compile report.
if [ "$DRY" = 1 ]; then
    MODE="dry run (CPU, tiny)"; DEADLINE=180; MODEL=tiny-fp16
    SCENARIO=scenarios/gpu-check-dry.yaml
    CAPS=(30 20 30 45 60 15 15 60 30); COMPILE_FLOOR=30; EARLY_RESERVE=40
else
    MODE="GPU"; DEADLINE=480; MODEL=sd15-fp16; SCENARIO=scenarios/gpu-check.yaml
    CAPS=(40 20 90 90 60 60 120 150 30); COMPILE_FLOOR=60; EARLY_RESERVE=120
fi
REPORT_CAP=${CAPS[8]}
FLOOR=10  # a stage that would get less than this is skipped
export DRY WHEELS OUT WORK PYTHON RESULTS SCENARIO
FAILED=()

now_us() { local t="${EPOCHREALTIME//[!0-9]/}"; echo $((10#$t)); }
START_US=$(now_us)
elapsed_s() { echo $((($(now_us) - START_US) / 1000000)); }
tenths() { printf '%d.%d' $(($1 / 1000000)) $(($1 / 100000 % 10)); }  # µs -> "12.3"

# stage NAME CAP RESERVE COMMAND [ARG...]: run COMMAND (a function below, or a program) in a
# shell under the stage's budget: its cap, or the time left less RESERVE for later stages.
stage() {
    local name="$1" cap="$2" reserve="$3"; shift 3
    local budget=$((DEADLINE - $(elapsed_s) - reserve)) started code status seconds
    [ "$budget" -le "$cap" ] || budget=$cap
    [ "$name" != report ] || budget=$cap  # the outputs are always written
    if [ "$budget" -lt "$FLOOR" ]; then
        echo "== $name: skipped: only $budget s of the $DEADLINE s deadline left for it"
        printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$OUT/stages.tsv"
        return 0
    fi
    echo "== $name (budget $budget s, $(elapsed_s) s elapsed)"
    started=$(now_us)
    timeout --signal=INT --kill-after=15 "$budget" bash -c '"$@"' stage "$@"
    code=$?
    seconds=$(tenths $(($(now_us) - started)))
    case "$code" in
        0) status=ok ;;
        124|137) status="cut at its budget" ;;
        *) status="failed (exit $code)" ;;
    esac
    echo "== $name: $status in $seconds s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$budget" >> "$OUT/stages.tsv"
    [ "$code" = 0 ] || FAILED+=("$name")
}

install() {
    if [ -n "$WHEELS" ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$WORK/site" "$WHEELS"/*.whl || return 1
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" - <<'EOF'
import importlib.util, sys
needed = ["torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub",
          "pandas", "jinja2", "psutil", "yaml", "pydantic", "pytest", "pytest_benchmark",
          "tqdm", "numpy", "scipy", "PIL", "torchsde", "pynvml"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing modules: {', '.join(missing)}; bring their wheels (this script's header)")
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {device}")
EOF
}

doctor() {
    "$PYTHON" -m harness doctor --output "$OUT/doctor.json"
}

table() {  # table ID-PART: the eager cells of one offload mode (nooffload, medvram, lowvram)
    "$PYTHON" -m harness run "$SCENARIO" --out "$RESULTS" --no-images --select eager "$1"
}

compile_cells() {
    if [ "$DRY" = 1 ]; then
        export TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}"
        echo "dry run: TORCH_COMPILE_DISABLE=$TORCH_COMPILE_DISABLE (the compile path, no inductor)"
    fi
    "$PYTHON" -m harness run "$SCENARIO" --out "$RESULTS" --no-images --select compile-default
}

report() {  # the table (Markdown), the HTML report, the results and their environment
    [ ! -s "$RESULTS/results.jsonl" ] || cp "$RESULTS/results.jsonl" "$OUT/results.jsonl"
    "$PYTHON" - "$RESULTS" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
results, out = Path(sys.argv[1]), Path(sys.argv[2])
if not (results / "results.jsonl").is_file():
    from harness import environment
    (out / "environment.json").write_text(json.dumps({"env": environment.collect()}, indent=2))
    sys.exit("no results to report")
from harness.results import load
from reports import render
frame = load(results)
(out / "table.md").write_text(render(frame, "md"), encoding="utf-8")
(out / "report.html").write_text(render(frame, "html", image_root=results), encoding="utf-8")
first = json.loads((results / "results.jsonl").read_text().splitlines()[0])
env = {"env": first["env"], "env_fingerprint": first["env_fingerprint"]}
(out / "environment.json").write_text(json.dumps(env, indent=2))
print(f"wrote table.md, report.html, results.jsonl ({len(frame)} cells), environment.json")
EOF
    local code=$?
    [ ! -s "$OUT/table.md" ] || sed -n '/^| pipeline/,/^$/p; /^> /p' "$OUT/table.md"
    return $code
}

export -f install doctor table compile_cells report

echo "sdbench GPU check: $MODE; out $OUT; work $WORK; deadline $DEADLINE s"
stage install "${CAPS[0]}" "$EARLY_RESERVE" install
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu-check: the Python environment is incomplete; nothing else can run"
    exit 2
fi
[ -z "$WHEELS" ] || export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
stage doctor "${CAPS[1]}" "$EARLY_RESERVE" doctor
stage synth "${CAPS[2]}" "$EARLY_RESERVE" \
    "$PYTHON" -m harness models prepare "$MODEL" --format safetensors hub
stage pytest "${CAPS[3]}" "$EARLY_RESERVE" \
    "$PYTHON" -m pytest -m "gpu and not slow" -p no:cacheprovider -q
stage table-none "${CAPS[4]}" $((COMPILE_FLOOR + REPORT_CAP)) table nooffload
stage table-medvram "${CAPS[5]}" $((COMPILE_FLOOR + REPORT_CAP)) table medvram
stage table-lowvram "${CAPS[6]}" $((COMPILE_FLOOR + REPORT_CAP)) table lowvram
stage compile "${CAPS[7]}" "$REPORT_CAP" compile_cells
stage report "$REPORT_CAP" 0 report
total=$(tenths $(($(now_us) - START_US)))
printf 'total\t%s\t%s\t%s\n' "${FAILED[*]:-ok}" "$total" "$DEADLINE" >> "$OUT/stages.tsv"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu-check: done in $total s; not ok: ${FAILED[*]}"
    exit 1
fi
echo "gpu-check: done in $total s; every stage ok"
