#!/usr/bin/env bash
# One-shot cost of handoff-block beside a typical shell block (readlink of the driver +
# fuser on the GPU nodes + virsh domstate), in the same run, on the same simulated GPU.
# Usage: benches/block.sh [path/to/handoff-block]   (default: target/release/handoff-block)
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCK=${1:-target/release/handoff-block}
[ -x "$BLOCK" ] || cargo build --release -p handoff-block
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# A minimal simulated GPU (sysfs links + /dev files) so both blocks read the same tree.
python3 - "$tmp" <<'PY'
import os, sys
root = sys.argv[1]
d = f"{root}/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
os.makedirs(d); os.makedirs(f"{root}/sys/bus/pci/devices"); os.makedirs(f"{root}/sys/bus/pci/drivers/nvidia")
for k, v in {"vendor": "0x10de", "device": "0x2203", "class": "0x030000"}.items():
    open(f"{d}/{k}", "w").write(v + "\n")
os.symlink("../../../bus/pci/drivers/nvidia", f"{d}/driver")
os.symlink("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0", f"{root}/sys/bus/pci/devices/0000:01:00.0")
os.makedirs(f"{root}/dev/dri/by-path"); os.makedirs(f"{root}/run")
for n in ["nvidia0", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "dri/card1", "dri/renderD128"]:
    open(f"{root}/dev/{n}", "w").close()
PY
cat >"$tmp/config.toml" <<TOML
[gpu]
address = "0000:01:00.0"
[[vm]]
name = "handoff-bench-none"
label = "Windows"
[host]
sysfs = "$tmp/sys"
dev = "$tmp/dev"
run = "$tmp/run"
TOML
cat >"$tmp/shell-block.sh" <<SH
#!/bin/sh
drv=\$(basename "\$(readlink $tmp/sys/bus/pci/devices/0000:01:00.0/driver)")
busy=\$(fuser $tmp/dev/nvidia* $tmp/dev/dri/card1 $tmp/dev/dri/renderD128 2>/dev/null | wc -w)
vm=\$(virsh -c qemu:///system domstate handoff-bench-none 2>/dev/null || echo "shut off")
echo "GPU: \$drv \$busy \$vm"
SH
chmod +x "$tmp/shell-block.sh"
export HANDOFF_CONFIG="$tmp/config.toml"
echo "== processes on this machine: $(ls -d /proc/[0-9]* | wc -l); libvirtd answering: $(virsh -c qemu:///system version >/dev/null 2>&1 && echo yes || echo no)"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
hyperfine -N --warmup 20 --runs 200 --export-markdown "$tmp/h.md" --export-json "$tmp/h.json" \
  "$BLOCK" "$tmp/shell-block.sh" >&2
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
cat "$tmp/h.md"
# CPU per run (user + system), averaged by hyperfine over the 200 runs; /usr/bin/time
# below only has 10 ms resolution.
python3 - "$tmp/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
cpu = [(x["user"] + x["system"]) * 1000 for x in r]
for x, c in zip(r, cpu):
    print(f"{x['command'].split('/')[-1]}: mean CPU {c:.2f} ms (user {x['user']*1000:.2f} + sys {x['system']*1000:.2f}), median wall {x['median']*1000:.2f} ms")
print(f"shell/block: wall mean {r[1]['mean']/r[0]['mean']:.1f}x, median {r[1]['median']/r[0]['median']:.1f}x, CPU {cpu[1]/cpu[0]:.1f}x")
PY
for c in "$BLOCK" "$tmp/shell-block.sh"; do
  /usr/bin/time -v "$c" 2>"$tmp/t" >/dev/null
  printf '%s: user %ss sys %ss maxRSS %s kB\n' "$(basename "$c")" \
    "$(grep 'User time' "$tmp/t" | awk '{print $NF}')" "$(grep 'System time' "$tmp/t" | awk '{print $NF}')" \
    "$(grep 'Maximum resident' "$tmp/t" | awk '{print $NF}')"
done
