#!/usr/bin/env bash
# The README's first quick-start command: install what is needed, build, and show what
# handoff sees on this machine. On a machine without a passthrough GPU it says so.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh || exit 1

echo "handoff: building (release)…"
cargo build --release --quiet --workspace || exit 1
bin=target/release/handoff

echo
echo "\$ handoff status"
"$bin" status
echo
echo "\$ handoff doctor"
"$bin" doctor
rc=$?
echo
if [ $rc -ne 0 ]; then
  echo "handoff doctor found problems (above): this host is not ready for a passthrough handoff yet."
else
  echo "This host is ready. Next: handoff install-hooks (see README)."
fi
echo "The binaries are in $(pwd)/target/release: handoff, handoff-tray, handoff-block."
