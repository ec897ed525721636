#!/usr/bin/env bash
# Installs handoff's .deb into a clean Debian 12 (bookworm, minbase) root with apt, which
# resolves its dependencies from the Debian mirror this machine's apt uses, then checks what a person would: every
# binary finds its shared libraries, the bar block links neither libvirt nor GTK, `handoff
# --version` and the seed's command names run, the polkit policy and man pages are there;
# then removes the package and checks that none of its files are left.
#
#   bash scripts/test-deb.sh --debug       package the debug binaries already built
#                                          (`make deb PROFILE=debug`: ~15 s); what .ci/run does
#   bash scripts/test-deb.sh [--release]   build the release package first (`make deb`: a
#                                          release build, ~10 min on two cores)
#   bash scripts/test-deb.sh FILE.deb      test that package
#
# Root only (debootstrap, chroot); needs Debian's mirror. Cached under
# /var/cache/handoff-test/, so that a warm run asks the mirror nothing but fresh package
# lists once a day: the debootstrapped root as a tarball (made again after 7 days, ~1 min),
# apt's package lists (refreshed after a day) and the .debs apt downloaded (kept until the
# root is made again). Each run unpacks a fresh copy of the root into a temp dir, so nothing
# installed by a previous run leaks in.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "test-deb: run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap chroot dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "test-deb: $tool missing (scripts/deps.sh installs it)" >&2; exit 1; }
done

t0=$(date +%s)
phase() { echo "test-deb: $1 ($(($(date +%s) - t0)) s)"; }
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

# The cargo-deb the packaging was checked with; `make deb` needs it.
CARGO_DEB_VERSION=3.8.0

build_deb() { # PROFILE
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "test-deb: installing cargo-deb $CARGO_DEB_VERSION from crates.io (a few minutes)"
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION" >/dev/null
  fi
  local log=/tmp/handoff-make-deb.$$.log
  make --no-print-directory deb PROFILE="$1" >"$log" 2>&1 || { tail -50 "$log" >&2; rm -f "$log"; fail "make deb PROFILE=$1"; }
  rm -f "$log"
}

case "${1:---release}" in
  --debug)
    build_deb debug
    deb=$(ls -t target/debian-debug/handoff_*.deb | head -1)
    phase "packaged the debug binaries: $deb ($(du -h "$deb" | cut -f1))"
    ;;
  --release)
    build_deb release
    deb=$(ls -t target/debian/handoff_*.deb | head -1)
    phase "built $deb"
    ;;
  -*) fail "unknown option $1 (--debug, --release or a .deb file)" ;;
  *) deb=$1 ;;
esac
[ -f "$deb" ] || fail "no .deb at $deb"

# The mirror this machine's apt is configured with for bookworm main (sources.list or
# deb822 .sources, whichever it uses; no package lists needed), so that a machine behind
# its own mirror or proxy tests against the same one. No name of our own to fall back on.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null \
  | awk '$2 == "bookworm" && $3 == "main" { sub("/$", "", $1); print $1; exit }' || true)
[ -n "$mirror" ] || fail "apt has no source for bookworm main (see /etc/apt/sources.list{,.d}); add one, e.g. Types: deb / URIs: <your Debian mirror> / Suites: bookworm / Components: main"

cache_dir=/var/cache/handoff-test
cache="$cache_dir/bookworm-minbase.tar"
lists_cache="$cache_dir/apt-lists"
debs_cache="$cache_dir/apt-archives"
mkdir -p "$cache_dir"
# One run at a time writes the caches (other checkouts on this machine run it too).
exec 9>"$cache_dir/.lock"
flock 9
# Tarballs of the earlier layout (one per day).
find "$cache_dir" -maxdepth 1 -name 'bookworm-minbase-*.tar' -delete
if [ -z "$(find "$cache" -mtime -7 2>/dev/null)" ]; then
  build=$(mktemp -d "$cache_dir/build.XXXXXX")
  debootstrap --variant=minbase bookworm "$build" "$mirror" >"$cache_dir/debootstrap.log" 2>&1 \
    || { rm -rf "$build"; tail -20 "$cache_dir/debootstrap.log" >&2; fail "debootstrap from $mirror"; }
  tar -C "$build" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
  rm -rf "$build" "$lists_cache" "$lists_cache.stamp" "$debs_cache"
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
# The lists and .debs of earlier runs: apt takes a cached .deb whose checksum the lists name.
[ -d "$lists_cache" ] && cp -a "$lists_cache/." "$root/var/lib/apt/lists/"
[ -d "$debs_cache" ] && cp -a "$debs_cache/." "$root/var/cache/apt/archives/"
phase "unpacked a clean bookworm root"

