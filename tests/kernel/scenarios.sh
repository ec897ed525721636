#!/bin/sh
# The scenarios tests/real_kernel.rs checks, run by /init inside the guest, one after the
# other on one boot (a boot is most of the cost; the order is chosen so that each starts
# with the GPU at home, and the hang, which may leave it away, comes last).
#
# This script only acts and reports; the assertions are in tests/real_kernel.rs. It prints:
#   OUT <label> <line>          a command's stdout+stderr, line by line
#   CMD <label> rc=<n> ms=<n>   its exit code and how long it took
#   FACT <key> <value>          something read from the guest's sysfs, /dev or /run
#
# The GPU is the emulated slot 0000:01:00.0 (VGA, bochs-drm) + .1 (HDA, snd_hda_intel), one
# IOMMU group; /etc/handoff/config.toml names it with watchdog_s = 3.

GPU=0000:01:00.0
AUDIO=0000:01:00.1
XML=/etc/handoff/win11.xml
DEV=/sys/bus/pci/devices

ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

run() { # LABEL COMMAND...
  label=$1
  shift
  t0=$(ms)
  "$@" >/tmp/out 2>&1
  rc=$?
  t1=$(ms)
  sed "s/^/OUT $label /" /tmp/out
  echo "CMD $label rc=$rc ms=$((t1 - t0))"
}

fact() { echo "FACT $1 $2"; }

driver_of() {
  if [ -L "$DEV/$1/driver" ]; then basename "$(readlink "$DEV/$1/driver")"; else echo none; fi
}

# A sysfs read that may block in the kernel (driver_override while the device lock is
# held): read in the background, report "blocked" if it has not returned after 1 s. The
# reader is left behind in that case; it finishes when the lock is released.
read_or_blocked() { # FILE
  rm -f /tmp/read.done
  # Not on this function's stdout: a $(…) around it would wait for the blocked reader.
  (cat "$1" >/tmp/read.out 2>&1; touch /tmp/read.done) >/dev/null 2>&1 &
  i=0
  while [ ! -e /tmp/read.done ] && [ $i -lt 10 ]; do sleep 0.1; i=$((i + 1)); done
  if [ -e /tmp/read.done ]; then cat /tmp/read.out; else echo blocked; fi
}

