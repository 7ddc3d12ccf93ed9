#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need,
# checks formatting and lints, then runs every unit and integration test. The
# integration tests start their own S3-compatible servers on 127.0.0.1 and stop them.
# Usage: tests/run.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

# Debian packages the tests use (curl for waits, procps for memory figures).
need=()
for cmd in curl:curl pkill:procps; do
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

log "cargo test (unit and integration tests)"
cargo test --all-targets --locked -- --test-threads "${TEST_THREADS:-4}"

log "all tests passed"
