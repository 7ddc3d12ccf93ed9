# shellcheck shell=bash
# Source it from a test script (tests/run.sh, tests/interop/run.sh), then:
#
#   trap interop_down EXIT
#   interop_up
#
# interop_up starts the interop servers (the Ceph RADOS Gateway, moto) unless they are
# already running, and exports what the tests need: their env files (S3X_RGW_*, S3X_MOTO_*,
# the clients) and S3X_REQUIRE_INTEROP=1, so that a missing server fails the suite instead
# of skipping it. interop_down stops the servers this run started; servers a developer
# started beforehand stay up.

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INTEROP_STARTED=()

interop_up() {
  local server home=${S3X_INTEROP_HOME:-/tmp/s3x-interop}
  for server in radosgw moto; do
    if ! "$INTEROP_DIR/$server.sh" status; then
      # Recorded before the start, so that a start failing halfway is cleaned up too.
      INTEROP_STARTED+=("$server")
    fi
    "$INTEROP_DIR/$server.sh" start
    # shellcheck source=/dev/null
    source "$home/$server.env"
  done
  export S3X_REQUIRE_INTEROP=1
}

interop_down() {
  local server
  for server in "${INTEROP_STARTED[@]}"; do
    "$INTEROP_DIR/$server.sh" stop || true
  done
  INTEROP_STARTED=()
}
