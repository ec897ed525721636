#!/usr/bin/env bash
# The holder publisher (`handoff publish-holders`, issue 16): its wakeups while nothing
# opens or closes a GPU node (voluntary + involuntary context switches of every thread over
# IDLE s: the target is zero), its idle RSS, and the delay from a process's open(2) / last
# close(2) of a GPU node to `holders.json` being replaced with the new set.
#
# Real parts: the handoff binary (PROFILE=release by default; PROFILE=debug uses
# target/debug), a simulated GPU tree with `mknod`ed nodes (1:3), the real /proc, and this
# script's python3 as the GPU job. The file is watched with inotify on the run dir (the
# way a surface hears it), so the delay is what a surface would see.
#
# Usage: [PROFILE=debug] benches/publisher.sh [rounds] [idle-seconds]   (as root; prints Markdown)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-30}
IDLE=${2:-10}
PROFILE=${PROFILE:-release}
T=$(mktemp -d /tmp/handoff-publisher.XXXXXX)
PUBPID=
cleanup() {
  set +e
  [ -n "$PUBPID" ] && kill -TERM "$PUBPID" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

if [ "$PROFILE" = release ]; then
  cargo build -q --release -p handoff --bin handoff
else
  cargo build -q -p handoff --bin handoff
fi
BIN=target/$PROFILE/handoff

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
[gpu]
address = "0000:01:00.0"
host_driver = "nvidia"
[host]
sysfs = "$T/sys"
dev = "$T/dev"
run = "$T/run"
EOF
chmod 0644 "$T/config.toml"

"$BIN" publish-holders --system-config "$T/config.toml" &
PUBPID=$!

echo "== $BIN ($PROFILE); processes on this machine: $(ls -d /proc/[0-9]* | wc -l); load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
python3 - "$T" "$PUBPID" "$ROUNDS" "$IDLE" <<'PY'
import ctypes, json, os, select, statistics, sys, time
root, pub, rounds, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
node, published = f"{root}/dev/nvidia0", f"{root}/run/holders.json"

libc = ctypes.CDLL(None, use_errno=True)
ifd = libc.inotify_init1(os.O_NONBLOCK)
IN_MOVED_TO = 0x80
libc.inotify_add_watch(ifd, f"{root}/run".encode(), IN_MOVED_TO)

def pids():
    try:
        return [h["pid"] for h in json.load(open(published))["gpus"][0]["holders"]]
    except (OSError, ValueError):
        return None

def wait_for(want, t0, limit=5.0):
    """ms from t0 until a rename puts `want` holders in the file; None if not within limit."""
    while time.perf_counter() - t0 < limit:
        if select.select([ifd], [], [], 0.05)[0]:
            at = time.perf_counter()
            try:
                os.read(ifd, 65536)
            except BlockingIOError:
                pass
            if pids() == want:
                return (at - t0) * 1000
    return None

end = time.time() + 10
while pids() is None and time.time() < end:
    time.sleep(0.05)
assert pids() == [], f"no first publication: {pids()}"
try:
    os.read(ifd, 65536)
except BlockingIOError:
    pass

def ctxt(pid):
    s = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        name = open(f"/proc/{pid}/task/{task}/comm").read().strip()
        for l in open(f"/proc/{pid}/task/{task}/status"):
            if l.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                s[name] = s.get(name, 0) + int(l.split()[1])
    return s

def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return l.split()[1] + " kB"

time.sleep(1)
before = ctxt(pub)
time.sleep(idle)
after = ctxt(pub)
idle_rss = rss(pub)

res = {"open → holders.json": [], "close → holders.json": []}
missed = {k: 0 for k in res}
me = os.getpid()
def measure(key, want, t0):
    ms = wait_for(want, t0)
    if ms is None:
        missed[key] += 1
    else:
        res[key].append(ms)

for _ in range(rounds):
    t0 = time.perf_counter()
    fd = os.open(node, os.O_RDONLY)   # this python3 is the GPU job
    measure("open → holders.json", [me], t0)
    time.sleep(0.1)
    t0 = time.perf_counter()
    os.close(fd)
    measure("close → holders.json", [], t0)
    time.sleep(0.1)

print(f"\n| measure (n={rounds}) | median | max | missed (none within 5 s) |\n|---|---|---|---|")
for k, v in res.items():
    if v:
        print(f"| {k} | {statistics.median(v):.1f} ms | {max(v):.1f} ms | {missed[k]} |")
    else:
        print(f"| {k} | – | – | {missed[k]} |")
per = {t: after.get(t, 0) - before.get(t, 0) for t in after}
print(f"\n| publish-holders | over {idle} s idle |\n|---|---|")
print("| context switches, by thread | " + ", ".join(f"{t} {c}" for t, c in sorted(per.items())) + " |")
print(f"| RSS | {idle_rss}, {len(after)} threads |")
PY
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
