#!/usr/bin/env bash
# The README's first quick-start command: install what is needed, build, and run
# `handoff demo` (simulated GPU, VM and GPU user; the tray when there is a display, else the
# scripted walkthrough), then show what handoff sees on this machine.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh || exit 1

echo "handoff: building (release)…"
cargo build --release --quiet --workspace || exit 1
bin=target/release/handoff

echo
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  echo "\$ handoff demo    # a simulated GPU, VM and GPU user; the tray on them; Ctrl-C ends it"
  "$bin" demo
else
  echo "\$ handoff demo --script    # no display here: the demo does the clicks itself"
  "$bin" demo --script
fi
rc=$?
echo
echo "\$ handoff status    # this machine, for real"
"$bin" status
echo
echo "The binaries are in $(pwd)/target/release: handoff (with handoff-vm, its libvirt side), handoff-tray, handoff-block."
echo "On a machine with a passthrough GPU, \`handoff doctor\` says what to set up next."
exit $rc
