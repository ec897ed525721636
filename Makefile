# Build, install and uninstall handoff.
#
#   make                                  release builds, then man pages, completions, links
#   make install [prefix=/usr] [DESTDIR=/tmp/root]
#   make uninstall [prefix=/usr] [DESTDIR=/tmp/root]   removes exactly what install recorded
#   make deb                              target/debian/handoff_*.deb (cargo-deb) of the same files
#   make deb PROFILE=debug                target/debian-debug/handoff_*.deb from the debug binaries
#   make check                            the whole test suite (.ci/run)
#
# PROFILE=debug installs target/debug's binaries (the install tests use it; a release build
# of everything takes minutes on two cores).

prefix ?= /usr/local
exec_prefix ?= $(prefix)
bindir ?= $(exec_prefix)/bin
datadir ?= $(prefix)/share
mandir ?= $(datadir)/man
# Nothing is installed here: the hook reads /etc/handoff/config.toml whatever the prefix, and
# that file is the machine owner's, not the package's.
sysconfdir ?= $(prefix)/etc
# The tray's XDG autostart entry goes where sessions look for system-wide ones
# ($XDG_CONFIG_DIRS, /etc/xdg by default) whatever the prefix: under /usr/local/etc no
# session would find it. A user's ~/.config/autostart/handoff-tray.desktop (what
# `handoff install-services` writes) has the same name and so overrides it.
autostartdir ?= /etc/xdg/autostart

# Where install records what it put down (paths without DESTDIR); uninstall reads it back.
# Empty: record nothing (the .deb, where dpkg keeps the list).
INSTALL_RECORD ?= $(datadir)/handoff/installed-files

CARGO ?= cargo
PROFILE ?= release
TARGET_DIR ?= target
ifeq ($(PROFILE),debug)
CARGO_PROFILE := --profile dev
else
CARGO_PROFILE := --profile $(PROFILE)
endif
OUT := $(TARGET_DIR)/$(PROFILE)
GEN := $(OUT)/gen

# The installed binaries, one cargo build each. handoff-vm (package handoff-libvirt) runs the
# CLI's libvirt commands for handoff, which links no libvirt (ARCHITECTURE.md, "Binaries
# stay light"). Crates that do not exist yet in this tree are left out.
CRATES := handoff handoff-vm $(if $(wildcard applet/Cargo.toml),handoff-tray) \
	$(if $(wildcard i3blocks/Cargo.toml),handoff-block) \
	$(if $(wildcard details/Cargo.toml),handoff-details) \
	$(if $(wildcard proxmox/Cargo.toml),handoff-pve)
BINS := $(addprefix $(OUT)/,$(CRATES))
SOURCES := Cargo.toml Cargo.lock $(shell find src libvirt kernelsim inhibit proxmox applet i3blocks details icons \
	-type f 2>/dev/null)
# The package a binary is built from: its own name, except handoff-vm (handoff-libvirt) and
# handoff-pve (handoff-proxmox: the Proxmox VE API, so that handoff itself links no TLS).
package = $(if $(filter handoff-pve,$1),handoff-proxmox,$(if $(filter handoff-vm,$1),handoff-libvirt,$1))

.PHONY: all install uninstall check deb clean-gen FORCE

all: $(BINS) $(GEN)/stamp

$(BINS): $(OUT)/%: $(SOURCES)
	$(CARGO) build $(CARGO_PROFILE) -p $(call package,$*) --bin $*
	@touch $@

# Man pages, completions and the seed's command links, from the CLI definition itself.
$(GEN)/stamp: $(OUT)/handoff
	rm -rf $(GEN)
	$(OUT)/handoff __generate man $(GEN)/man
	$(OUT)/handoff __generate completions $(GEN)/completions
	$(OUT)/handoff __generate links $(GEN)/links
	@touch $@

