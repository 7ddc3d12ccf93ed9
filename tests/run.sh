#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need,
# checks formatting and lints, then runs every unit and integration test. The
# integration tests start their own S3-compatible servers on 127.0.0.1 and stop them; the
# interop suite's servers (Ceph RADOS Gateway, moto) are started here, once, and stopped.
# Usage: tests/run.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

# Debian packages the tests use (curl for waits, procps for memory figures, rpm to list
# the RPM packaging/build.sh makes).
need=()
for cmd in curl:curl pkill:procps rpm:rpm; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust 1.95 or newer (https://rustup.rs)" >&2
  exit 1
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# The interop suite's servers (tests/interop/): one RADOS Gateway and one moto for the whole
# run (the gateway takes ~15 s to start), stopped on exit.
# shellcheck source=tests/interop/servers.sh
source tests/interop/servers.sh
trap interop_down EXIT
log "starting the interop servers (Ceph RADOS Gateway, moto)"
interop_up

log "cargo test (unit, integration and interop tests)"
cargo test --all-targets --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-4}"

# The .deb and .rpm (packaging/build.sh) of the dev build the tests just made, with the
# manual pages, contents checked; always, and a failure fails the run. On a clean machine
# --install-tools first builds the pinned packagers (cargo install --debug: about 2.5-3
# min on 2 cores); the packaging itself then takes under a minute. The systemd test
# installs the .deb.
log "packages (.deb and .rpm, contents checked)"
pkg_out=$(packaging/build.sh --install-tools --profile dev) || {
  echo "packaging/build.sh failed" >&2
  exit 1
}
deb=$(sed -n 's/^DEB=//p' <<<"$pkg_out")

# Both units under a real systemd 252 (../shared/testbed/systemd-sandbox). Needs root;
# elsewhere it prints "SKIP ...: <reason>" and passes.
log "systemd units under a real systemd"
S3X_DEB="$deb" cargo test --locked --test systemd -- --ignored --nocapture

log "all tests passed"
