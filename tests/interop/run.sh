#!/usr/bin/env bash
# The interop suite alone: starts the Ceph RADOS Gateway and moto (installing them if
# missing), runs `cargo test --test interop`, and stops the servers it started.
# Usage: tests/interop/run.sh [test name filter] [-- libtest options]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/interop/servers.sh
source tests/interop/servers.sh

trap interop_down EXIT
interop_up
cargo test --locked --test interop "$@"