state() { # PREFIX
  fact "$1.driver0" "$(driver_of $GPU)"
  fact "$1.driver1" "$(driver_of $AUDIO)"
  fact "$1.dri" "$(ls /dev/dri 2>/dev/null | tr '\n' ' ')"
  fact "$1.snd" "$(ls /dev/snd 2>/dev/null | tr '\n' ' ')"
  # The group nodes only (/dev/vfio/vfio, the container, is there once vfio is loaded).
  fact "$1.vfio" "$(ls /dev/vfio 2>/dev/null | grep -v '^vfio$' | tr '\n' ' ')"
  fact "$1.run" "$(ls /run/handoff 2>/dev/null | tr '\n' ' ')"
  for r in /run/handoff/*.json; do
    [ -e "$r" ] && [ "$(basename "$r")" != state.json ] && fact "$1.record" "$(tr -d '\n' <"$r")"
  done
}

# --- boot -----------------------------------------------------------------------------
fact boot.group0 "$(basename "$(readlink $DEV/$GPU/iommu_group)")"
fact boot.group1 "$(basename "$(readlink $DEV/$AUDIO/iommu_group)")"
fact boot.group_devices "$(ls /sys/kernel/iommu_groups/"$(basename "$(readlink $DEV/$GPU/iommu_group)")"/devices | tr '\n' ' ')"
fact boot.override1 "$(cat $DEV/$AUDIO/driver_override)"
state boot

# The live surfaces, listening for the whole run: the CLI's watcher and the bar block.
handoff watch --json >/tmp/watch.log 2>&1 &
watch_pid=$!
handoff-block --watch >/tmp/block.log 2>&1 &
block_pid=$!
sleep 1

# --- a process holds the audio function's control node: the hook refuses -----------------
sleep 1000 </dev/snd/controlC0 &
holder=$!
fact snd_holder.pid $holder
run snd_holder.prepare handoff hook win11 prepare begin - <$XML
state snd_holder.after
# libvirt runs release after a refused prepare too: it must leave the GPU alone.
run snd_holder.release handoff hook win11 release end - <$XML
state snd_holder.released
kill $holder
wait $holder 2>/dev/null

# --- a process holds the DRM card: refused as well ----------------------------------------
sleep 1000 </dev/dri/card0 &
holder=$!
fact drm_holder.pid $holder
run drm_holder.prepare handoff hook win11 prepare begin - <$XML
state drm_holder.after
kill $holder
wait $holder 2>/dev/null

# --- the GPU's framebuffer (bochs-drm's fbdev emulation, graphics/fbN): which console is
# bound to it, and a process holding /dev/fbN is refused like a DRM holder -----------------
fact fb.graphics "$(ls $DEV/$GPU/graphics 2>/dev/null | tr '\n' ' ')"
for v in /sys/class/vtconsole/vtcon*; do
  [ -e "$v/name" ] && fact "fb.$(basename "$v")" "bind=$(cat "$v/bind") $(cat "$v/name")"
done
fb=$(ls $DEV/$GPU/graphics 2>/dev/null | grep '^fb' | head -1)
if [ -n "$fb" ]; then
  sleep 1000 </dev/"$fb" &
  holder=$!
  fact fb_holder.pid $holder
  run fb_holder.prepare handoff hook win11 prepare begin - <$XML
  state fb_holder.after
  kill $holder
  wait $holder 2>/dev/null
fi

# --- nothing holds it: prepare hands both functions to vfio-pci, release brings them home --
run handoff.prepare handoff hook win11 prepare begin - <$XML
state handoff.prepared
run handoff.status_vfio handoff status --json
run handoff.release handoff hook win11 release end - <$XML
state handoff.released
fact handoff.override1 "$(cat $DEV/$AUDIO/driver_override)"
fact handoff.drm_of_gpu "$(ls $DEV/$GPU/drm 2>/dev/null | tr '\n' ' ')"
run handoff.blockers_home handoff blockers --json
fact handoff.card "$(ls $DEV/$GPU/drm | grep '^card' | tr '\n' ' ')"
# The console came back with the card (fbcon was moved off the framebuffer and back).
for v in /sys/class/vtconsole/vtcon*; do
  [ -e "$v/name" ] && fact "handoff.$(basename "$v")" "bind=$(cat "$v/bind") $(cat "$v/name")"
done

# --- a process still holds the VFIO group when release runs (a QEMU that has not quite
# exited): release waits watchdog_s, then changes nothing and names it; blockers and status
# show it. Then: does the real kernel block vfio-pci's unbind with only the group fd open?
run vfio_user.prepare handoff hook win11 prepare begin - <$XML
group=$(basename "$(readlink $DEV/$GPU/iommu_group)")
sleep 1000 </dev/vfio/"$group" &
holder=$!
fact vfio_user.pid $holder
run vfio_user.blockers handoff blockers
run vfio_user.blockers_json handoff blockers --json
run vfio_user.status handoff status
run vfio_user.release handoff hook win11 release end - <$XML
state vfio_user.after
run vfio_user.status_after handoff status --json
# The raw unbind of .1 from vfio-pci with only the group fd open (no device fd).
rm -f /tmp/unbind.done
(echo $AUDIO >/sys/bus/pci/drivers/vfio-pci/unbind; touch /tmp/unbind.done) >/dev/null 2>&1 &
i=0
while [ ! -e /tmp/unbind.done ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
if [ -e /tmp/unbind.done ]; then fact vfio_user.raw_unbind returned; else fact vfio_user.raw_unbind blocked; fi
state vfio_user.raw
# Put .1 back on vfio-pci (its override still says so) for the release below.
echo $AUDIO >/sys/bus/pci/drivers_probe 2>/dev/null
kill $holder
wait $holder 2>/dev/null
sleep 1
state vfio_user.holder_gone
run vfio_user.rebind handoff rebind --force
state vfio_user.home

# --- DRM hot-unplug: a holder of card0 the scan cannot see (the same device through a node
# of its own) does not stop bochs-drm's unbind; the old minor stays taken while it is open,
# so the card comes back as card1, and the surfaces must find a holder of that node.
mknod /tmp/hidden-card0 c 226 0
sleep 1000 </tmp/hidden-card0 &
hidden=$!
run hotunplug.prepare handoff hook win11 prepare begin - <$XML
state hotunplug.prepared
run hotunplug.release handoff hook win11 release end - <$XML
state hotunplug.released
card=$(ls $DEV/$GPU/drm | grep '^card' | head -1)
fact hotunplug.card "$card"
sleep 1000 </dev/dri/"$card" &
holder=$!
fact hotunplug.holder_pid $holder
run hotunplug.status_held handoff status --json
run hotunplug.blockers_held handoff blockers
kill $holder $hidden
wait $holder $hidden 2>/dev/null

# --- a holder the scan cannot see (the same device through another node): the unbind hangs
# in the kernel, the watchdog returns, the record says stuck; once the holder goes, rebind
# --force brings the GPU home.
dev=$(cat /sys/class/sound/controlC0/dev)
mknod /tmp/hidden-controlC0 c "${dev%%:*}" "${dev##*:}"
sleep 1000 </tmp/hidden-controlC0 &
holder=$!
fact hang.pid $holder
run hang.blockers handoff blockers
run hang.prepare handoff hook win11 prepare begin - <$XML
state hang.after
fact hang.override1 "$(read_or_blocked $DEV/$AUDIO/driver_override)"
# drivers_probe while the device lock is held: the kernel returns at once and does nothing.
t0=$(ms)
echo $AUDIO >/sys/bus/pci/drivers_probe
fact hang.probe_rc "$? ms=$(($(ms) - t0))"
fact hang.after_probe_driver1 "$(driver_of $AUDIO)"
run hang.rebind_held handoff rebind --force
kill $holder
wait $holder 2>/dev/null
sleep 1
state hang.released_holder
run hang.rebind handoff rebind --force
state hang.home
fact hang.override1_home "$(cat $DEV/$AUDIO/driver_override)"
run hang.status handoff status --json

# --- what the live surfaces saw -------------------------------------------------------------
sleep 1
kill $watch_pid $block_pid
wait $watch_pid $block_pid 2>/dev/null
sed 's/^/OUT watch /' /tmp/watch.log
sed 's/^/OUT block /' /tmp/block.log

# --- one function of the group on vfio-pci, the other on its host driver (after the
# watchers stopped: no surface sees this half-way state): is the group's node there
# already? And with nothing holding the card any more, which index does it come back as?
echo vfio-pci >$DEV/$GPU/driver_override
echo $GPU >$DEV/$GPU/driver/unbind
echo $GPU >/sys/bus/pci/drivers_probe
state partial.one
fact partial.drm "$(ls $DEV/$GPU/drm 2>/dev/null | tr '\n' ' ')"
echo >$DEV/$GPU/driver_override
echo $GPU >/sys/bus/pci/drivers/vfio-pci/unbind
echo $GPU >/sys/bus/pci/drivers_probe
state partial.home
fact partial.card "$(ls $DEV/$GPU/drm 2>/dev/null | grep '^card' | tr '\n' ' ')"
