#!/bin/sh
# /init of the real-kernel guest (tests/kernel/mod.rs boots it): mount the kernel's
# filesystems, load the slot's drivers the way a host's boot would, wait until both
# functions have registered their device nodes, run /scenarios.sh, power off. Everything
# goes to the serial console, which the harness reads.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/handoff /tmp
while read -r m; do
  insmod "$m" || echo "GUEST-ERROR insmod $m failed"
done </etc/guest-modules
# The driver link appears before the card is registered: wait for the nodes themselves.
i=0
while ! { [ -e /dev/snd/controlC0 ] && [ -e /dev/dri/card0 ]; }; do
  i=$((i + 1))
  if [ $i -gt 100 ]; then
    echo "GUEST-ERROR no /dev/snd/controlC0 or /dev/dri/card0 after 10 s"
    break
  fi
  sleep 0.1
done
echo "GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
sh /scenarios.sh 2>&1
echo "GUEST-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