# The install list: one line per path, "<kind> <mode> <source> <destination>"; kind f copies
# a file, l makes a symlink (source is its target), p copies the polkit policy with its
# program path set to this bindir. Built afresh at each install from what exists now, so a
# new icon or .desktop file needs no edit here.
$(OUT)/install.list: $(BINS) $(GEN)/stamp FORCE
	@{ \
	for b in $(CRATES); do echo "f 0755 $(OUT)/$$b $(bindir)/$$b"; done; \
	for l in $$(ls $(GEN)/links); do echo "l 0777 handoff $(bindir)/$$l"; done; \
	for m in $$(ls $(GEN)/man); do echo "f 0644 $(GEN)/man/$$m $(mandir)/man1/$$m"; done; \
	echo "f 0644 $(GEN)/completions/bash/handoff $(datadir)/bash-completion/completions/handoff"; \
	echo "f 0644 $(GEN)/completions/zsh/_handoff $(datadir)/zsh/vendor-completions/_handoff"; \
	echo "f 0644 $(GEN)/completions/fish/handoff.fish $(datadir)/fish/vendor_completions.d/handoff.fish"; \
	if [ -d icons ]; then find icons -type f \( -name '*.svg' -o -name '*.png' \) | sort | \
	  while read -r i; do \
	    case "$$i" in \
	      icons/hicolor/*) echo "f 0644 $$i $(datadir)/$$i";; \
	      *) echo "f 0644 $$i $(datadir)/icons/hicolor/scalable/apps/$${i##*/}";; \
	    esac; \
	  done; fi; \
	for d in $$(ls desktop-files/*.desktop 2>/dev/null); do \
	  echo "f 0644 $$d $(datadir)/applications/$${d##*/}"; done; \
	for d in $$(ls desktop-files/autostart/*.desktop 2>/dev/null); do \
	  echo "f 0644 $$d $(autostartdir)/$${d##*/}"; done; \
	echo "p 0644 desktop-files/org.handoff.rebind.policy $(datadir)/polkit-1/actions/org.handoff.rebind.policy"; \
	} > $@.tmp
	@if grep -q ' .* .* .* ' $@.tmp; then echo "make: a path with a space in $@" >&2; exit 1; fi
	@mv $@.tmp $@

install: $(OUT)/install.list
	@set -e; dest="$(DESTDIR)"; record="$(INSTALL_RECORD)"; \
	created=""; \
	if [ -n "$$record" ] && [ -f "$$dest$$record" ]; then \
	  created=$$(sed -n 's/^d //p' "$$dest$$record"); fi; \
	mkparent() { \
	  p=$$(dirname "$$1"); missing=""; \
	  while [ "$$p" != "/" ] && [ ! -d "$$dest$$p" ]; do missing="$$p $$missing"; p=$$(dirname "$$p"); done; \
	  for m in $$missing; do install -d -m 0755 "$$dest$$m"; created="$$created $$m"; done; \
	}; \
	files=""; \
	while read -r kind mode src dst; do \
	  mkparent "$$dst"; \
	  case "$$kind" in \
	    f) install -m "$$mode" "$$src" "$$dest$$dst";; \
	    l) ln -sfn "$$src" "$$dest$$dst";; \
	    p) sed 's|<annotate key="org.freedesktop.policykit.exec.path">[^<]*<|<annotate key="org.freedesktop.policykit.exec.path">$(bindir)/handoff<|' \
	         "$$src" > "$$dest$$dst.tmp"; chmod "$$mode" "$$dest$$dst.tmp"; mv "$$dest$$dst.tmp" "$$dest$$dst";; \
	  esac; \
	  echo "  $$dst"; files="$$files $$dst"; \
	done < $(OUT)/install.list; \
	if [ -n "$$record" ]; then \
	  mkparent "$$record"; \
	  { for f in $$files; do echo "f $$f"; done; \
	    for d in $$created; do echo "d $$d"; done | sort -u; } > "$$dest$$record"; \
	  echo "  $$record (what make uninstall removes)"; fi

# Removes the files the last install recorded, then the directories that install created,
# deepest first, when they are empty; never a directory that was there before.
uninstall:
	@set -e; dest="$(DESTDIR)"; record="$(INSTALL_RECORD)"; \
	if [ -z "$$record" ] || [ ! -f "$$dest$$record" ]; then \
	  echo "make: no install record at $$dest$$record: nothing installed with prefix=$(prefix) DESTDIR=$(DESTDIR)?" >&2; \
	  exit 1; fi; \
	sed -n 's/^f //p' "$$dest$$record" | while read -r f; do rm -f "$$dest$$f"; echo "  removed $$f"; done; \
	dirs=$$(sed -n 's/^d //p' "$$dest$$record" | sort -r); \
	rm -f "$$dest$$record"; \
	for d in $$dirs; do rmdir "$$dest$$d" 2>/dev/null || true; done

check:
	bash .ci/run

# The .deb holds exactly what `make install prefix=/usr` puts down, staged under the target
# dir (Cargo.toml [package.metadata.deb] takes it from there); man pages gzipped as Debian
# wants them (cargo-deb leaves files under target/ alone).
#
# PROFILE=debug packages the debug binaries instead (the package test in .ci/run: a release
# build takes ~10 minutes on two cores): staged under target/deb-root-debug for the `debug`
# variant of the metadata, debug info stripped from the staged copies (it would make a
# ~350 MB package), faster compression, written to target/debian-debug/ so that it is never
# mistaken for the release package.
ifeq ($(PROFILE),release)
DEB_ROOT := $(TARGET_DIR)/release/deb-root
DEB_ARGS :=
else
DEB_ROOT := $(TARGET_DIR)/deb-root-$(PROFILE)
DEB_ARGS := --variant $(PROFILE) --fast -o $(TARGET_DIR)/debian-$(PROFILE)/
endif

deb:
	$(MAKE) --no-print-directory all PROFILE=$(PROFILE)
	rm -rf $(DEB_ROOT)
	$(MAKE) --no-print-directory install PROFILE=$(PROFILE) prefix=/usr INSTALL_RECORD= \
		DESTDIR=$(abspath $(DEB_ROOT)) >/dev/null
	gzip -9n $(DEB_ROOT)/usr/share/man/man1/*.1
	$(if $(DEB_ARGS),find $(DEB_ROOT)/usr/bin -type f -exec strip --strip-debug {} +)
	$(if $(DEB_ARGS),mkdir -p $(TARGET_DIR)/debian-$(PROFILE))
	$(CARGO) deb -p handoff --no-build $(DEB_ARGS)

FORCE:
