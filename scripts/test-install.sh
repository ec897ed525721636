#!/usr/bin/env bash
# `make install` and `make uninstall` into temp DESTDIRs, with the debug binaries the test
# suite already built (PROFILE=debug): every expected file is there, the seed's names are
# links that run as their subcommand, the polkit policy names this prefix's handoff, the
# launchers and the tray's autostart entry are where desktops look and valid,
# uninstall leaves nothing of ours (and everything that was there before), and installing
# again gives the same tree. .ci/run runs it after `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test-install: FAIL: $*" >&2; exit 1; }
mk() { make --no-print-directory PROFILE=debug "$@" >"$tmp/make.log" 2>&1 || { cat "$tmp/make.log" >&2; fail "make $*"; }; }
# Type, mode, path and link target of everything under a root, plus file checksums.
tree() { (cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | sort && find . -type f -exec sha256sum {} + | sort -k2); }

root="$tmp/root"
mkdir "$root"
mk install DESTDIR="$root" prefix=/usr
first=$(tree "$root")

# The binaries, and a link per seed name that resolves to handoff.
for b in handoff handoff-vm handoff-tray handoff-block; do
  [ -x "$root/usr/bin/$b" ] || fail "usr/bin/$b missing"
done
[ -d details ] && { [ -x "$root/usr/bin/handoff-details" ] || fail "usr/bin/handoff-details missing"; }
[ -d proxmox ] && { [ -x "$root/usr/bin/handoff-pve" ] || fail "usr/bin/handoff-pve missing"; }
links=(windows-start windows-stop vfio-status gpu-rebind-nvidia install-hooks install-services lg-test vm-health)
for l in "${links[@]}"; do
  [ "$(readlink "$root/usr/bin/$l")" = handoff ] || fail "usr/bin/$l is not a link to handoff"
  [ -f "$root/usr/share/man/man1/$l.1" ] || fail "no man page for $l"
done
"$root/usr/bin/handoff" --version | grep -q '^handoff ' || fail "handoff --version"
# handoff runs the installed handoff-vm for its libvirt commands: vm-health of a VM that
# libvirt's test driver does not have is handoff-vm's answer from libvirt.
printf '[[vm]]\nname = "nosuch"\nuri = "test:///default"\n' >"$tmp/vm.toml"
out=$(HANDOFF_CONFIG="$tmp/vm.toml" "$root/usr/bin/handoff" vm-health 2>&1) && fail "vm-health of no VM succeeded: $out"
grep -q 'no domain "nosuch" at test:///default' <<<"$out" || fail "handoff vm-health did not reach libvirt through the installed handoff-vm: $out"
"$root/usr/bin/vfio-status" --help | grep -q '^Usage: vfio-status' || fail "vfio-status --help"
"$root/usr/bin/gpu-rebind-nvidia" --help | grep -q 'handoff rebind --force' || fail "gpu-rebind-nvidia --help"

# Man pages: one per subcommand, and the seed names lead to their subcommand's page.
for s in status start stop rebind install-hooks install-services lg-test vm-health; do
  [ -f "$root/usr/share/man/man1/handoff-$s.1" ] || fail "no handoff-$s.1"
done
if command -v man >/dev/null; then
  MANWIDTH=100 man -M "$root/usr/share/man" -P cat vfio-status 2>"$tmp/man.err" | grep -q 'handoff-status' \
    || fail "man vfio-status: $(cat "$tmp/man.err")"
fi

# Completions where each shell looks for them.
for c in bash-completion/completions/handoff zsh/vendor-completions/_handoff fish/vendor_completions.d/handoff.fish; do
  [ -s "$root/usr/share/$c" ] || fail "usr/share/$c missing"
done
bash -c "source '$root/usr/share/bash-completion/completions/handoff' && complete -p handoff" >/dev/null \
  || fail "bash completion does not load"

# The polkit policy names the installed binary.
policy="$root/usr/share/polkit-1/actions/org.handoff.rebind.policy"
grep -q '<annotate key="org.freedesktop.policykit.exec.path">/usr/bin/handoff<' "$policy" \
  || fail "polkit exec.path is not /usr/bin/handoff"

# Icons and .desktop files: whatever the tree holds now.
if [ -d icons ]; then
  while read -r i; do
    case "$i" in
      icons/hicolor/*) want="$root/usr/share/$i" ;;
      *) want="$root/usr/share/icons/hicolor/scalable/apps/${i##*/}" ;;
    esac
    cmp -s "$i" "$want" || fail "$i not installed at ${want#"$root"}"
  done < <(find icons -type f \( -name '*.svg' -o -name '*.png' \))
