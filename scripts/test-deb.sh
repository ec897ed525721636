#!/usr/bin/env bash
# Installs handoff's .deb into a clean Debian 12 (bookworm, minbase) root with apt, which
# resolves its dependencies from the Debian mirror, then runs `handoff --version` and
# `vfio-status --help` there, and removes the package again leaving none of its files.
#
#   bash scripts/test-deb.sh [path/to/handoff.deb]      (default: build it with `make deb`)
#
# Root only (debootstrap, chroot); needs the network. Slow (a release build and an apt
# install: several minutes), so .ci/run runs it only with HANDOFF_TEST_DEB=1. The
# debootstrapped root is cached as a tarball under /var/cache/handoff-test/, one per day;
# each run unpacks a fresh copy into a temp dir, so nothing from a previous run leaks in.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "test-deb: run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap chroot dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "test-deb: $tool missing (scripts/deps.sh installs it)" >&2; exit 1; }
done

t0=$(date +%s)
phase() { echo "test-deb: $1 ($(($(date +%s) - t0)) s)"; }
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

deb="${1:-}"
if [ -z "$deb" ]; then
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "test-deb: installing cargo-deb from crates.io (a few minutes)"
    cargo install --locked cargo-deb >/dev/null
  fi
  make --no-print-directory deb >/tmp/handoff-make-deb.log 2>&1 || { tail -50 /tmp/handoff-make-deb.log >&2; fail "make deb"; }
  deb=$(ls -t target/debian/handoff_*.deb | head -1)
  phase "built $deb"
fi
[ -f "$deb" ] || fail "no .deb at $deb"

# The mirror apt already uses here for bookworm main (Debian's by default).
mirror=$(apt-cache policy 2>/dev/null | awk '$3 == "bookworm/main" { print $2; exit }' || true)
mirror=${mirror:-http://deb.debian.org/debian}

cache_dir=/var/cache/handoff-test
cache="$cache_dir/bookworm-minbase-$(date +%Y%m%d).tar"
if [ ! -f "$cache" ]; then
  mkdir -p "$cache_dir"
  build=$(mktemp -d "$cache_dir/build.XXXXXX")
  debootstrap --variant=minbase bookworm "$build" "$mirror" >"$cache_dir/debootstrap.log" 2>&1 \
    || { rm -rf "$build"; tail -20 "$cache_dir/debootstrap.log" >&2; fail "debootstrap from $mirror"; }
  tar -C "$build" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
  rm -rf "$build"
  # Older days' roots are stale (security updates); keep only today's.
  find "$cache_dir" -maxdepth 1 -name 'bookworm-minbase-*.tar' ! -path "$cache" -delete
  phase "debootstrapped bookworm from $mirror into $cache"
fi

tmp=$(mktemp -d)
root="$tmp/root"
cleanup() {
  # Never delete through a mount that is still there.
  if findmnt -rno TARGET | grep -q "^$root"; then
    echo "test-deb: $root still has mounts; left in place" >&2
    return
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir "$root"
tar -C "$root" -xf "$cache"
cp /etc/resolv.conf "$root/etc/resolv.conf"
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
cp "$deb" "$root/tmp/handoff.deb"
phase "unpacked a clean bookworm root"

in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }
in_root apt-get update -qq >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get update in the root"; }
# Depends only: what a person gets with --no-install-recommends.
in_root apt-get install -y -q --no-install-recommends /tmp/handoff.deb >"$tmp/apt.log" 2>&1 \
  || { tail -40 "$tmp/apt.log" >&2; fail "apt-get install handoff.deb"; }
pulled=$(grep -c '^Unpacking ' "$tmp/apt.log" || true)
phase "installed the .deb with apt ($pulled packages unpacked)"

version=$(in_root handoff --version) || fail "handoff --version"
[[ "$version" == "handoff "* ]] || fail "handoff --version printed: $version"
help=$(in_root vfio-status --help) || fail "vfio-status --help"
grep -q '^Usage: vfio-status' <<<"$help" || fail "vfio-status --help: $help"
for l in windows-start windows-stop vfio-status gpu-rebind-nvidia install-hooks install-services lg-test vm-health; do
  [ "$(readlink "$root/usr/bin/$l")" = handoff ] || fail "/usr/bin/$l is not a link to handoff"
  in_root "$l" --help >/dev/null || fail "$l --help"
done
in_root handoff-block --help >/dev/null 2>&1 || in_root handoff-block --version >/dev/null 2>&1 \
  || fail "handoff-block does not start in the root"
grep -q 'exec.path">/usr/bin/handoff<' "$root/usr/share/polkit-1/actions/org.handoff.rebind.policy" \
  || fail "polkit policy"
[ -f "$root/usr/share/man/man1/handoff-status.1.gz" ] || fail "man pages"
phase "ran in the root: $version; vfio-status --help shows its own usage"

files=$(in_root dpkg -L handoff | while read -r f; do [ -d "$root$f" ] || echo "$f"; done)
in_root apt-get remove -y -q handoff >"$tmp/apt.log" 2>&1 || { tail -20 "$tmp/apt.log" >&2; fail "apt-get remove"; }
for f in $files; do
  [ ! -e "$root$f" ] && [ ! -L "$root$f" ] || fail "$f left after apt-get remove"
done
phase "removed the package; none of its $(wc -w <<<"$files") files left"
echo "test-deb: ok"
