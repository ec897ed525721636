#!/usr/bin/env bash
# Refreshes the pictures under docs/screenshots/ from the tests that take them, on purpose:
# a normal test run writes its screenshots to temp dirs and never touches the repository.
# Each test below writes into $HANDOFF_SCREENSHOTS when it is set (a path relative to the
# workspace root). Needs what .ci/run needs (scripts/deps.sh), as root. Review the result
# with `git diff --stat docs/screenshots` and look at the pictures before committing them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export HANDOFF_SCREENSHOTS=docs/screenshots
cargo test -p handoff-block --test bar_screenshots                   # bar-*.png
cargo test -p handoff-block --test real_bars                         # waybar-, polybar-, i3status-rust-*.png
cargo test -p handoff-tray --all-features --test tray_desktop        # tray-*.png
cargo test -p handoff-tray --all-features --test demo_desktop        # demo-*.png
cargo test -p handoff-details --all-features --test window           # details-*.png
cargo test --all-features --test lg_i3                               # lg-workspace.png
git status --short docs/screenshots
