#!/usr/bin/env bash
# What libvirtd pays for handoff's hook on every event of every VM: `handoff hook
# <unrelated-vm> started begin -` (an event handoff ignores, for a VM it does not manage)
# beside a minimal shell hook dispatcher (/bin/sh running the scripts under
# qemu.d/<vm>/<op>/<sub>/, of which there are none for this VM), and `handoff-vm --version`
# (a binary that links libvirt doing nothing: the least the hook would cost if the CLI still
# linked libvirt).
# Then `prepare begin` of an unrelated VM with its domain XML on stdin (handoff reads its
# config and the XML to see that the VM does not pass the GPU through).
#
#   benches/hook.sh            RUNS (default 300) runs per command, interleaved in rounds
#
# Needs hyperfine. Prints a markdown table of medians and ratios (target: handoff ≤ 1.5×
# the shell dispatcher). Runs are interleaved: ROUNDS rounds of RUNS/ROUNDS runs of each
# command in turn, and the median is over all of a command's runs, so a busy moment of the
# shared machine falls on every command alike.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || { echo "hook.sh: hyperfine is not installed" >&2; exit 1; }
RUNS=${RUNS:-300}
ROUNDS=${ROUNDS:-10}
cargo build --release --quiet -p handoff --bin handoff -p handoff-libvirt --bin handoff-vm
HANDOFF=$PWD/target/release/handoff
HANDOFF_VM=$PWD/target/release/handoff-vm

WORK=$(mktemp -d "${TMPDIR:-/tmp}/handoff-bench-hook.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/hooks/qemu.d"
cat >"$WORK/dispatch" <<SH
#!/bin/sh
# The usual qemu hook dispatcher: run each executable under qemu.d/<vm>/<op>/<sub>/.
dir="$WORK/hooks/qemu.d/\$1/\$2/\$3"
[ -d "\$dir" ] || exit 0
for h in "\$dir"/*; do
    [ -x "\$h" ] && { "\$h" "\$@" || exit \$?; }
done
exit 0
SH
chmod +x "$WORK/dispatch"
# A root-owned system config when run as root (the hook insists), the GPU at 01:00.0.
printf '[gpu]\naddress = "0000:01:00.0"\n[[vm]]\nname = "win11"\n' >"$WORK/config.toml"
cat >"$WORK/other.xml" <<'XML'
<domain type='kvm'><name>router</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
<os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='/var/lib/libvirt/images/router.qcow2'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain>
XML

measure() { # measure <key> <command>: one round of runs, appended to $WORK/<key>.times
    local key=$1
    shift
    hyperfine -N --warmup 3 --runs $((RUNS / ROUNDS)) --style none --export-json "$WORK/r.json" "$1" >/dev/null
    python3 -c 'import json,sys; print("\n".join(str(t) for t in json.load(open(sys.argv[1]))["results"][0]["times"]))' \
        "$WORK/r.json" >>"$WORK/$key.times"
}
load0=$(cut -d' ' -f1 /proc/loadavg)
for ((r = 0; r < ROUNDS; r++)); do
    # The shim's exact form: `handoff hook -- <domain> <op> <sub> <extra>`.
    measure shell "$WORK/dispatch router started begin -"
    measure handoff "$HANDOFF hook -- router started begin -"
    measure vm "$HANDOFF_VM --version"
    # Debian 12's hyperfine has no --input: a shell redirects the XML, for both alike.
    measure prepare "/bin/sh -c 'exec $HANDOFF hook --system-config $WORK/config.toml -- router prepare begin - <$WORK/other.xml'"
    measure shell_prepare "/bin/sh -c 'exec $WORK/dispatch router prepare begin - <$WORK/other.xml'"
done
load1=$(cut -d' ' -f1 /proc/loadavg)
median() { python3 -c 'import statistics,sys; print("%.3f" % (1000*statistics.median(float(l) for l in open(sys.argv[1]))))' "$WORK/$1.times"; }
s=$(median shell) h=$(median handoff) v=$(median vm) p=$(median prepare) sp=$(median shell_prepare)
echo "libvirt hook, $RUNS runs each in $ROUNDS interleaved rounds, load $load0 → $load1 ($(nproc) cores)"
echo
echo "| event | shell dispatcher (ms) | handoff hook (ms) | handoff/shell | handoff-vm --version, linking libvirt (ms) |"
echo "|---|---:|---:|---:|---:|"
python3 -c 'import sys; s,h,v=map(float,sys.argv[1:4]); print(f"| `started begin`, unrelated VM | {s:.2f} | {h:.2f} | {h/s:.2f}× | {v:.2f} |")' "$s" "$h" "$v"
python3 -c 'import sys; s,h=map(float,sys.argv[1:3]); print(f"| `prepare begin`, unrelated VM, XML on stdin (both behind `sh -c` for the redirection) | {s:.2f} | {h:.2f} | {h/s:.2f}× | |")' "$sp" "$p"
