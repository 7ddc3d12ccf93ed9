#!/usr/bin/env bash
# A throw-away single-node Ceph 16 with a RADOS Gateway on 127.0.0.1, for the interop suite:
# the only S3 server here that enforces object ownership between two users, which is the
# whole point of bucket-owner-full-control.
#
#   tests/interop/radosgw.sh start    install (Debian radosgw ceph-mon ceph-osd) if missing,
#                                     start mon + osd + rgw, create the users, write the env file
#   tests/interop/radosgw.sh stop     stop rgw, osd, mon and delete the cluster's folder
#   tests/interop/radosgw.sh status   exit 0 if it is running
#
# Users: `owner` (owns the test buckets) and `peer` (the daemon's identity; a bucket policy
# names it `arn:aws:iam:::user/peer`). The peer's keys are test/test because the test
# harness (tests/common/server.rs) runs the daemon with exactly those credentials.
# `start` writes $S3X_INTEROP_HOME/radosgw.env (S3X_RGW_*) to source before `cargo test`.
# `start` on a running gateway only rewrites the env file: one start per test run.
#
# Env: S3X_INTEROP_HOME (default /tmp/s3x-interop), S3X_RGW_PORT (9480),
#      S3X_RGW_MON_PORT (6795; not Ceph's 6789, so another test bed's cluster can coexist).
#
# Pitfalls this script avoids (all seen on this machine):
# - the monitor speaks msgr v1 only, so its address must be given as v1 (`--addv`):
#   plain `--add` makes a v2 address for any port but 6789, which the mon never answers;
# - BlueStore on a sparse file, not memstore: a full memstore makes writes hang silently;
# - RGW frees overwritten data only after garbage collection (2 h by default): cut to 60 s;
# - radosgw ignores SIGTERM once the OSD is gone: stop rgw first, then osd, then mon.
# shellcheck source=tests/interop/lib.sh
source "$(dirname "$0")/lib.sh"

PORT=${S3X_RGW_PORT:-9480}
MON_PORT=${S3X_RGW_MON_PORT:-6795}
D=$S3X_INTEROP_HOME/radosgw
ENV_FILE=$S3X_INTEROP_HOME/radosgw.env
OWNER_KEY=S3XOWNERKEY
OWNER_SECRET=S3XOWNERSECRET
PEER_KEY='test'
PEER_SECRET='test'
# Ceph daemons in start order; each writes $D/run/<name>.pid. `program` is what pid_alive
# looks for in the process's command line.
DAEMONS=("mon.a:ceph-mon" "osd.0:ceph-osd" "client.rgw.a:radosgw")

running() {
  local d
  for d in "${DAEMONS[@]}"; do pid_alive "$D/run/${d%%:*}.pid" "${d##*:}" || return 1; done
}

