#!/usr/bin/env bash
# Benchmark: the holders scan (examples/scan: gpu_nodes + scan) against `fuser -v` and
# `lsof` on the same nodes, with N real processes each holding one of the simulated GPU's
# nodes, plus whatever else runs on the machine. Then `handoff status --json` on the same
# machine state, with a config whose [host] is the sim tree: with one VM on libvirt's
# in-process test driver, with `vm = []`, and split into start-up and the rest.
#
#   benches/holders.sh [N ...]        default: 100 1000
#
# Needs hyperfine, fuser (psmisc), lsof; root (the sim tree's nodes are made with mknod).
# Prints markdown tables of medians and ratios, with the 1-minute load average when each
# row started; hyperfine's JSON goes to $OUT (default: a temp dir, removed at exit). Every
# process it starts is killed at exit, by pid. RUNS (default 30) is the minimum number of
# runs per command (lsof: a third of it); the machine is shared, so medians need many.
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

RUNS=${RUNS:-30}
# handoff runs handoff-vm for `status` with a VM configured.
cargo build --release --quiet -p handoff --example scan --example status_nolibvirt --bin handoff -p handoff-libvirt --bin handoff-vm
SCAN=$PWD/target/release/examples/scan
HANDOFF=$PWD/target/release/handoff
STATUS_NOLIBVIRT=$PWD/target/release/examples/status_nolibvirt

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

count_processes() { # processes now; a glob, since find fails when one exits meanwhile
    local p=(/proc/[0-9]*)
    echo "${#p[@]}"
}

load() { # the 1-minute load average
    cut -d' ' -f1 /proc/loadavg
}

# hyperfine without a shell (-N): the commands are plain argv, and a shell's start-up
# (subtracted by estimate otherwise) is as large as what is measured here.
hf() { # hf <json> <min runs> <command>
    hyperfine -N --warmup 3 --ignore-failure --min-runs "$2" --export-json "$1" --style basic "$3" >&2
}

config() { # config <file> <BDF> <vm table>: a handoff config on the sim tree
    cat >"$1" <<TOML
$3

[gpu]
address = "$2"

[host]
sysfs = "$SYS"
proc = "/proc"
dev = "$DEV"
run = "$WORK/sim/run"
TOML
}

mapfile -t IGPU_NODES < <(SCAN_VERBOSE=1 "$SCAN" "$SYS" /proc "$DEV" 0000:00:02.0 | sed -n 's/^node //p')

ROWS=()
bench() { # bench <label> <holders> <BDF> <node>...: time all three, add a table row
    local label=$1 n=$2 bdf=$3
    shift 3
    local procs found h f l load0
    procs=$(count_processes)
    found=$("$SCAN" "$SYS" /proc "$DEV" "$bdf")
    echo "$label: $procs processes; handoff: $found" >&2
    load0=$(load)
    hf "$OUT/handoff.json" "$RUNS" "$SCAN $SYS /proc $DEV $bdf"
    hf "$OUT/fuser.json" "$RUNS" "fuser -v $*"
    hf "$OUT/lsof.json" $((RUNS / 3)) "lsof $*"
    h=$(median "$OUT/handoff.json")
    f=$(median "$OUT/fuser.json")
    l=$(median "$OUT/lsof.json")
    ROWS+=("$(python3 -c 'import sys; s,n,p,h,f,l,ld=sys.argv[1:]; h,f,l=float(h),float(f),float(l); print(f"| {s} | {n} | {p} | {h:.1f} | {f:.1f} | {l:.1f} | {f/h:.1f}× | {l/h:.1f}× | {ld} |")' \
        "$label" "$n" "$procs" "$h" "$f" "$l" "$load0")")
}

STATUS_ROWS=()
bench_status() { # bench_status <label> <BDF>: handoff status --json, and its parts
    local label=$1 bdf=$2 procs load0 start rest novm vm
    procs=$(count_processes)
    config "$WORK/novm.toml" "$bdf" "vm = []"
    config "$WORK/vm.toml" "$bdf" $'[[vm]]\nname = "test"\nuri = "test:///default"'
    load0=$(load)
    # Start-up alone: the loader mapping and relocating libvirt.so and its dependencies.
    hf "$OUT/start.json" "$RUNS" "$HANDOFF --help"
    # The same status and JSON in a binary that doesn't link libvirt.
    hf "$OUT/rest.json" "$RUNS" "$STATUS_NOLIBVIRT $WORK/novm.toml"
    hf "$OUT/novm.json" "$RUNS" "$HANDOFF --config $WORK/novm.toml status --json"
    hf "$OUT/vm.json" "$RUNS" "$HANDOFF --config $WORK/vm.toml status --json"
    start=$(median "$OUT/start.json")
    rest=$(median "$OUT/rest.json")
    novm=$(median "$OUT/novm.json")
    vm=$(median "$OUT/vm.json")
    STATUS_ROWS+=("$(python3 -c 'import sys; s,p,a,b,c,d,ld=sys.argv[1:]; a,b,c,d=map(float,(a,b,c,d)); print(f"| {s} | {p} | {d:.1f} | {c:.1f} | {d-c:+.1f} | {a:.1f} | {b:.1f} | {ld} |")' \
        "$label" "$procs" "$start" "$rest" "$novm" "$vm" "$load0")")
}

for n in "${COUNTS[@]}"; do
    start_holders "$n"
    sleep 0.5
    bench "dGPU, $n holders" "$n" 0000:01:00.0 "${NODES[@]}"
    # The same machine, asking about the iGPU nobody here holds: the walk without any
    # holder's details to read (the usual case when a VM is about to start).
    bench "iGPU, 0 holders" 0 0000:00:02.0 "${IGPU_NODES[@]}"
    bench_status "dGPU, $n holders" 0000:01:00.0
    bench_status "iGPU, 0 holders" 0000:00:02.0
done

echo
echo "| case | holders | processes | handoff (ms) | fuser -v (ms) | lsof (ms) | fuser/handoff | lsof/handoff | load |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| status --json | processes | test:///default VM (ms) | vm = [] (ms) | libvirt's share (ms) | start-up: handoff --help (ms) | without libvirt linked (ms) | load |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${STATUS_ROWS[@]}"
