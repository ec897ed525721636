#!/usr/bin/env bash
# handoff-tray benchmark: idle RSS and CPU over 60 s, wakeups while idle, and the delay
# from a bind/unbind or a libvirt lifecycle event to the item's new icon/tooltip signal.
#
# Real parts: the release build of handoff-tray, a private session bus, the simulated GPU
# (handoff-kernelsim: FUSE sysfs whose bind/unbind send real kernel uevents), the system
# libvirtd with a tiny TCG domain (no hook installed: the GPU does not move, the domain's
# lifecycle events do). No panel: the item exports its properties and signals on the bus
# whether or not a watcher is there (the idle numbers include waiting for one).
#
# Usage: benches/tray.sh [idle-seconds]   (as root; prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${1:-60}
T=$(mktemp -d /tmp/handoff-bench.XXXXXX)
DOM=handoff-bench-$$
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
  virsh -c qemu:///system destroy "$DOM" >/dev/null 2>&1
  virsh -c qemu:///system undefine "$DOM" >/dev/null 2>&1
  [ -n "${BUSPID:-}" ] && kill "$BUSPID" 2>/dev/null
  mountpoint -q "$T/ws/sysfs" && umount -l "$T/ws/sysfs"
  rm -rf "$T"
}
trap cleanup EXIT

# The tray runs target/release/handoff as its libvirt agent, which execs handoff-vm.
cargo build -q --release -p handoff-tray
cargo build -q --release --bin handoff
cargo build -q --release -p handoff-libvirt --bin handoff-vm
cargo build -q --release -p handoff-kernelsim --bin handoff-kernelsim
TRAY=target/release/handoff-tray

setsid target/release/handoff-kernelsim --root "$T/ws" >"$T/sim.out" 2>"$T/sim.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -e "$T/ws/sysfs/bus/pci/devices/0000:01:00.0" ] && break; sleep 0.1; done
SYS=$T/ws/sysfs

sed "s/@NAME@/$DOM/" tests/fixtures/libvirt/tiny-domain.xml >"$T/dom.xml"
virsh -q -c qemu:///system define "$T/dom.xml" >/dev/null
cat >"$T/config.toml" <<EOF
[gpu]
address = "0000:01:00.0"
host_driver = "nvidia"
[host]
sysfs = "$SYS"
dev = "$T/ws/dev"
run = "$T/ws/run"
[[vm]]
name = "$DOM"
label = "Bench"
EOF

out=$(dbus-daemon --session --fork --print-address=1 --print-pid=1 --address="unix:path=$T/bus")
BUS=$(echo "$out" | sed -n 1p)
BUSPID=$(echo "$out" | sed -n 2p)

setsid dbus-monitor --address "$BUS" "type='signal',interface='org.kde.StatusNotifierItem'" >"$T/signals" 2>/dev/null &
PIDS+=($!)
setsid virsh -c qemu:///system event --all --loop --timestamp >"$T/virsh-events" 2>/dev/null &
PIDS+=($!)
sleep 0.5

DBUS_SESSION_BUS_ADDRESS=$BUS HANDOFF_CONFIG=$T/config.toml HANDOFF_LOG=handoff_tray=debug,handoff=info setsid "$TRAY" 2>"$T/tray.log" &
TRAYPID=$!
PIDS+=($TRAYPID)
sleep 3

