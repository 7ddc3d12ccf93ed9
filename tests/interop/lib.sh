# shellcheck shell=bash
# Helpers for the interop servers' scripts (radosgw.sh, moto.sh). Source it; don't run it.
#
# Everything binds to 127.0.0.1. All state (pid files, logs, data, env files) lives under
# $S3X_INTEROP_HOME (default /tmp/s3x-interop): `stop` deletes only what it created there.
set -euo pipefail

S3X_INTEROP_HOME=${S3X_INTEROP_HOME:-/tmp/s3x-interop}
mkdir -p "$S3X_INTEROP_HOME"
# shellcheck disable=SC2034 # used by the scripts that source this file
HOST=127.0.0.1
# The clients the tests drive on the owner's side (and for the peer's control uploads).
# Debian's AWS CLI v2, by full path: `aws` on PATH may be a pip-installed v1 (a pyenv shim on
# these machines), which sends different checksum headers.
AWS_CLI=/usr/bin/aws
# The Python side (moto's server, boto3) in a virtualenv of its own, kept across runs, at
# pinned versions whatever the machine's Python holds. moto 5.2.5, not 5.2.1: 5.2.1 answers
# CompleteMultipartUpload with a <CompleteMultipartUploadResponse> root element, which boto3
# tolerates and aws-sdk-s3 (rightly) rejects, so no multipart upload by the daemon could
# complete against it.
VENV=$S3X_INTEROP_HOME/venv
PYTHON=$VENV/bin/python
MOTO_VERSION=5.2.5
BOTO3_VERSION=1.44.8

log() { echo "[$(basename "$0")] $*" >&2; }
die() { log "error: $*"; exit 1; }

# apt_install PACKAGE... : installs Debian packages without recommends (updates the lists
# once if this machine never fetched them).
apt_install() {
  if [ -z "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ]; then
    apt-get update -qq
  fi
  log "installing $* from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

# ensure_clients : installs the AWS CLI v2, and the virtualenv with moto and boto3, if missing.
ensure_clients() {
  [ -x "$AWS_CLI" ] || apt_install awscli
  "$AWS_CLI" --version 2>&1 | grep -q '^aws-cli/2\.' || die "$AWS_CLI is not the AWS CLI v2"
  local check="import boto3, moto.server
assert moto.__version__ == '$MOTO_VERSION' and boto3.__version__ == '$BOTO3_VERSION'"
  if ! "$PYTHON" -c "$check" 2>/dev/null; then
    log "installing moto[server]==$MOTO_VERSION boto3==$BOTO3_VERSION into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    "$PYTHON" -m pip install -q "moto[server]==$MOTO_VERSION" "boto3==$BOTO3_VERSION" >&2
  fi
}

# client_env : the env file lines that tell the tests where the clients are.
client_env() {
  echo "export S3X_AWS_CLI=$AWS_CLI"
  echo "export S3X_PYTHON=$PYTHON"
}

# pid_alive PIDFILE NAME : whether the pid recorded in PIDFILE is alive AND still runs NAME
# (its command line contains it): a stale pid file must never make us signal a stranger.
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"
}

# stop_pidfile PIDFILE NAME : TERM the recorded process, KILL it if it is still there after
# 15 s, and remove the pid file. Does nothing if it is not running.
stop_pidfile() {
  local file=$1 name=$2 pid
  if ! pid_alive "$file" "$name"; then
    rm -f "$file"
    return 0
  fi
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    pid_alive "$file" "$name" || break
    sleep 0.1
  done
  if pid_alive "$file" "$name"; then
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
  log "stopped $name (pid $pid)"
}

# wait_http URL SECONDS : waits until something answers HTTP at URL, or fails after SECONDS.
wait_http() {
  local url=$1 deadline=$(( $(date +%s) + $2 ))
  until curl -s -o /dev/null --max-time 2 "$url"; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "no answer from $url within $2 s"; return 1; }
    sleep 0.2
  done
}
