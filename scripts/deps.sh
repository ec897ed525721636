#!/usr/bin/env bash
# Installs what handoff needs to build, run its demo and run its tests on Debian 12 /
# Ubuntu 24.04, as root. Idempotent: packages already present are not reinstalled, and
# apt is not touched at all when nothing is missing.
set -euo pipefail

packages=(
  # building: libvirt and GTK bindings, FUSE for the kernel simulator
  build-essential pkg-config libvirt-dev libgtk-4-dev fuse3 libfuse3-dev
  # the real components the tests run against (ARCHITECTURE.md, "Testing against real things")
  libvirt-daemon-system libvirt-clients qemu-system-x86 dbus dbus-x11 dunst xvfb
  xfce4-panel i3-wm i3blocks x11-utils xterm imagemagick
  # tests/real_kernel.rs: scripts/guest-image.sh unpacks Debian's kernel and busybox-static
  # (fetched with apt-get download), finds the module closure with depmod/modprobe and
  # packs the guest's initramfs; QEMU (above) boots it
  kmod cpio xz-utils zstd
  # the details window's tests read it and press its buttons over the accessibility bus
  at-spi2-core
  # the bar block's notifications (notify-send -A needs libnotify >= 0.7.9)
  libnotify-bin
  # the other real bars the block is tested under (i3blocks and i3bar above): waybar on a
  # headless sway (grim takes its screenshots; foot stands in for Looking Glass as a
  # Wayland client; wayvnc gives the headless seat the virtual pointer that clicks waybar:
  # wlrctl is not in Debian 12), polybar on Xvfb (xdotool clicks it); fonts they all draw with
  sway waybar grim foot wayvnc polybar xdotool fonts-dejavu-core
  # building i3status-rust (not packaged in Debian 12; see below): D-Bus, lm-sensors,
  # OpenSSL, and clang for the bindings bindgen makes
  libdbus-1-dev libsensors-dev libssl-dev clang libclang-dev
  # the benchmarks compare against these
  psmisc lsof hyperfine time
  # the tray benchmark counts syscalls of an idle handoff-tray
  strace
  # checking the polkit policy in desktop-files/ (xmllint, polkit's DTD); the tray's
  # "Return GPU to Linux" runs pkexec against polkitd in the tests
  libxml2-utils polkitd pkexec
  # reading PCI names
  pci.ids
  # validating what install-services writes (systemd-analyze, desktop-file-validate)
  systemd desktop-file-utils
  # tests/setup.rs: script(1) gives setup a terminal; unshare, mount and runuser run it as
  # under sudo (essential on Debian: listed for slimmed images)
  bsdutils util-linux mount
  # the Proxmox backend's tests run fakepve (PyPI, below) with Python's pip
  python3 python3-pip
  # packaging: make install, rendering the generated man pages, the .deb ($auto depends
  # through dpkg-shlibdeps) and its test in a debootstrapped root (scripts/test-deb.sh)
  make groff-base man-db dpkg-dev debootstrap
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "handoff: these Debian packages are missing: ${missing[*]}" >&2
    echo "handoff: run this script as root (sudo) to install them" >&2
    exit 1
  fi
  echo "handoff: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# fakepve (PyPI): the Proxmox VE API the proxmox crate's tests talk to on loopback
# (test-support/src/fakepve.rs pins this version). [crypto] brings what makes its certificate.
fakepve_version=0.5.0
if ! python3 -c "import fakepve, cryptography, sys; sys.exit(fakepve.__version__ != '$fakepve_version')" 2>/dev/null; then
  echo "handoff: installing fakepve $fakepve_version from PyPI"
  # Debian 12's pip refuses system-wide installs (PEP 668) unless told.
  python3 -m pip install --quiet "fakepve[crypto]==$fakepve_version" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "fakepve[crypto]==$fakepve_version"
fi

# Rust 1.85+ (edition 2024). Debian 12 and Ubuntu 24.04 ship older compilers, so use
# rustup's stable toolchain when cargo is missing or too old.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "handoff: no cargo found; installing the stable Rust toolchain with rustup"
  command -v curl >/dev/null || apt-get install -y -qq curl >/dev/null
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# i3status-rust, one of the bars the block is tested under (i3blocks/tests/real_bars.rs).
# Debian 12 has no package, so it is built from crates.io, `--locked`, once: the binary and
# its theme and icon files (without them every block draws uncoloured) are kept under
# /var/cache/handoff-test/i3status-rs, so a second run finds it and returns at once. The
# tests look there (or on PATH). Default features off: its PulseAudio block is not needed.
# 0.35.0, not 0.36: 0.36's speed-test block brings BoringSSL and WebRTC (478 crates against
# 381, and a cmake build of BoringSSL), and the bar protocol the tests drive is the same.
# A debug build: the tests need it to run, not to be fast. Measured on this project's 2-vCPU
# machine: 0.35.0 debug 125 s and 0.36.2 release 513 s with both CPUs free; 0.36.2 debug
# 441 s while tests ran.
# On a fresh CI machine this build is the largest part of installing.
I3RS_VERSION=0.35.0
i3rs_root=/var/cache/handoff-test/i3status-rs
if [ ! -x "$i3rs_root/bin/i3status-rs" ] || [ ! -f "$i3rs_root/share/i3status-rust/themes/plain.toml" ] \
  || [ "$(cat "$i3rs_root/version" 2>/dev/null)" != "$I3RS_VERSION" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "handoff: i3status-rust $I3RS_VERSION is not built; run this script as root to build it" >&2
    exit 1
  fi
  echo "handoff: building i3status-rust $I3RS_VERSION with cargo (once; kept in $i3rs_root)"
  i3rs_t0=$(date +%s)
  mkdir -p "$i3rs_root"
  cargo install --quiet --debug --locked i3status-rs --version "$I3RS_VERSION" --no-default-features \
    --root "$i3rs_root"
  # The theme and icon files ship in the crate, not in the binary.
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/i3status-rs-"$I3RS_VERSION".crate | head -1)
  rm -rf "$i3rs_root/share/i3status-rust"
  mkdir -p "$i3rs_root/share/i3status-rust"
  tar -xzf "$crate" -C "$i3rs_root/share/i3status-rust" --strip-components=2 \
    "i3status-rs-$I3RS_VERSION/files/themes" "i3status-rs-$I3RS_VERSION/files/icons"
  echo "$I3RS_VERSION" >"$i3rs_root/version"
  echo "handoff: built i3status-rust in $(($(date +%s) - i3rs_t0)) s"
fi
