#!/usr/bin/env bash
# `handoff blockers --json` beside `fuser -v` and `lsof` on the same GPU nodes, on a machine
# with ~PROCS processes (default 1000) of which HOLDERS (default 10) hold one of the
# simulated GPU's mknod'ed nodes: the question before every handoff ("what holds it?"),
# answered by handoff's /proc walk and by the two usual tools.
#
#   benches/blockers.sh
#
# Needs hyperfine, fuser (psmisc), lsof; root (the sim tree's nodes are made with mknod,
# and as root every process can be inspected, as by the hook). Targets: ≥ 5× faster than
# fuser -v, ≥ 12× faster than lsof. Runs are interleaved: ROUNDS rounds of RUNS/ROUNDS runs
# of each command in turn (lsof a third as many), medians over all of a command's runs.
# Every process it starts is killed at exit, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in hyperfine fuser lsof; do
    command -v "$tool" >/dev/null || { echo "blockers.sh: $tool is not installed" >&2; exit 1; }
done
PROCS=${PROCS:-1000}
HOLDERS=${HOLDERS:-10}
RUNS=${RUNS:-60}
ROUNDS=${ROUNDS:-6}
cargo build --release --quiet -p handoff --bin handoff --example scan
SCAN=$PWD/target/release/examples/scan
HANDOFF=$PWD/target/release/handoff

WORK=$(mktemp -d "${TMPDIR:-/tmp}/handoff-bench-blockers.XXXXXX")
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

DEV=$("$SCAN" --build-sim "$WORK/sim")
SYS=$WORK/sim/sys
mapfile -t NODES < <(SCAN_VERBOSE=1 "$SCAN" "$SYS" /proc "$DEV" 0000:01:00.0 | sed -n 's/^node //p')
cat >"$WORK/config.toml" <<TOML
vm = []

[gpu]
address = "0000:01:00.0"

[host]
sysfs = "$SYS"
proc = "/proc"
dev = "$DEV"
run = "$WORK/sim/run"
TOML

count_processes() { local p=(/proc/[0-9]*); echo "${#p[@]}"; }
for ((i = 0; i < HOLDERS; i++)); do
    sleep 100000 <"${NODES[i % ${#NODES[@]}]}" >/dev/null 2>&1 &
    PIDS+=($!)
done
# The rest: processes that hold nothing of the GPU, up to ~PROCS in all.
others=$((PROCS - $(count_processes)))
for ((i = 0; i < others; i++)); do
    sleep 100000 </dev/null >/dev/null 2>&1 &
    PIDS+=($!)
done
sleep 0.5
procs=$(count_processes)
found=$("$HANDOFF" --config "$WORK/config.toml" blockers --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("holders", d.get("scan", {}).get("holders", []))))' || true)
echo "GPU nodes: ${#NODES[@]}; processes: $procs; holders handoff sees: $found" >&2

measure() { # measure <key> <runs> <command>: one round, appended to $WORK/<key>.times
    hyperfine -N --warmup 2 --ignore-failure --runs "$2" --style none --export-json "$WORK/r.json" "$3" >/dev/null
    python3 -c 'import json,sys; print("\n".join(str(t) for t in json.load(open(sys.argv[1]))["results"][0]["times"]))' \
        "$WORK/r.json" >>"$WORK/$1.times"
}
median() { python3 -c 'import statistics,sys; print("%.2f" % (1000*statistics.median(float(l) for l in open(sys.argv[1]))))' "$WORK/$1.times"; }
per=$((RUNS / ROUNDS))
load0=$(cut -d' ' -f1 /proc/loadavg)
for ((r = 0; r < ROUNDS; r++)); do
    measure handoff "$per" "$HANDOFF --config $WORK/config.toml blockers --json"
    measure fuser "$per" "fuser -v ${NODES[*]}"
    measure lsof $(((per + 2) / 3)) "lsof ${NODES[*]}"
done
load1=$(cut -d' ' -f1 /proc/loadavg)
h=$(median handoff) f=$(median fuser) l=$(median lsof)
echo "$procs processes, $HOLDERS holding the GPU's nodes (${#NODES[@]} nodes), $RUNS runs each ($ROUNDS interleaved rounds), load $load0 → $load1 ($(nproc) cores)"
echo
echo "| handoff blockers --json (ms) | fuser -v (ms) | lsof (ms) | fuser/handoff | lsof/handoff |"
echo "|---:|---:|---:|---:|---:|"
python3 -c 'import sys; h,f,l=map(float,sys.argv[1:]); print(f"| {h:.1f} | {f:.1f} | {l:.1f} | {f/h:.1f}× | {l/h:.1f}× |")' "$h" "$f" "$l"