fi
# The launchers (tray, details window) and the tray's XDG autostart entry, each valid by
# desktop-file-validate [desktop-file-utils] where it is installed, and naming a binary
# and an icon that the install put down.
[ -f desktop-files/handoff-tray.desktop ] && [ -f desktop-files/handoff-details.desktop ] \
  && [ -f desktop-files/autostart/handoff-tray.desktop ] || fail "desktop-files/ lacks the launchers or the autostart entry"
installed_entries=()
for d in desktop-files/*.desktop desktop-files/autostart/*.desktop; do
  case "$d" in
    desktop-files/autostart/*) at="$root/etc/xdg/autostart/${d##*/}" ;;
    *) at="$root/usr/share/applications/${d##*/}" ;;
  esac
  cmp -s "$d" "$at" || fail "$d not installed at ${at#"$root"}"
  installed_entries+=("$at")
  exe=$(sed -n 's/^Exec=\([^ ]*\).*/\1/p' "$at")
  [ -x "$root/usr/bin/$exe" ] || fail "${at#"$root"} runs $exe, which the install did not put in /usr/bin"
  icon=$(sed -n 's/^Icon=//p' "$at")
  [ -f "$root/usr/share/icons/hicolor/scalable/apps/$icon.svg" ] || fail "${at#"$root"} names icon $icon, which is not installed"
done
if command -v desktop-file-validate >/dev/null; then
  desktop-file-validate "${installed_entries[@]}" || fail "desktop-file-validate (above)"
elif [ "${CI:-}" = true ]; then
  fail "desktop-file-validate is missing (Debian desktop-file-utils; scripts/deps.sh installs it)"
fi

# Uninstall leaves the root as it found it: empty.
mk uninstall DESTDIR="$root" prefix=/usr
left=$(cd "$root" && find . -mindepth 1)
[ -z "$left" ] || fail "left behind after uninstall: $left"

# Installing again gives the same tree; installing over an install changes nothing.
mk install DESTDIR="$root" prefix=/usr
[ "$(tree "$root")" = "$first" ] || fail "second install differs: $(diff <(echo "$first") <(tree "$root"))"
mk install DESTDIR="$root" prefix=/usr
[ "$(tree "$root")" = "$first" ] || fail "install over install differs: $(diff <(echo "$first") <(tree "$root"))"
mk uninstall DESTDIR="$root" prefix=/usr
[ -z "$(cd "$root" && find . -mindepth 1)" ] || fail "left behind after the second uninstall"

# prefix=/usr/local into a root that already has things of others: the policy names
# /usr/local/bin/handoff, and uninstall keeps what was there before.
other="$tmp/other"
mkdir -p "$other/usr/local/share/applications" "$other/usr/local/bin"
echo '[Desktop Entry]' >"$other/usr/local/share/applications/someone-else.desktop"
before=$(tree "$other")
mk install DESTDIR="$other" prefix=/usr/local
grep -q '<annotate key="org.freedesktop.policykit.exec.path">/usr/local/bin/handoff<' \
  "$other/usr/local/share/polkit-1/actions/org.handoff.rebind.policy" || fail "polkit exec.path not rewritten for /usr/local"
[ "$(readlink "$other/usr/local/bin/vfio-status")" = handoff ] || fail "/usr/local/bin/vfio-status"
[ -f "$other/etc/xdg/autostart/handoff-tray.desktop" ] || fail "prefix=/usr/local: no /etc/xdg/autostart/handoff-tray.desktop (sessions look only there)"
mk uninstall DESTDIR="$other" prefix=/usr/local
[ "$(tree "$other")" = "$before" ] || fail "uninstall under /usr/local changed others' files: $(diff <(echo "$before") <(tree "$other"))"

# Uninstall with nothing installed says so and fails.
if make --no-print-directory PROFILE=debug uninstall DESTDIR="$tmp/none" prefix=/usr >"$tmp/make.log" 2>&1; then
  fail "uninstall with nothing installed succeeded"
fi
grep -q 'no install record' "$tmp/make.log" || fail "uninstall with nothing installed: $(cat "$tmp/make.log")"

echo "test-install: ok ($(echo "$first" | grep -c '^[fl] ') files and links installed, removed, reinstalled identically)"
