#!/usr/bin/env bash
# Opens and closes of the GPU's nodes → what the surfaces show (issue 16): the delay from
# a process's open(2) of a GPU node to the tray's `NewIcon` signal and to the next line
# of `handoff-block --watch`, and from its last close(2) to the same; and the wakeups of
# both while nothing happens (voluntary context switches of every thread over IDLE s).
#
# Real parts: release builds of handoff-tray and handoff-block, a private session bus
# (no panel: the item emits its signals whether or not a watcher is there), a simulated
# GPU tree with `mknod`ed nodes (1:3), and this script's python3 as the GPU job. No VM is
# configured, so the tray starts no libvirt agent.
#
# Usage: benches/opens.sh [rounds] [idle-seconds]   (as root for mknod; prints Markdown)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-30}
IDLE=${2:-10}
T=$(mktemp -d /tmp/handoff-opens.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  [ -n "${BUSPID:-}" ] && kill "$BUSPID" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

# Each binary alone, as `make` does (a workspace build unifies features).
cargo build -q --release -p handoff-tray
cargo build -q --release -p handoff-block
TRAY=target/release/handoff-tray
BLOCK=target/release/handoff-block

python3 - "$T" <<'PY'
import os, stat, sys
root = sys.argv[1]
d = f"{root}/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
os.makedirs(d); os.makedirs(f"{root}/sys/bus/pci/devices"); os.makedirs(f"{root}/sys/bus/pci/drivers/nvidia")
for k, v in {"vendor": "0x10de", "device": "0x2203", "class": "0x030000"}.items():
    open(f"{d}/{k}", "w").write(v + "\n")
os.symlink("../../../bus/pci/drivers/nvidia", f"{d}/driver")
os.symlink("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0", f"{root}/sys/bus/pci/devices/0000:01:00.0")
os.makedirs(f"{d}/drm/card1"); os.makedirs(f"{d}/drm/renderD128")
os.makedirs(f"{root}/dev/dri"); os.makedirs(f"{root}/run")
for n in ["nvidia0", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "dri/card1", "dri/renderD128"]:
    os.mknod(f"{root}/dev/{n}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
PY
cat >"$T/config.toml" <<EOF
vm = []   # no VM: the tray starts no libvirt agent
[gpu]
address = "0000:01:00.0"
host_driver = "nvidia"
[host]
sysfs = "$T/sys"
dev = "$T/dev"
run = "$T/run"
EOF
export HANDOFF_CONFIG=$T/config.toml

out=$(dbus-daemon --session --fork --print-address=1 --print-pid=1 --address="unix:path=$T/bus")
BUS=$(echo "$out" | sed -n 1p)
BUSPID=$(echo "$out" | sed -n 2p)

echo "== processes on this machine: $(ls -d /proc/[0-9]* | wc -l); load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
DBUS_SESSION_BUS_ADDRESS=$BUS python3 - "$T" "$TRAY" "$BLOCK" "$ROUNDS" "$IDLE" <<'PY'
import os, statistics, subprocess, sys, threading, time
root, tray, block, rounds, idle = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
node = f"{root}/dev/nvidia0"
bus = os.environ["DBUS_SESSION_BUS_ADDRESS"]

def spawn(argv, **kw):
    return subprocess.Popen(argv, start_new_session=True, **kw)

# Lines from a pipe, stamped when read.
def reader(p, q):
    for line in iter(p.stdout.readline, b""):
        q.append((time.perf_counter(), line.decode(errors="replace").rstrip("\n")))

mon = spawn(["dbus-monitor", "--address", bus,
             "type='signal',interface='org.kde.StatusNotifierItem',member='NewIcon'"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
icons = []
threading.Thread(target=reader, args=(mon, icons), daemon=True).start()
time.sleep(0.5)
t = spawn([tray], stderr=open(f"{root}/tray.log", "w"))
b = spawn([block, "--watch"], stdout=subprocess.PIPE, stderr=open(f"{root}/block.log", "w"))
lines = []
threading.Thread(target=reader, args=(b, lines), daemon=True).start()

def end_all():
    for p in (t, b, mon):
        try:
            os.killpg(p.pid, 15)
        except ProcessLookupError:
            pass

import atexit
atexit.register(end_all)  # also when something below fails
time.sleep(3)

def wait(q, start, pred, t0, limit=5.0):
    while time.perf_counter() - t0 < limit:
        for at, l in q[start:]:
            if pred(l):
                return (at - t0) * 1000
        time.sleep(0.0005)
    return None

res = {k: [] for k in ("open → tray NewIcon", "close → tray NewIcon", "open → block line", "close → block line")}
missed = {k: 0 for k in res}
def measure(key, q, start, pred, t0):
    ms = wait(q, start, pred, t0)
    if ms is None:
        missed[key] += 1
    else:
        res[key].append(ms)

for _ in range(rounds):
    ni, nl = len(icons), len(lines)
    t0 = time.perf_counter()
    fd = os.open(node, os.O_RDONLY)   # this python3 is the GPU job
    measure("open → block line", lines, nl, lambda l: "busy" in l, t0)
    measure("open → tray NewIcon", icons, ni, lambda l: "NewIcon" in l, t0)
    time.sleep(0.2)
    ni, nl = len(icons), len(lines)
    t0 = time.perf_counter()
    os.close(fd)
    measure("close → block line", lines, nl, lambda l: l == "GPU: Linux", t0)
    measure("close → tray NewIcon", icons, ni, lambda l: "NewIcon" in l, t0)
    time.sleep(0.2)

# Context switches per thread, by thread name: the kernel's uevents wake the uevent
# thread for every device event on the machine (other tests mounting FUSE, say), which is
# not this bench's doing; the node watch ("handoff-nodes") must stay at zero.
def ctxt(pid):
    s = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        name = open(f"/proc/{pid}/task/{task}/comm").read().strip()
        for l in open(f"/proc/{pid}/task/{task}/status"):
            if l.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                s[name] = s.get(name, 0) + int(l.split()[1])
    return s

def uevents_during(seconds):
    """Kernel uevents on the machine meanwhile (NETLINK_KOBJECT_UEVENT, group 1), for context."""
    import socket
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
    s.bind((0, 1))
    s.settimeout(0.1)
    n, end = 0, time.time() + seconds
    while time.time() < end:
        try:
            s.recv(65536)
            n += 1
        except socket.timeout:
            pass
    s.close()
    return n

def measured():
    time.sleep(1)
    procs = (("handoff-tray", t), ("handoff-block --watch", b))
    before = {n: ctxt(p.pid) for n, p in procs}
    machine_uevents = uevents_during(idle)
    after = {n: ctxt(p.pid) for n, p in procs}

    print(f"\n| measure (n={rounds}) | median | max | missed (none within 5 s) |\n|---|---|---|---|")
    for k, v in res.items():
        if v:
            print(f"| {k} | {statistics.median(v):.1f} ms | {max(v):.1f} ms | {missed[k]} |")
        else:
            print(f"| {k} | – | – | {missed[k]} |")
    print(f"\n| process | context switches over {idle} s idle, by thread |\n|---|---|")
    for n in before:
        per = {t: after[n].get(t, 0) - before[n].get(t, 0) for t in after[n]}
        print(f"| {n} | " + ", ".join(f"{t} {c}" for t, c in sorted(per.items())) + " |")
    print(f"\nkernel uevents on the machine meanwhile (netlink, group 1): {machine_uevents}")

measured()
PY
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