in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }
apt_update() {
  in_root apt-get update -qq >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get update in the root"; }
  rm -rf "$lists_cache" && mkdir -p "$lists_cache" && cp -a "$root/var/lib/apt/lists/." "$lists_cache/"
  touch "$lists_cache.stamp"
  updated="updated from $mirror"
}
# Depends only: what a person gets with --no-install-recommends.
apt_install() { in_root apt-get install -y -q --no-install-recommends /tmp/handoff.deb >"$tmp/apt.log" 2>&1; }
install_failed() { tail -40 "$tmp/apt.log" >&2; fail "apt-get install handoff.deb"; }
updated="from the cache"
if [ -z "$(find "$lists_cache.stamp" -mtime -1 2>/dev/null)" ]; then
  apt_update
fi
if ! apt_install; then
  # Lists from the cache may name versions the mirror has replaced since.
  [ "$updated" = "from the cache" ] || install_failed
  apt_update
  apt_install || install_failed
fi
pulled=$(grep -c '^Unpacking ' "$tmp/apt.log" || true)
fetched=$(grep '^Get:' "$tmp/apt.log" | grep -vc ' /tmp/handoff.deb ' || true)
mkdir -p "$debs_cache"
cp -an "$root/var/cache/apt/archives/." "$debs_cache/"
rm -rf "$debs_cache/partial" "$debs_cache/lock"
phase "installed the .deb with apt ($pulled packages unpacked, $fetched downloaded; package lists $updated)"

# Every binary finds all its libraries through the package's Depends, and links what it
# should: the CLI, the block and the tray neither libvirt nor GTK (the tray's libvirt side is
# `handoff __agent`, the CLI's is handoff-vm), handoff-vm libvirt and no GTK (ARCHITECTURE.md,
# "Binaries stay light").
links() { in_root ldd "/usr/bin/$1" || fail "ldd /usr/bin/$1"; }
for b in handoff handoff-vm handoff-tray handoff-block handoff-details handoff-pve; do
  [ -f "$root/usr/bin/$b" ] || continue
  libs=$(links "$b")
  if grep -q 'not found' <<<"$libs"; then
    fail "/usr/bin/$b misses libraries the package does not depend on: $(grep 'not found' <<<"$libs" | tr -s ' \t' ' ')"
  fi
  case "$b" in
    handoff | handoff-block | handoff-tray | handoff-pve) ! grep -Eq 'libvirt|libgtk' <<<"$libs" \
      || fail "$b links $(grep -Eo 'lib(virt|gtk)[^ ]*' <<<"$libs" | sort -u | tr '\n' ' ')" ;;
    handoff-vm) ! grep -q 'libgtk' <<<"$libs" || fail "$b links GTK" ;;
  esac
  case "$b" in
    handoff-vm) grep -q 'libvirt\.so' <<<"$libs" || fail "$b does not link libvirt" ;;
    handoff-details) grep -q 'libgtk-4' <<<"$libs" || fail "handoff-details does not link GTK 4" ;;
  esac
done
phase "every binary finds its libraries; handoff links $(links handoff | grep -c '=>') of them, handoff-block $(links handoff-block | grep -c '=>'), handoff-tray $(links handoff-tray | grep -c '=>'), none libvirt"

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
for e in usr/share/applications/handoff-tray.desktop usr/share/applications/handoff-details.desktop \
  etc/xdg/autostart/handoff-tray.desktop; do
  [ -f "$root/$e" ] || fail "/$e is not in the package"
done
if command -v desktop-file-validate >/dev/null; then
  desktop-file-validate "$root"/usr/share/applications/handoff-*.desktop "$root"/etc/xdg/autostart/handoff-tray.desktop \
    || fail "desktop-file-validate (above)"
fi
phase "ran in the root: $version; vfio-status --help shows its own usage"

files=$(in_root dpkg -L handoff | while read -r f; do [ -d "$root$f" ] || echo "$f"; done)
conffiles=$(in_root dpkg-query -W -f='${Conffiles}' handoff | awk '{ print $1 }')
in_root apt-get remove -y -q handoff >"$tmp/apt.log" 2>&1 || { tail -20 "$tmp/apt.log" >&2; fail "apt-get remove"; }
for f in $files; do
  grep -qxF "$f" <<<"$conffiles" && continue
  [ ! -e "$root$f" ] && [ ! -L "$root$f" ] || fail "$f left after apt-get remove"
done
# Conffiles (the autostart entry under /etc) stay until a purge, as dpkg keeps a person's
# edits; the purge takes them too.
in_root apt-get purge -y -q handoff >"$tmp/apt.log" 2>&1 || { tail -20 "$tmp/apt.log" >&2; fail "apt-get purge"; }
for f in $conffiles; do
  [ ! -e "$root$f" ] || fail "$f left after apt-get purge"
done
phase "removed the package, then purged it; none of its $(wc -w <<<"$files") files left ($(wc -w <<<"$conffiles") conffiles until the purge)"
echo "test-deb: ok"