# The tray's child `handoff __agent` holds libvirt (libvirt/src/agent.rs); measured on its own.
AGENTPID=$(pgrep -P "$TRAYPID" -f __agent | head -1)
[ -n "$AGENTPID" ] || { echo "no handoff __agent child of the tray; see $T/tray.log" >&2; cat "$T/tray.log" >&2; exit 1; }
ticks() { awk '{print $14+$15}' "/proc/${1:-$TRAYPID}/stat"; }
ctxt() { cat /proc/$TRAYPID/task/*/status | awk '/voluntary_ctxt_switches/ {s+=$2} END {print s}'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/${1:-$TRAYPID}/status"; }
pss() { awk '/^Pss:/ {print $2}' "/proc/${1:-$TRAYPID}/smaps_rollup"; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k/1024 }'; }
HZ=$(getconf CLK_TCK)

threads=$(ls /proc/$TRAYPID/task | wc -l)
# Where the resident memory is, from /proc/<pid>/smaps: the binary's own pages, the
# shared libraries' (and how many), and anonymous memory (heap, malloc arenas, stacks).
breakdown() {
  local pid=${1:-$TRAYPID}
  awk -v exe="$(readlink /proc/$pid/exe)" '
    /^[0-9a-f]+-[0-9a-f]+ / { p = (NF >= 6) ? $6 : ""
      k = (p == exe) ? "bin" : (p ~ /\.so/) ? "lib" : (p == "" || p ~ /^\[(heap|stack)/) ? "anon" : "other"
      if (k == "lib") libs[p] = 1; next }
    /^Rss:/ { r[k] += $2 }
    END { n = 0; for (l in libs) n++
      printf "binary %.1f MB, %d shared libraries %.1f MB, heap/anon/stacks %.1f MB", r["bin"]/1024, n, r["lib"]/1024, r["anon"]/1024 }' "/proc/$pid/smaps"
}
mem0=$(breakdown)
amem0=$(breakdown "$AGENTPID")
rss0=$(rss); t0=$(ticks); c0=$(ctxt)
arss0=$(rss "$AGENTPID"); at0=$(ticks "$AGENTPID")
timeout -s INT "$IDLE" strace -f -c -p "$TRAYPID" -o "$T/strace" >/dev/null 2>&1 || true
rss1=$(rss); t1=$(ticks); c1=$(ctxt)
arss1=$(rss "$AGENTPID"); at1=$(ticks "$AGENTPID")
pss1=$(pss); apss1=$(pss "$AGENTPID")
calls=$(awk '$NF=="total" {print $4}' "$T/strace")
top=$(awk 'NR>2 && $1 !~ /^-/ && $NF!="total" && NF>=5 {print $NF"="$4}' "$T/strace" | head -5 | paste -sd' ')

# The time of the first NewIcon/NewToolTip signal after $1 (epoch seconds).
signal_after() {
  local since=$1 member=$2
  awk -v s="$since" -v m="member=$member" '/^signal/ && index($0, m) { for (i=1;i<=NF;i++) if ($i ~ /^time=/) { t=substr($i,6); if (t+0 > s+0) { print t; exit } } }' "$T/signals"
}
# The time of the last $2 signal within 1 s after $1: the tray first updates "Last event"
# in the tooltip, then again once it has re-read the state; the second is what counts.
signal_last_within() {
  local since=$1 member=$2
  awk -v s="$since" -v m="member=$member" '/^signal/ && index($0, m) { for (i=1;i<=NF;i++) if ($i ~ /^time=/) { t=substr($i,6); if (t+0 > s+0 && t+0 <= s+1.0) last=t } } END { if (last != "") print last }' "$T/signals"
}
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b-a)*1000 }'; }

uevent_lat=()
for i in 1 2 3 4 5; do
  t=$(date +%s.%N); echo 0000:01:00.0 >"$SYS/bus/pci/drivers/nvidia/unbind"
  for _ in $(seq 100); do s=$(signal_after "$t" NewIcon); [ -n "$s" ] && break; sleep 0.02; done
  uevent_lat+=("$(ms "$t" "$s")")
  t=$(date +%s.%N); echo 0000:01:00.0 >"$SYS/bus/pci/drivers/nvidia/bind"
  for _ in $(seq 100); do s=$(signal_after "$t" NewIcon); [ -n "$s" ] && break; sleep 0.02; done
  uevent_lat+=("$(ms "$t" "$s")")
  sleep 0.3
done

event_lat=()
for i in 1 2 3; do
  for verb in start destroy; do
    n0=$(grep -c "lifecycle" "$T/virsh-events" || true)
    t=$(date +%s.%N)
    virsh -q -c qemu:///system "$verb" "$DOM" >/dev/null
    # The libvirt event as another client (virsh event) received it.
    for _ in $(seq 200); do [ "$(grep -c lifecycle "$T/virsh-events" || true)" -gt "$n0" ] && break; sleep 0.02; done
    line=$(grep lifecycle "$T/virsh-events" | sed -n "$((n0 + 1))p")
    ev=$(date -d "$(echo "$line" | cut -d' ' -f1-2 | sed 's/+0000:$//') UTC" +%s.%N 2>/dev/null || echo "$t")
    sleep 1.1
    s=$(signal_last_within "$ev" NewToolTip)
    event_lat+=("$(ms "$ev" "$s")")
    sleep 0.5
  done
done

stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "median %s ms, max %s ms (n=%d)", a[int((NR+1)/2)], a[NR], NR}'; }

cat <<EOF
| measure | target | result |
|---|---|---|
| idle RSS (VmRSS) | < 20 MB | $((rss0 / 1024)).$(((rss0 % 1024) * 10 / 1024)) MB at start of idle, $((rss1 / 1024)).$(((rss1 % 1024) * 10 / 1024)) MB after ${IDLE} s; $threads threads |
| idle RSS by kind (smaps) | | $mem0 |
| its libvirt agent (handoff __agent): idle RSS | | $(mb "$arss0") at start of idle, $(mb "$arss1") after ${IDLE} s; $amem0 |
| tray + agent together | | RSS $(mb $((rss1 + arss1))), PSS $(mb $((pss1 + apss1))) (tray PSS $(mb "$pss1"), agent PSS $(mb "$apss1")) |
| agent's idle CPU over ${IDLE} s | ~0 | $((at1 - at0)) ticks (1/$HZ s) |
| idle CPU over ${IDLE} s | ~0 | $((t1 - t0)) ticks (1/$HZ s) = $(awk -v d=$((t1 - t0)) -v hz="$HZ" -v s="$IDLE" 'BEGIN{printf "%.3f%%", d/hz/s*100}') |
| context switches over ${IDLE} s (all threads) | 0 of its own | $((c1 - c0)) (under strace, which adds none to the count of its own) |
| syscalls over ${IDLE} s (strace -f -c) | 0 of its own | ${calls:-0}: ${top:-none} |
| bind/unbind → NewIcon | < 100 ms | $(stats "${uevent_lat[@]}") |
| libvirt lifecycle event → NewToolTip | < 100 ms | $(stats "${event_lat[@]}") |
EOF
echo
echo "uevent latencies (ms): ${uevent_lat[*]}"
echo "lifecycle latencies (ms): ${event_lat[*]}"
echo "strace:"; cat "$T/strace"
echo "tray log (changes):"; grep "change:" "$T/tray.log" | sed "s/^.*change: //" | sort | uniq -c | sort -rn | head -8
grep -m3 "member=" "$T/signals" || true; grep -c "change:" "$T/tray.log" || true
echo "re-reads (collect) in ms:"; grep -o "collected in [0-9.]*[mµ]s" "$T/tray.log" | awk '{v=$3; if (v ~ /µs$/) {sub(/µs/,"",v); v/=1000} else sub(/ms/,"",v); printf "%.1f ", v} END {print ""}'
cp "$T/tray.log" /tmp/handoff-bench-tray.log
