#!/usr/bin/env bash
# Benchmark: the holders scan (examples/scan: gpu_nodes + scan) against `fuser -v` and
# `lsof` on the same nodes, with N real processes each holding one of the simulated GPU's
# nodes, plus whatever else runs on the machine.
#
#   benches/holders.sh [N ...]        default: 100 1000
#
# Needs hyperfine, fuser (psmisc), lsof; root (the sim tree's nodes are made with mknod).
# Prints a markdown table of medians and ratios; hyperfine's JSON goes to $OUT (default:
# a temp dir, removed at exit). Every process it starts is killed at exit, by pid.
set -euo pipefail

cd "$(dirname "$0")/.."
COUNTS=("${@:-100 1000}")
read -r -a COUNTS <<<"${COUNTS[*]}"

for tool in hyperfine fuser lsof; do
    command -v "$tool" >/dev/null || { echo "holders.sh: $tool is not installed" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/handoff-bench.XXXXXX")
OUT=${OUT:-$WORK/json}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    if ((${#PIDS[@]})); then
        kill "${PIDS[@]}" 2>/dev/null || true
        wait "${PIDS[@]}" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cargo build --release --quiet --example scan
SCAN=$PWD/target/release/examples/scan

DEV=$("$SCAN" --build-sim "$WORK/sim")
SYS=$WORK/sim/sys
mapfile -t NODES < <(SCAN_VERBOSE=1 "$SCAN" "$SYS" /proc "$DEV" 0000:01:00.0 | sed -n 's/^node //p')
echo "GPU nodes: ${#NODES[@]}" >&2

start_holders() { # start holders until there are $1 of them
    local want=$1 i
    for ((i = ${#PIDS[@]}; i < want; i++)); do
        sleep 100000 <"${NODES[i % ${#NODES[@]}]}" >/dev/null 2>&1 &
        PIDS+=($!)
    done
}

median() { # median of a command from hyperfine's JSON, in ms
    python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["results"][0]["median"]*1000))' "$1"
}

mapfile -t IGPU_NODES < <(SCAN_VERBOSE=1 "$SCAN" "$SYS" /proc "$DEV" 0000:00:02.0 | sed -n 's/^node //p')

ROWS=()
bench() { # bench <label> <holders> <BDF> <node>...: time all three, add a table row
    local label=$1 n=$2 bdf=$3
    shift 3
    local procs found h f l
    procs=$(find /proc -maxdepth 1 -name '[0-9]*' | wc -l)
    found=$("$SCAN" "$SYS" /proc "$DEV" "$bdf")
    echo "$label: $procs processes; handoff: $found" >&2
    hyperfine --warmup 3 --export-json "$OUT/handoff.json" --style basic \
        "$SCAN $SYS /proc $DEV $bdf" >&2
    hyperfine --warmup 3 --ignore-failure --export-json "$OUT/fuser.json" --style basic \
        "fuser -v $*" >&2
    hyperfine --warmup 3 --ignore-failure --min-runs 5 --export-json "$OUT/lsof.json" --style basic \
        "lsof $*" >&2
    h=$(median "$OUT/handoff.json")
    f=$(median "$OUT/fuser.json")
    l=$(median "$OUT/lsof.json")
    ROWS+=("$(python3 -c 'import sys; s,n,p,h,f,l=sys.argv[1:]; h,f,l=float(h),float(f),float(l); print(f"| {s} | {n} | {p} | {h:.1f} | {f:.1f} | {l:.1f} | {f/h:.1f}× | {l/h:.1f}× |")' \
        "$label" "$n" "$procs" "$h" "$f" "$l")")
}

for n in "${COUNTS[@]}"; do
    start_holders "$n"
    sleep 0.5
    bench "dGPU, $n holders" "$n" 0000:01:00.0 "${NODES[@]}"
    # The same machine, asking about the iGPU nobody here holds: the walk without any
    # holder's details to read (the usual case when a VM is about to start).
    bench "iGPU, 0 holders" 0 0000:00:02.0 "${IGPU_NODES[@]}"
done

echo
echo "| case | holders | processes | handoff (ms) | fuser -v (ms) | lsof (ms) | fuser/handoff | lsof/handoff |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
