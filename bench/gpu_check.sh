#!/usr/bin/env bash
# The GPU check of lindiff's kernels (issue 34): what the Triton interpreter cannot catch, then the
# headline figures. About 8 minutes on an H100; every step has a hard time limit, a failed or
# timed-out step does not stop the next, and a table of the steps and of the figures against
# their goals ends the run.
#
#   bash bench/gpu_check.sh --out bench/results        # on the GPU machine
#   bash bench/gpu_check.sh --smoke --out /tmp/check   # every step at tiny sizes, CPU, 1-2 minutes
#
# Steps (limit in seconds on the GPU, twice that with --smoke; no step runs past the --budget):
#   setup      (--setup only) install carried wheels (.whl/) and lindiff itself, offline    60
#   tests      tests/test_linear_attention_triton.py (compiled on CUDA), then -m gpu on the
#              local-attention, precision and SANA-Video tests; -x --durations=15       100 + 60
#   resources  bench/kernel_resources.py: registers, spills, shared memory per (D, D_v)      50
#   kernels    bench/kernel_speed.py: local attention r = 16 vs SDPA at FLUX 2048 / 4096 px
#              (plan, first call, steady state); linear attention N = 4K..1M vs SDPA, copy
#              (SD 1.5, SDXL, FLUX shapes; SANA-Video's unnormalised numerator)            130
#   unet       bench/unet_step.py: SD 1.5 UNet fp16, softmax vs LinFusion, 512..4096 px      70
#   dit        bench/dit_step.py: FLUX widths, softmax vs CLEAR and LiT, 1024 / 2048 px      60
#   video      bench/video_step.py, if it exists                                              45
# SageAttention joins the softmax baselines where `import sageattention` works (else a note).
#
# Output (at most 8 files, flat, for the device machine's $OUT): one JSON per step
# (tests-, kernel_resources-, kernels-, unet_step-, dit_step-[, video_step-]<device>.json),
# gpu_check-<device>.json (the summary) and gpu_check-<device>.log (every step's output).
# Exit status: 0 when every step that ran passed, 1 when one failed or timed out, 2 on bad usage.
set -u