stop() {
  local i d
  # Reverse order: rgw first (it hangs on SIGTERM without an OSD), the monitor last.
  for (( i = ${#DAEMONS[@]} - 1; i >= 0; i-- )); do
    d=${DAEMONS[$i]}
    stop_pidfile "$D/run/${d%%:*}.pid" "${d##*:}"
  done
  rm -rf "$D" "$ENV_FILE"
}

write_env() {
  cat >"$ENV_FILE" <<ENV
# Written by tests/interop/radosgw.sh; source it before cargo test --test interop.
export S3X_RGW_ENDPOINT=http://$HOST:$PORT
export S3X_RGW_OWNER_KEY=$OWNER_KEY
export S3X_RGW_OWNER_SECRET=$OWNER_SECRET
export S3X_RGW_PEER_KEY=$PEER_KEY
export S3X_RGW_PEER_SECRET=$PEER_SECRET
export S3X_RGW_PEER_ARN=arn:aws:iam:::user/peer
ENV
  client_env >>"$ENV_FILE"
  log "radosgw on http://$HOST:$PORT; env file $ENV_FILE"
}

write_ceph_conf() {
  cat >"$D/ceph.conf" <<CONF
[global]
fsid = $1
mon host = v1:$HOST:$MON_PORT
mon initial members = a
public network = 127.0.0.0/8
ms bind msgr2 = false
ms bind ipv6 = false
# Loopback test cluster: no cephx between the daemons. S3 SigV4, ACLs and bucket
# policies in the gateway are unaffected.
auth cluster required = none
auth service required = none
auth client required = none
run dir = $D/run
pid file = $D/run/\$name.pid
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
osd crush chooseleaf type = 0
# The script places osd.0 in the CRUSH map itself. Left on, the OSD's own start-up update
# fails here ('wrong fsid' from the mon) and the OSD exits.
osd crush update on start = false
osd class update on start = false
osd objectstore = bluestore
bluestore block path = $D/osd.0.block
bluestore block create = true
# Sparse: takes only the space written. 48 GiB: the benchmark's big scenario writes 5 GiB a
# round (RGW frees deleted objects only after its garbage collection, a minute or two later).
bluestore block size = $(( 48 * 1024 * 1024 * 1024 ))
bluestore fsck on mount = false
osd memory target = 1073741824
rgw gc obj min wait = 60
rgw gc processor period = 60
rgw gc processor max time = 60
[mon.a]
mon data = $D/mon.a
[osd.0]
osd data = $D/osd.0
[client.rgw.a]
rgw data = $D/rgw.a
rgw frontends = beast endpoint=$HOST:$PORT
# SSE-KMS without a key server: the gateway's built-in test backend with one fixed key
# (s3x-test-key), over plain HTTP. Deliveries encrypted this way carry an ETag that is not
# their MD5, which the inbox must not mistake for damage.
rgw crypt s3 kms backend = testing
rgw crypt s3 kms encryption keys = s3x-test-key=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
rgw crypt require ssl = false
CONF
}

start() {
  ensure_clients
  if running; then
    log "already running"
    write_env
    return 0
  fi
  if ! command -v radosgw >/dev/null || ! command -v ceph-mon >/dev/null ||
    ! command -v ceph-osd >/dev/null; then
    apt_install radosgw ceph-mon ceph-osd
  fi
  # Half a cluster from an interrupted start is useless: start from scratch.
  stop 2>/dev/null
  mkdir -p "$D/mon.a" "$D/osd.0" "$D/run" "$D/log" "$D/rgw.a"
  local fsid osd_uuid t0=$SECONDS
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_ceph_conf "$fsid"
  export CEPH_CONF=$D/ceph.conf

  monmaptool --create --fsid "$fsid" --addv a "[v1:$HOST:$MON_PORT]" "$D/monmap" >/dev/null
  ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
  ceph-mon -i a
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  # The first command may reach a monitor not yet ready for it: "Error EPERM: problem
  # getting command descriptions from mon." ended one CI run here. `osd new` with the same
  # uuid is idempotent, so it is retried, for about a minute at most.
  local deadline=$(( SECONDS + 60 ))
  until timeout 15 ceph osd new "$osd_uuid" >/dev/null; do
    (( SECONDS < deadline )) || die "ceph osd new kept failing; see $D/log/mon.a.log"
    sleep 2
  done
  ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >"$D/log/osd-mkfs.out" 2>&1 ||
    { cat "$D/log/osd-mkfs.out" >&2; die "ceph-osd --mkfs failed"; }
  timeout 60 ceph osd crush add osd.0 1 root=default host=localhost >/dev/null 2>&1
  # Each daemonizes; what they say before that goes to a file shown on failure.
  ceph-osd -i 0 2>"$D/log/osd-start.err" ||
    { cat "$D/log/osd-start.err" >&2; tail -n 5 "$D/log/osd.0.log" >&2; die "ceph-osd failed"; }
  radosgw -n client.rgw.a 2>"$D/log/rgw-start.err" || # creates its pools on first start
    { cat "$D/log/rgw-start.err" >&2; die "radosgw failed"; }
  wait_http "http://$HOST:$PORT/" 180 || { tail -n 30 "$D/log/client.rgw.a.log" >&2; exit 1; }
  radosgw-admin user create --uid=owner --display-name=owner \
    --access-key="$OWNER_KEY" --secret="$OWNER_SECRET" >/dev/null
  radosgw-admin user create --uid=peer --display-name=peer \
    --access-key="$PEER_KEY" --secret="$PEER_SECRET" >/dev/null
  log "ceph $(ceph --version | awk '{print $3}') up in $(( SECONDS - t0 )) s (logs $D/log)"
  write_env
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) running ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
