#!/usr/bin/env bash
# moto (Python, in-memory AWS mock) in server mode on 127.0.0.1, for the interop suite's
# server matrix: a third S3 implementation, built from AWS's API models, that the daemon's
# requests must satisfy. It proves no ownership (auth off: one account, every object
# readable, a fixed dummy ACL) and ignores x-amz-expected-bucket-owner.
#
#   tests/interop/moto.sh start    install moto (pinned, in a virtualenv: see lib.sh) if
#                                  missing, start it, write $S3X_INTEROP_HOME/moto.env (S3X_MOTO_*)
#   tests/interop/moto.sh stop     stop it
#   tests/interop/moto.sh status   exit 0 if it is running
#
# Env: S3X_INTEROP_HOME (default /tmp/s3x-interop), S3X_MOTO_PORT (9490).
# shellcheck source=tests/interop/lib.sh
source "$(dirname "$0")/lib.sh"

PORT=${S3X_MOTO_PORT:-9490}
PID_FILE=$S3X_INTEROP_HOME/moto.pid
LOG_FILE=$S3X_INTEROP_HOME/moto.log
ENV_FILE=$S3X_INTEROP_HOME/moto.env

write_env() {
  cat >"$ENV_FILE" <<ENV
# Written by tests/interop/moto.sh; source it before cargo test --test interop.
export S3X_MOTO_ENDPOINT=http://$HOST:$PORT
ENV
  client_env >>"$ENV_FILE"
  log "moto on http://$HOST:$PORT; env file $ENV_FILE"
}

start() {
  ensure_clients
  if pid_alive "$PID_FILE" moto.server; then
    log "already running (pid $(cat "$PID_FILE"))"
    write_env
    return 0
  fi
  local t0=$SECONDS
  # No auth (moto's default): any signed request is accepted, as one account.
  nohup "$PYTHON" -m moto.server -H "$HOST" -p "$PORT" >"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
  wait_http "http://$HOST:$PORT/moto-api/" 60 || { tail -n 30 "$LOG_FILE" >&2; exit 1; }
  log "moto up in $(( SECONDS - t0 )) s (pid $(cat "$PID_FILE"), log $LOG_FILE)"
  write_env
}

stop() {
  stop_pidfile "$PID_FILE" moto.server
  rm -f "$ENV_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) pid_alive "$PID_FILE" moto.server ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