usage() {
    cat <<'EOF'
usage: bash bench/gpu_check.sh [--out DIR] [--smoke] [--steps "tests resources ..."]
                               [--budget SECONDS] [--python PATH] [--setup]
  --out DIR        where the JSON and the log go (default bench/results)
  --smoke          every step at tiny sizes (a CPU check of the script itself)
  --steps LIST     steps to run, of: tests resources kernels unet dit video (default: all)
  --budget S       wall-clock seconds for all steps together (default 480)
  --python PATH    interpreter (default .venv/bin/python if present, else python3)
  --setup          first install .whl/*.whl (to /tmp/lindiff-site) and lindiff (editable, offline)
EOF
}

OUT=bench/results
SMOKE=0
SETUP=0
STEPS="tests resources kernels unet dit video"
BUDGET=480
PY=""
LIMIT_SCALE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --setup) SETUP=1; shift ;;
        --steps) STEPS=${2//,/ }; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS=$WORK/steps.tsv
: >"$ROWS"
START=$(date +%s)

# The device's name for file names (as bench/common.py's device_label(short=True)).
TAG=$("$PY" -c '
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower().split("(")[0]).strip("-"))' 2>/dev/null) || TAG=unknown
[ "$SMOKE" = 1 ] && TAG=$TAG-smoke
LOG=$OUT/gpu_check-$TAG.log
: >"$LOG"
echo "gpu_check: device tag $TAG, python $PY, output $OUT, budget ${BUDGET}s$([ "$SMOKE" = 1 ] && echo ', smoke')"

# run_step NAME LIMIT JSON COMMAND...: run COMMAND under `timeout`, its output appended to the log;
# records NAME, status (ok / fail / timeout / skipped), seconds, limit, rc and the JSON it writes.
run_step() {
    local name=$1 limit=$2 json=$3
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        printf '%s\tskipped\t0\t%s\t\t%s\tbudget spent\n' "$name" "$limit" "$json" >>"$ROWS"
        echo "[$name] skipped: the budget of ${BUDGET}s is spent"
        return
    fi
    limit=$((limit * LIMIT_SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] limit ${limit}s: $*" >>"$LOG"
    local begin rc status
    begin=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    local seconds=$(($(date +%s) - begin))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$seconds" "$limit" "$rc" "$json" >>"$ROWS"
    echo "[$name] $status in ${seconds}s (limit ${limit}s, rc $rc)"
    if [ "$status" != ok ]; then
        echo "=== [$name] $status (rc $rc)" >>"$LOG"
        tail -n 15 "$LOG" | sed 's/^/    /'
    fi
}

skip_step() {  # skip_step NAME NOTE
    printf '%s\tskipped\t0\t0\t\t\t%s\n' "$1" "$2" >>"$ROWS"
    echo "[$1] skipped: $2"
}

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ "$SETUP" = 1 ]; then
    setup() {
        if [ -d .whl ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/lindiff-site .whl/*.whl || return 1
        fi
        "$PY" -c "import lindiff.kernels" 2>/dev/null ||
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
        "$PY" -c "import lindiff.kernels, diffusers, triton; print('lindiff imports; diffusers', diffusers.__version__, 'triton', triton.__version__)"
    }
    [ -d .whl ] && export PYTHONPATH=/tmp/lindiff-site${PYTHONPATH:+:$PYTHONPATH}
    export -f setup
    export PY
    run_step setup 60 "" bash -c setup
fi

if [ "$SMOKE" = 1 ]; then
    LIMIT_SCALE=2  # a busy CPU: tiny sizes, but model builds and imports take their time
    LINEAR_TESTS=(-k "test_head_dims and 40")
    XDIST=()
    RESOURCES=(--smoke)
    KERNELS=(--quick --ns 256 512 --shapes sd15-d40 sana-video --repeats 1)
    UNET=(--sizes 64 --channels 32 32 64 64 --repeats 1 --dtype float32)
    DIT=(--sizes 64 --flux-blocks 0 1 --repeats 1 --dtype float32)
    VIDEO=(--frames 1 --blocks 1 --repeats 1 --max-step-s 5)
else
    LINEAR_TESTS=()
    # Triton compiles each kernel variant on the CPU: workers compile in parallel.
    if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); else XDIST=(); fi
    RESOURCES=()
    KERNELS=(--ns 4096 16384 65536 262144 1048576 --shapes sd15-d40 sdxl-h10 flux sana-video --dtype bf16 --repeats 5 --no-reference)
    UNET=(--sizes 512 1024 2048 4096 --variants linfusion --dtype float16 --repeats 2)
    DIT=(--sizes 1024 2048 --dtype bfloat16 --repeats 2)
    VIDEO=(--frames 17 33 --repeats 1 --max-step-s 20)
fi
PYTEST=("$PY" -m pytest -x --durations=15 -p no:cacheprovider "${XDIST[@]}")

if wanted tests; then
    run_step tests-linear 100 "" "${PYTEST[@]}" --junitxml="$WORK/tests-linear.xml" \
        tests/test_linear_attention_triton.py "${LINEAR_TESTS[@]}"
    run_step tests-gpu 60 "" "${PYTEST[@]}" --junitxml="$WORK/tests-gpu.xml" -m gpu \
        tests/test_local_attention.py tests/test_precision.py tests/test_sana_video.py
fi
if wanted resources; then
    run_step resources 50 "kernel_resources-$TAG.json" "$PY" bench/kernel_resources.py \
        --out "$OUT/kernel_resources-$TAG.json" "${RESOURCES[@]}"
fi
if wanted kernels; then
    run_step kernels 130 "kernels-$TAG.json" "$PY" bench/kernel_speed.py --sections local_flux linear \
        --no-plot --out "$OUT/kernels-$TAG.json" "${KERNELS[@]}"
fi
if wanted unet; then
    run_step unet 70 "unet_step-$TAG.json" "$PY" bench/unet_step.py --sage \
        --out "$OUT/unet_step-$TAG.json" "${UNET[@]}"
fi
if wanted dit; then
    run_step dit 60 "dit_step-$TAG.json" "$PY" bench/dit_step.py --models flux --sage \
        --out "$OUT/dit_step-$TAG.json" "${DIT[@]}"
fi
if wanted video; then
    if [ -f bench/video_step.py ]; then
        run_step video 45 "video_step-$TAG.json" "$PY" bench/video_step.py \
            --out "$OUT/video_step-$TAG.json" "${VIDEO[@]}"
    else
        skip_step video "bench/video_step.py does not exist"
    fi
fi

# The tests' JSON, the summary JSON and the table: steps, then figures against the issue's goals.
"$PY" - "$OUT" "$TAG" "$ROWS" "$WORK" "$SMOKE" <<'EOF'
import json, platform, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out, tag, rows_path, work, smoke = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1"
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except ImportError:
    device, versions = "unknown (torch does not import)", {}
steps = []
for line in rows_path.read_text().splitlines():
    name, status, seconds, limit, rc, json_name, note = (line.split("\t") + [""] * 7)[:7]
    steps.append({"step": name, "status": status, "seconds": int(seconds or 0), "limit_s": int(limit or 0),
                  "rc": int(rc) if rc else None, "json": json_name or None, "note": note or None})

def junit(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {
        "time_s": float(suite.get("time", 0)), "failed": failed}

test_steps = [s for s in steps if s["step"].startswith("tests-")]
if test_steps:
    for s in test_steps:
        s["pytest"] = junit(work / f"{s['step']}.xml")
    tests_json = f"tests-{tag}.json"
    (out / tests_json).write_text(json.dumps({"benchmark": "tests", "device": device, "versions": versions,
                                             "steps": test_steps}, indent=2) + "\n")
    for s in test_steps:
        s["json"] = tests_json

def load(name):
    try:
        return json.loads((out / name).read_text()) if name else None
    except (OSError, ValueError):
        return None

# Figures against the goals of issue 34 (None where the step did not produce them).
goals = []
kernels = load(f"kernels-{tag}.json") or {"records": []}
records = [r for r in kernels["records"] if r.get("section") == "linear"]
linear = [r for r in records if r.get("options", {}).get("normalize", True)]
big = [r["copy_fraction"]["fwd"] for r in linear if r["n"] >= 65536 and "fwd" in r.get("copy_fraction", {})]
goals.append(("linear fwd bandwidth / copy, N >= 64K (min)", min(big) if big else None, ">= 0.80"))
numerator = [r["copy_fraction"]["fwd"] for r in records if r not in linear and r["n"] >= 65536
             and "fwd" in r.get("copy_fraction", {})]
goals.append(("SANA-Video numerator fwd bandwidth / copy, N >= 64K", min(numerator) if numerator else None, ">= 0.80"))
at16 = [r["ratios"].get("sdpa_over_triton_fwd") for r in linear if r["n"] == 16384]
at16 = [x for x in at16 if x]
goals.append(("linear fwd speed-up over SDPA, N = 16K (min)", min(at16) if at16 else None, ">= 50"))
local = [r for r in kernels["records"] if r.get("section") == "local_flux"]
at4k = [r["speedup_vs_sdpa"] for r in local if r["tokens"] == 256 * 256]
goals.append(("local r=16 speed-up over SDPA, 4096 px FLUX tokens", at4k[0] if at4k else None, ">= 10"))
unet = load(f"unet_step-{tag}.json") or {"results": []}
for size, goal in ((2048, ">= 3"), (4096, ">= 8"), (512, ">= 1")):
    row = [r for r in unet["results"] if r["size"] == size and r.get("linfusion_time_ratio")]
    goals.append((f"SD 1.5 UNet step speed-up, LinFusion, {size} px", 1 / row[0]["linfusion_time_ratio"] if row else None, goal))

summary = {"benchmark": "gpu_check", "device": device, "versions": versions, "smoke": smoke,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
           "goals": [{"figure": f, "value": v, "goal": g} for f, v, g in goals],
           "sage": (load(f"unet_step-{tag}.json") or {}).get("sage")}
(out / f"gpu_check-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")

print(f"\n{device}")
print(f"{'step':<14} {'status':<8} {'s':>5} {'limit':>6}  json / note")
for s in steps:
    print(f"{s['step']:<14} {s['status']:<8} {s['seconds']:>5} {s['limit_s']:>6}  {s['json'] or ''} {s['note'] or ''}")
    if s.get("pytest"):
        p = s["pytest"]
        print(f"{'':<14} {p['tests']} tests, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
              + (f": {', '.join(p['failed'][:5])}" if p["failed"] else ""))
print(f"\n{'figure':<52} {'value':>8}  goal")
for figure, value, goal in goals:
    print(f"{figure:<52} {'-' if value is None else f'{value:.3g}':>8}  {goal}")
if summary["sage"]:
    print(f"\n{summary['sage']}")
print(f"\nwrote {out / f'gpu_check-{tag}.json'}")
sys.exit(1 if any(s["status"] in ("fail", "timeout") for s in steps) else 0)
EOF
