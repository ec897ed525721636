#!/usr/bin/env bash
# "Binaries stay light" (ARCHITECTURE.md), checked on what people build: a
# `cargo build --workspace` — the README's first command (scripts/try.sh) builds exactly
# that, in release — must give a handoff-block and a handoff (the hook, blockers, bind,
# rebind) that load no libvirt, and a handoff-tray that loads neither libvirt nor GTK.
# Every shared library in a binary's DT_NEEDED is loaded at each start, so `ldd` is the
# test. Fails naming the binary and what it links.
#
#   scripts/test-light-binaries.sh            the release build (as the README's first command)
#   scripts/test-light-binaries.sh --debug    the debug build (what `cargo test` just built)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
[ "${1:-}" = --debug ] && profile=debug
fail() { echo "test-light-binaries: FAIL: $*" >&2; exit 1; }

if [ "$profile" = release ]; then
  # What a binary links is decided by the dependency graph and the features cargo unifies
  # for `--workspace --release`, not by how the code is optimised: the release profile's
  # codegen is made cheap here (a real one costs CI minutes it does not have on two cores).
  CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=64 CARGO_PROFILE_RELEASE_INCREMENTAL=false \
    cargo build --workspace --release --quiet
else
  cargo build --workspace --quiet
fi
dir=target/$profile

# <binary> <extended regex of libraries it must not link>
check() {
  local bin=$dir/$1 libs bad
  [ -x "$bin" ] || fail "$bin was not built"
  libs=$(ldd "$bin") || fail "ldd $bin"
  bad=$(grep -Eo "$2" <<<"$libs" | sort -u | tr '\n' ' ' || true)
  [ -z "$bad" ] || fail "$1 links $bad(it must not; see ARCHITECTURE.md, \"Binaries stay light\")"
  echo "  $1: $(grep -c '=>' <<<"$libs") shared libraries, none of: $2"
}
check handoff-block 'libvirt[^ ]*|libgtk[^ ]*'
check handoff 'libvirt[^ ]*|libgtk[^ ]*'
check handoff-tray 'libvirt[^ ]*|libgtk[^ ]*'
check handoff-kernelsim 'libvirt[^ ]*|libgtk[^ ]*|libfuse[^ ]*'
# The other side of the split: handoff-vm is where libvirt went.
ldd "$dir/handoff-vm" | grep -q 'libvirt\.so' || fail "handoff-vm does not link libvirt: the split is not where it should be"
echo "test-light-binaries: ok ($profile workspace build)"
