#!/usr/bin/env bash
# Builds the guest that tests/real_kernel.rs boots in QEMU: a stock Debian kernel and a base
# initramfs (busybox-static plus the module closure of the emulated GPU-shaped slot's
# drivers and vfio-pci), both from Debian's packages through this machine's apt sources.
# Prints the directory holding them on stdout (the last line); everything else on stderr.
#
#   bash scripts/guest-image.sh        build when missing, else print the cached one
#
# Cached under ${HANDOFF_GUEST_CACHE:-/var/cache/handoff-test/guest}/<key>/, never in the
# repo. The key is the kernel package and version apt would install now, busybox-static's
# version and this script's own hash: a newer kernel in the archive (after an apt-get
# update), or a change here, makes a new image. A warm run asks apt nothing while its lists
# are unchanged (~10 ms); a cold one takes ~30 s. Old images are removed.
#
# The directory holds:
#   vmlinuz          the kernel
#   base.cpio        /bin/busybox and its applet links, /lib/modules/<kver>/ with the
#                    closure (uncompressed .ko, modules.dep for busybox's modprobe), and
#                    /etc/guest-modules (the insmod order /init uses)
#   kernel-version   <kver>, e.g. 6.1.0-57-amd64
#
# Needs apt-get, dpkg-deb, depmod/modprobe (kmod), cpio, xz and zstd (scripts/deps.sh).
# Network: only apt's own download of the two packages. Root is not required to run it but
# the default cache dir is root's.
set -euo pipefail
self=$(readlink -f "$0")

cache=${HANDOFF_GUEST_CACHE:-/var/cache/handoff-test/guest}
say() { echo "guest-image: $*" >&2; }
fail() { echo "guest-image: FAIL: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb depmod modprobe cpio xz zstd flock; do
  command -v "$tool" >/dev/null || fail "$tool missing (run scripts/deps.sh as root)"
done

# The modules /init loads, in this order (their dependencies are added before each):
# the slot's two host drivers, and the pieces vfio-pci needs to make a group usable.
# snd_hda_codec_generic before snd_hda_intel: otherwise the codec probe races the
# controller's and about one boot in five ends with no /dev/snd at all. vfio-pci itself is
# left to the hook, whose `modprobe vfio-pci` is part of what is tested.
modules=(bochs snd_hda_codec_generic snd_hda_intel vfio vfio_iommu_type1)
# Loaded on demand by `modprobe vfio-pci`; must be in the image with its dependencies.
extra=(vfio-pci)

script_hash=$(sha256sum "$self" | cut -c1-12)
# Asking apt costs seconds here (no pkgcache.bin: every apt-cache call parses the lists), so
# the last answer is reused while apt's package lists are unchanged since it was given.
lists_stamp=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0)
if [ -f "$cache/current" ]; then
  read -r c_hash c_stamp c_out <"$cache/current" || true
  if [ "${c_hash:-}" = "$script_hash" ] && [ "${c_stamp:-}" = "$lists_stamp" ] && [ -f "${c_out:-/nonexistent}/ready" ]; then
    echo "$c_out"
    exit 0
  fi
fi

# One build at a time (test runs in several worktrees share the cache); a waiter finds
# the image the other one built.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

meta=linux-image-amd64
kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || fail "apt knows no $meta (is a Debian amd64 archive in the apt sources? apt-get update)"
kver_pkg=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
bb_ver=$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')
[ -n "$kver_pkg" ] && [ "$kver_pkg" != "(none)" ] || fail "apt has no candidate for $kpkg"
[ -n "$bb_ver" ] && [ "$bb_ver" != "(none)" ] || fail "apt has no candidate for busybox-static"
key="${kpkg}_${kver_pkg}_busybox_${bb_ver//:/_}_${script_hash}"
out="$cache/$key"

if [ -f "$out/ready" ]; then
  echo "$script_hash $lists_stamp $out" >"$cache/current"
  echo "$out"
  exit 0
fi

t0=$(date +%s)
work=$(mktemp -d "$cache/.build.XXXXXX")
chmod 755 "$work" # apt downloads as _apt when it can write there
trap 'rm -rf "$work"' EXIT

say "building $key"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver_pkg" "busybox-static=$bb_ver" >/dev/null) \
  || fail "apt-get download $kpkg busybox-static (does apt reach its archive?)"
say "downloaded $(du -sh "$work" | cut -f1) ($(($(date +%s) - t0)) s)"

root="$work/root"
mkdir -p "$root"
dpkg-deb -x "$work"/linux-image-*.deb "$root"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
kver=$(ls "$root/lib/modules")
[ "$(echo "$kver" | wc -w)" -eq 1 ] || fail "expected one kernel in $kpkg, found: $kver"

# The package ships no modules.dep (the postinst makes it); modprobe needs it.
depmod -b "$root" "$kver"
closure=$(for m in "${modules[@]}" "${extra[@]}"; do
  modprobe -d "$root" -S "$kver" --show-depends "$m" || fail "modprobe --show-depends $m"
done | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++')

img="$work/img"
mkdir -p "$img"/{bin,dev,proc,sys,tmp,run,etc,lib/modules/"$kver"}
cp "$work/bb/bin/busybox" "$img/bin/busybox"
for a in $("$img/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$img/bin/$a"
done
# Uncompressed in the image: busybox's insmod/modprobe may not read .ko.xz/.ko.zst, and
# the kernel decompresses the initramfs anyway.
for path in $closure; do
  rel=${path#"$root"/}
  dest="$img/${rel%.xz}"
  dest="${dest%.zst}"
  mkdir -p "$(dirname "$dest")"
  case "$path" in
    *.xz) xz -dc "$path" >"$dest" ;;
    *.zst) zstd -qdc "$path" >"$dest" ;;
    *) cp "$path" "$dest" ;;
  esac
done
cp "$root/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$img/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$img" "$kver"
# /init's insmod order: the closure of the modules it loads, dependencies first.
for m in "${modules[@]}"; do
  modprobe -d "$img" -S "$kver" --show-depends "$m"
done | awk '$1 == "insmod" {print $2}' | sed "s|^$img||" | awk '!seen[$0]++' >"$img/etc/guest-modules"

mkdir -p "$work/out"
(cd "$img" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$work/out/base.cpio"
cp "$root/boot/vmlinuz-$kver" "$work/out/vmlinuz"
echo "$kver" >"$work/out/kernel-version"
touch "$work/out/ready"

# Replace any earlier image (another kernel version, an older script).
for old in "$cache"/*/; do
  [ -f "$old/ready" ] && rm -rf "$old"
done
mv "$work/out" "$out"
echo "$script_hash $lists_stamp $out" >"$cache/current"
say "built $out: kernel $kver, $(wc -l <"$img/etc/guest-modules") modules, base.cpio $(du -h "$out/base.cpio" | cut -f1) ($(($(date +%s) - t0)) s)"
echo "$out"
