#!/usr/bin/env python3
"""Side-by-side benchmark of s3-exchange and the S3 tools people use instead.

Run through benches/run.sh, which installs the peers, starts the Ceph RADOS Gateway from
tests/interop/radosgw.sh and builds the release binary. Every scenario runs s3-exchange
and each peer against the same server in the same run, alternating, ROUNDS times, and
prints medians and the ratio to the best peer. Nothing here is a test: tests never time.

Scenarios (issue 8):
  big       one 1 GiB file up (outbox -> object complete) and down (delivery -> inbox)
  small     1,000 files of 4 KiB up and down
  poll      a steady-state poll of Delivery/ holding N known objects: CPU s, GETs, RSS
  latency   from a file's close to the start of its upload, beyond settle (p50, p99)
  idle      CPU seconds and resident memory over IDLE_SECONDS with the ledger of `poll`
  single    40 deliveries of 4 KiB one at a time (`transfer.concurrency = 1`, s5cmd
            `--numworkers 1`): the time of each, where a server's Nagle meets a client's
            delayed ACK (not part of the default run)
"""

import ctypes
import ctypes.util
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config as BotoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# S3X_BIN: another build of the daemon (an A/B against an older commit).
BIN = os.environ.get("S3X_BIN") or os.path.join(ROOT, "target", "release", "s3-exchange")
ENDPOINT = os.environ["S3X_RGW_ENDPOINT"]
KEY = os.environ["S3X_RGW_OWNER_KEY"]
SECRET = os.environ["S3X_RGW_OWNER_SECRET"]
AWS = os.environ.get("S3X_AWS_CLI", "/usr/bin/aws")
S5CMD = os.environ["S3X_S5CMD"]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
POLL_OBJECTS = int(os.environ.get("BENCH_POLL_OBJECTS", "100000"))
IDLE_SECONDS = int(os.environ.get("BENCH_IDLE_SECONDS", "300"))
LATENCY_FILES = int(os.environ.get("BENCH_LATENCY_FILES", "200"))
SINGLE_FILES = 40
# A fresh bucket per run: objects of an earlier run must not be mistaken for this one's.
BUCKET = os.environ.get("BENCH_BUCKET") or f"bench-{int(time.time())}"
SETTLE_MS = 200
# Names this run's keys apart from earlier runs' in the same bucket.
RUN = str(int(time.time()))
# The peers to run beside s3-exchange (BENCH_PEERS=s5cmd for a quick comparison).
PEERS = os.environ.get("BENCH_PEERS", "s5cmd,rclone,aws").split(",")

PEER_ENV = dict(
    os.environ,
    AWS_ACCESS_KEY_ID=KEY,
    AWS_SECRET_ACCESS_KEY=SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    RCLONE_CONFIG_RGW_TYPE="s3",
    RCLONE_CONFIG_RGW_PROVIDER="Ceph",
    RCLONE_CONFIG_RGW_ENDPOINT=ENDPOINT,
    RCLONE_CONFIG_RGW_ACCESS_KEY_ID=KEY,
    RCLONE_CONFIG_RGW_SECRET_ACCESS_KEY=SECRET,
    RCLONE_CONFIG_RGW_ACL="bucket-owner-full-control",
)
# rclone 1.60 refuses to start while AWS_CA_BUNDLE is set (these machines set it).
PEER_ENV.pop("AWS_CA_BUNDLE", None)


def s3():
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=BotoConfig(max_pool_connections=32, s3={"addressing_style": "path"}),
    )


def wait_until(what, cond, timeout=900, step=0.005):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)


def run(cmd, **kw):
    subprocess.run(cmd, check=True, env=PEER_ENV, stdout=subprocess.DEVNULL, **kw)


def timed(cmd):
    t0 = time.monotonic()
    run(cmd)
    return time.monotonic() - t0


def count_files(path):
    """Files under `path`, not counting the daemon's hidden temp folder."""
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += len(files)
    return total


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80
_EVENT = struct.Struct("iIII")


class Arrivals:
    """Names arriving in a folder, told by inotify: waiting for the 1,000th costs no CPU.
    (Polling the folder every 20 ms took a share of the two cores from the client being
    measured, and only from s3-exchange: the peers are timed by their exit.) Hidden names
    (the daemon's temp files) do not count. Create it before the work starts."""

    def __init__(self, path):
        self.fd = _LIBC.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or _LIBC.inotify_add_watch(self.fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")
        # Read after the watch is set: a name is in the listing, in the events or in both.
        self.names = {e.name for e in os.scandir(path) if not e.name.startswith(".")}

    def wait(self, what, count, timeout=900):
        try:
            self._wait(what, count, timeout)
        finally:
            os.close(self.fd)

    def _wait(self, what, count, timeout):
        deadline = time.monotonic() + timeout
        while len(self.names) < count:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"timed out waiting for {what}: {len(self.names)} of {count}")
            buf = os.read(self.fd, 1 << 16)
            at = 0
            while at < len(buf):
                _, _, _, size = _EVENT.unpack_from(buf, at)
                name = buf[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0").decode()
                at += _EVENT.size + size
                if not name.startswith("."):
                    self.names.add(name)


def children_cpu():
    """User + system CPU seconds of every finished child process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return 0.0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    """The real binary on fresh folders, owner's keys, JSON log lines on stderr. The
    throughput scenarios log at info, as a production daemon would (the peers log nothing);
    the latency and poll scenarios need the debug event "transfer started". Finished polls
    are counted from the daemon's `status.json`, at any log level."""

    def __init__(self, base, inbox_prefix, poll_interval="1h", rescan="5m", level="info", extra=""):
        self.base = base
        for d in ("outbox", "inbox", "sent", "state", "log"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        self.config = os.path.join(base, "config.toml")
        with open(self.config, "w") as f:
            f.write(
                f"""[s3]
bucket = "{BUCKET}"
region = "us-east-1"
endpoint_url = "{ENDPOINT}"
force_path_style = true
checksums = "when_required"
[outbox]
dir = "{base}/outbox"
sent_dir = "{base}/sent"
settle = "{SETTLE_MS}ms"
rescan_interval = "{rescan}"
[inbox]
dir = "{base}/inbox"
prefix = "{inbox_prefix}"
poll_interval = "{poll_interval}"
[state]
dir = "{base}/state"
[log]
level = "{level}"
format = "json"
dir = "{base}/log"
{extra}"""
            )
        self.stderr = open(os.path.join(base, "stderr.jsonl"), "w")
        self.proc = subprocess.Popen(
            [BIN, "--config", self.config, "run"],
            env=PEER_ENV,
            stderr=self.stderr,
        )
        # Measured as a running daemon, as users have it: its start-up (the SDK's client,
        # the ledger, the first listing) must not fall into the first measurement.
        wait_until(
            "the daemon's start",
            lambda: any(e.get("fields", {}).get("message") == "s3-exchange started" for e in self.events()),
            timeout=60,
            step=0.05,
        )

    @property
    def pid(self):
        return self.proc.pid

    def poll_now(self):
        os.kill(self.pid, signal.SIGUSR1)

    def polls(self):
        """Polls this daemon finished, from its `status.json` (written within 500 ms of a
        change; an earlier daemon's file in the same folder does not count)."""
        try:
            with open(os.path.join(self.base, "state", "status.json")) as f:
                status = json.load(f)
        except (OSError, ValueError):
            return 0
        return status.get("polls", 0) if status.get("pid") == self.pid else 0

    def wait_polls(self, what, count, timeout=60):
        wait_until(what, lambda: self.polls() >= count, timeout=timeout, step=0.02)

    def events(self):
        with open(self.stderr.name) as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.stderr.close()


# Prefixes of objects to delete at the end of the run (see delete_later).
LATER = []


def delete_later(prefix):
    """Deletes a round's small objects at the end of the run, not between rounds: RGW's
    garbage collection runs a minute after a delete (tests/interop/radosgw.sh) and takes the
    OSD's CPU from whatever is measured then. The big scenario's objects go at once (see
    scenario_big)."""
    LATER.append(prefix)


def delete_prefix(client, prefix):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def put_many(client, prefix, count, body):
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"{prefix}{i:06d}", Body=body), range(count)))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def report(title, results, unit="s"):
    """results: name -> list of samples. Prints medians and the ratio to the best peer."""
    print(f"\n## {title}")
    peers = {k: median(v) for k, v in results.items() if k != "s3-exchange"}
    best_peer = min(peers, key=peers.get) if peers else None
    for name, samples in results.items():
        m = median(samples)
        ratio = f"{m / peers[best_peer]:.2f}x best peer ({best_peer})" if best_peer and name == "s3-exchange" else ""
        print(f"  {name:12} median {m:8.3f} {unit}  samples {['%.3f' % s for s in samples]} {ratio}")
    return {k: median(v) for k, v in results.items()}


def quiesce():
    """Flushes what the set-up (or the previous contender) left dirty, so that no timed step
    pays for another's writes with its first fsync."""
    os.sync()


def set_aside(work, path):
    """Moves what a contender wrote out of the way, to be deleted with the work folder at the
    end of the run, not now. Why: this machine's ext4 has no journal, and without one the
    kernel will not reuse an inode freed in the last 60 s (300 s while its table block is
    dirty): each file created in that block group first steps over every such inode. After
    deleting 1,000 files, a create took 0.6-1.2 ms instead of 25 us (2026-12-07), so a
    deletion between two contenders slowed whoever came next by up to a second per 1,000
    files. A rename frees no inode."""
    trash = os.path.join(work, "trash")
    os.makedirs(trash, exist_ok=True)
    os.rename(path, os.path.join(trash, f"{len(os.listdir(trash))}-{os.path.basename(path)}"))


def create_cost(work):
    """Microseconds per file create in a new folder under `work`: about 25 here, 0.6-1.2 ms
    where many files were deleted in the last minutes (see set_aside)."""
    probe = os.path.join(work, "create-probe")
    os.makedirs(probe)
    t0 = time.perf_counter()
    for i in range(200):
        os.close(os.open(os.path.join(probe, str(i)), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    us = (time.perf_counter() - t0) / 200 * 1e6
    set_aside(work, probe)
    return us


def in_turn(r, ours, peers):
    """s3-exchange first in even rounds, last in odd ones: whoever goes first meets a colder
    server (and, before quiesce, the set-up's dirty pages), so neither side always does."""
    return [ours, peers] if r % 2 == 0 else [peers, ours]


def time_peers(cmds, times, cpu=None, after=None):
    """Runs each chosen peer's command after `quiesce`, recording its run time (and its CPU
    seconds in `cpu`); `after` clears what it wrote."""
    for peer, cmd in cmds:
        if peer not in PEERS:
            continue
        quiesce()
        cpu0 = children_cpu()
        times[peer].append(timed(cmd))
        if cpu is not None:
            cpu[peer].append(children_cpu() - cpu0)
        if after:
            after()


def scenario_big(work, client, summary):
    src = os.path.join(work, "big.bin")
    with open(src, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    up = {name: [] for name in ["s3-exchange", *PEERS]}
    down = {name: [] for name in ["s3-exchange", *PEERS]}
    peak = []
    for r in range(ROUNDS):
        # Prefixes unique to this run: a reused bucket (BENCH_BUCKET) holds earlier runs' objects,
        # which the daemon's start-up poll would fetch before the measurement.
        tag = f"{RUN}-{r}"
        # Each daemon polls only its own round's prefix: earlier rounds' deliveries must
        # not be fetched during this round's measurements.
        d = Daemon(os.path.join(work, f"big-{tag}"), f"Delivery/big-{tag}/")
        d.wait_polls("the daemon's start-up poll", 1)
        # The owner's object, put after the start-up poll: the measured poll fetches it.
        run([S5CMD, "--endpoint-url", ENDPOINT, "cp", src, f"s3://{BUCKET}/Delivery/big-{tag}/big.bin"])
        name = f"big-{tag}.bin"
        os.link(src, os.path.join(work, name))
        out = os.path.join(work, "down.bin")

        def ours_up():
            quiesce()
            t0 = time.monotonic()
            os.rename(os.path.join(work, name), os.path.join(d.base, "outbox", name))
            wait_until("the big upload", lambda: os.path.exists(os.path.join(d.base, "sent", name)))
            up["s3-exchange"].append(time.monotonic() - t0)

        def ours_down():
            quiesce()
            target = os.path.join(d.base, "inbox", "big.bin")
            t0 = time.monotonic()
            d.poll_now()
            wait_until("the big delivery", lambda: os.path.exists(target))
            down["s3-exchange"].append(time.monotonic() - t0)

        def peers_up():
            time_peers(
                (
                    ("s5cmd", [S5CMD, "--endpoint-url", ENDPOINT, "cp", "--acl", "bucket-owner-full-control", src, f"s3://{BUCKET}/Submissions/s5-{tag}"]),
                    ("rclone", ["rclone", "copyto", src, f"rgw:{BUCKET}/Submissions/rc-{tag}"]),
                    ("aws", [AWS, "--endpoint-url", ENDPOINT, "s3", "cp", "--acl", "bucket-owner-full-control", "--quiet", src, f"s3://{BUCKET}/Submissions/aws-{tag}"]),
                ),
                up,
            )

        def peers_down():
            time_peers(
                (
                    ("s5cmd", [S5CMD, "--endpoint-url", ENDPOINT, "cp", f"s3://{BUCKET}/Delivery/big-{tag}/big.bin", out]),
                    ("rclone", ["rclone", "copyto", f"rgw:{BUCKET}/Delivery/big-{tag}/big.bin", out]),
                    ("aws", [AWS, "--endpoint-url", ENDPOINT, "s3", "cp", "--quiet", f"s3://{BUCKET}/Delivery/big-{tag}/big.bin", out]),
                ),
                down,
                after=lambda: os.remove(out),
            )

        for step in in_turn(r, ours_up, peers_up) + in_turn(r, ours_down, peers_down):
            step()
        peak.append(proc_status(d.pid, "VmHWM"))
        d.stop()
        # Deleted now, unlike the small files (set_aside, delete_later): one inode costs the
        # next create nothing, and kept, each round's 5 GiB (in the inbox and in the OSD's
        # file) filled the page cache until, within five rounds, every download (the peers'
        # too) took 1.5-2x longer and varied as much (2026-12-07).
        shutil.rmtree(d.base)
        delete_prefix(client, f"Delivery/big-{tag}/")
        for prefix in ("Submissions/s5-", "Submissions/rc-", "Submissions/aws-", "Submissions/big-"):
            delete_prefix(client, f"{prefix}{tag}")
    summary["big_up"] = report("1 GiB up (outbox -> object complete)", up)
    summary["big_down"] = report("1 GiB down (delivery -> inbox)", down)
    summary["big_peak_rss_mib"] = max(peak)
    print(f"  s3-exchange peak RSS {max(peak):.1f} MiB (target < 128 MiB)")


def scenario_small(work, client, summary):
    up = {name: [] for name in ["s3-exchange", *PEERS]}
    down = {name: [] for name in ["s3-exchange", *PEERS]}
    cpu_up = {name: [] for name in ["s3-exchange", *PEERS]}
    cpu_down = {name: [] for name in ["s3-exchange", *PEERS]}
    body = os.urandom(4096)
    for r in range(ROUNDS):
        # Prefixes unique to this run: a reused bucket (BENCH_BUCKET) holds earlier runs' objects,
        # which the daemon's start-up poll would fetch before the measurement.
        tag = f"{RUN}-{r}"
        src = os.path.join(work, f"small-{tag}")
        os.makedirs(src)
        for i in range(1000):
            with open(os.path.join(src, f"f{i:04d}"), "wb") as f:
                f.write(body)
        d = Daemon(os.path.join(work, f"smalld-{tag}"), f"Delivery/small-{tag}/")
        d.wait_polls("the daemon's start-up poll", 1)
        # The daemon's copy of the files, made before the objects are put (a second or
        # more): dropped in, they have been unchanged for longer than `settle` in every
        # round, as a finished folder's files are. Made just before the drop (until
        # 2026-12-07), the last few hundred had changed (ctime) within `settle` of it and
        # waited out the rest, but only in the rounds where s3-exchange went first. Not
        # before the daemon's start either: a change time from before it is not vouched for
        # (a clock step could hide in it) and every file would wait the whole settle time.
        shutil.copytree(src, os.path.join(d.base, "staging"))
        # Delivered after the start-up poll and before anyone is timed: the daemon's
        # measured poll and the peers' copies fetch the same objects.
        put_many(client, f"Delivery/small-{tag}/", 1000, body)
        # The copy beside the outbox (not timed: the peers read `src` as it is) is dropped in
        # with one rename, as a finished folder arrives. The folder's name is this round's
        # own, as the peers' prefixes are: keys that earlier runs wrote would make RGW
        # replace objects (deleting the old ones costs the OSD a third more CPU) where the
        # peers create new ones.
        batch = f"batch-{tag}"
        os.makedirs(os.path.join(d.base, "sent", batch))
        dl = os.path.join(work, "dl")

        def ours_up():
            sent = Arrivals(os.path.join(d.base, "sent", batch))
            quiesce()
            cpu0 = cpu_seconds(d.pid)
            t0 = time.monotonic()
            os.rename(os.path.join(d.base, "staging"), os.path.join(d.base, "outbox", batch))
            sent.wait("1000 uploads", 1000)
            up["s3-exchange"].append(time.monotonic() - t0)
            cpu_up["s3-exchange"].append(cpu_seconds(d.pid) - cpu0)

        def ours_down():
            landed = Arrivals(os.path.join(d.base, "inbox"))
            quiesce()
            cpu0 = cpu_seconds(d.pid)
            t0 = time.monotonic()
            d.poll_now()
            landed.wait("1000 deliveries", 1000)
            down["s3-exchange"].append(time.monotonic() - t0)
            cpu_down["s3-exchange"].append(cpu_seconds(d.pid) - cpu0)

        def peers_up():
            time_peers(
                (
                    ("s5cmd", [S5CMD, "--endpoint-url", ENDPOINT, "cp", "--acl", "bucket-owner-full-control", f"{src}/*", f"s3://{BUCKET}/Submissions/s5-small-{tag}/"]),
                    ("rclone", ["rclone", "copy", "--transfers", "16", src, f"rgw:{BUCKET}/Submissions/rc-small-{tag}/"]),
                    ("aws", [AWS, "--endpoint-url", ENDPOINT, "s3", "cp", "--recursive", "--quiet", "--acl", "bucket-owner-full-control", src, f"s3://{BUCKET}/Submissions/aws-small-{tag}/"]),
                ),
                up,
                cpu_up,
            )

        def peers_down():
            time_peers(
                (
                    ("s5cmd", [S5CMD, "--endpoint-url", ENDPOINT, "cp", f"s3://{BUCKET}/Delivery/small-{tag}/*", dl + "/"]),
                    ("rclone", ["rclone", "copy", "--transfers", "16", f"rgw:{BUCKET}/Delivery/small-{tag}/", dl]),
                    ("aws", [AWS, "--endpoint-url", ENDPOINT, "s3", "cp", "--recursive", "--quiet", f"s3://{BUCKET}/Delivery/small-{tag}/", dl]),
                ),
                down,
                cpu_down,
                after=lambda: set_aside(work, dl),
            )

        for step in in_turn(r, ours_up, peers_up) + in_turn(r, ours_down, peers_down):
            step()
        d.stop()
        set_aside(work, d.base)
        set_aside(work, src)
    summary["small_up"] = report("1,000 x 4 KiB up", up)
    summary["small_up_cpu"] = report("1,000 x 4 KiB up: the client's CPU seconds (on 2 cores the server's share the same CPUs)", cpu_up, unit="cpu-s")
    summary["small_down"] = report("1,000 x 4 KiB down", down)
    summary["small_down_cpu"] = report("1,000 x 4 KiB down: the client's CPU seconds", cpu_down, unit="cpu-s")


def scenario_poll_and_idle(work, client, summary):
    # Putting 100,000 objects takes about 8 minutes on RGW: a run with BENCH_BUCKET set to
    # the bucket of an earlier run reuses them.
    listed = sum(p.get("KeyCount", 0) for p in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="Delivery/many/"))
    if listed != POLL_OBJECTS:
        print(f"\n(setting up {POLL_OBJECTS} objects under Delivery/many/ ...)", flush=True)
        put_many(client, "Delivery/many/", POLL_OBJECTS, b"k")
    d = Daemon(os.path.join(work, "poll"), "Delivery/many/", poll_interval="1h", level="debug")
    d.wait_polls("the first full pass", 1, timeout=3600)
    cpu, rss, peak, gets = [], [], [], []
    for _ in range(ROUNDS):
        before_polls, before_cpu = d.polls(), cpu_seconds(d.pid)
        before_gets = sum(1 for e in d.events() if e.get("fields", {}).get("direction") == "download")
        rss.append(proc_status(d.pid, "VmRSS"))
        # The peak during the poll itself: VmHWM restarts from the current RSS ("5" resets
        # it), so reading it after the poll gives the poll's peak, whatever the allocator
        # gave back since.
        with open(f"/proc/{d.pid}/clear_refs", "w") as f:
            f.write("5")
        d.poll_now()
        d.wait_polls("a steady-state poll", before_polls + 1, timeout=600)
        cpu.append(cpu_seconds(d.pid) - before_cpu)
        peak.append(proc_status(d.pid, "VmHWM"))
        gets.append(sum(1 for e in d.events() if e.get("fields", {}).get("direction") == "download") - before_gets)
    print(f"\n## steady-state poll of {POLL_OBJECTS} known objects")
    print(f"  CPU s per poll: median {median(cpu):.3f} {['%.3f' % c for c in cpu]} (target < 1 s per 100,000)")
    print(f"  GETs per poll: {gets} (target 0); LIST requests per poll: {POLL_OBJECTS // 1000 + 1}")
    print(f"  resident memory before a poll: {max(rss):.1f} MiB; peak during a poll: {max(peak):.1f} MiB (+{max(p - r for p, r in zip(peak, rss)):.1f} MiB)")
    summary["poll_cpu_s"] = median(cpu)
    summary["poll_gets"] = max(gets)
    summary["poll_rss_mib"] = max(rss)
    summary["poll_peak_rss_mib"] = max(peak)
    d.stop()
    # Idle: the same ledger of 100,000 records and the default poll interval, nothing to
    # do. Twice: once with the owner's Delivery/ emptied (nothing listed: the daemon's own
    # cost), once with all 100,000 objects still listed (each 30 s poll lists them again).
    for label, prefix in (("nothing listed", "Delivery/idle-empty/"), (f"{POLL_OBJECTS} objects listed at each poll", "Delivery/many/")):
        d = Daemon(os.path.join(work, "poll"), prefix, poll_interval="30s", level="debug")
        d.wait_polls("start-up poll", 1, timeout=600)
        c0 = cpu_seconds(d.pid)
        time.sleep(IDLE_SECONDS)  # measuring an idle period is the point here, not a synchronisation
        idle_cpu = cpu_seconds(d.pid) - c0
        idle_rss = proc_status(d.pid, "VmRSS")
        share = idle_cpu / IDLE_SECONDS * 100
        print(f"\n## idle for {IDLE_SECONDS} s with {POLL_OBJECTS} ledger entries, {label}")
        print(f"  CPU {idle_cpu:.3f} s = {share:.3f}% of a core (target < 0.1%, includes its polls); RSS {idle_rss:.1f} MiB (target < 32 MiB)")
        tag = "idle" if prefix != "Delivery/many/" else "idle_listed"
        summary[f"{tag}_cpu_percent"] = share
        summary[f"{tag}_rss_mib"] = idle_rss
        d.stop()


def scenario_latency(work, client, summary):
    d = Daemon(os.path.join(work, "latency"), "Delivery/latency/", level="debug")
    closes = {}
    for i in range(LATENCY_FILES):
        path = os.path.join(d.base, "outbox", f"lat-{i:04d}")
        with open(path, "wb") as f:
            f.write(b"x" * 1024)
        closes[f"Submissions/lat-{i:04d}"] = time.time()
        time.sleep(0.02)  # pacing the producer, not synchronisation
    wait_until("all latency uploads", lambda: count_files(os.path.join(d.base, "sent")) == LATENCY_FILES, step=0.05)
    d.stop()
    started = {}
    for e in d.events():
        f = e.get("fields", {})
        if f.get("message") == "transfer started" and f.get("key") in closes:
            ts = e["timestamp"]
            started[f["key"]] = parse_ts(ts)
    lat = sorted((started[k] - closes[k]) * 1000 - SETTLE_MS for k in started)
    p50 = lat[len(lat) // 2]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"\n## detection latency over {len(lat)} files (beyond settle = {SETTLE_MS} ms)")
    print(f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 < 100 ms)")
    summary["latency_p50_ms"] = p50
    summary["latency_p99_ms"] = p99


def scenario_single(work, client, summary):
    """Small deliveries one at a time. The Ceph RADOS Gateway writes a response's head and
    body in two sends with Nagle's algorithm on, so a small body waits until the client
    acknowledges the head; a client that leaves that to Linux's delayed ACK waits 40 ms per
    GET (src/store/http.rs). Per file: the daemon's logged transfer time (GET, write, fsync,
    rename), and s5cmd's run time over the count (its start-up and listing included)."""
    ours, theirs = [], []
    body = os.urandom(4096)
    for r in range(ROUNDS):
        tag = f"{RUN}-{r}"
        prefix = f"Delivery/single-{tag}/"
        d = Daemon(os.path.join(work, f"single-{tag}"), prefix, extra="[transfer]\nconcurrency = 1\n")
        d.wait_polls("the daemon's start-up poll", 1)
        put_many(client, prefix, SINGLE_FILES, body)
        landed = Arrivals(os.path.join(d.base, "inbox"))
        quiesce()
        d.poll_now()
        landed.wait(f"{SINGLE_FILES} deliveries", SINGLE_FILES)
        d.stop()
        took = [e["fields"]["duration_ms"] for e in d.events() if e.get("fields", {}).get("message") == "transfer"]
        ours.append(median(took) / 1000)
        dl = os.path.join(work, "dl")
        times = {"s5cmd": []}
        if "s5cmd" in PEERS:
            time_peers(
                (("s5cmd", [S5CMD, "--endpoint-url", ENDPOINT, "--numworkers", "1", "cp", f"s3://{BUCKET}/{prefix}*", dl + "/"]),),
                times,
                after=lambda: set_aside(work, dl),
            )
            theirs.append(times["s5cmd"][0] / SINGLE_FILES)
        delete_later(prefix)
        set_aside(work, d.base)
    results = {"s3-exchange": ours}
    if theirs:
        results["s5cmd"] = theirs
    summary["single_4k_down"] = report(f"{SINGLE_FILES} x 4 KiB down one at a time, per file", results)


def parse_ts(ts):
    m = re.match(r"(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)(\.\d+)?Z", ts)
    import calendar

    secs = calendar.timegm(tuple(int(x) for x in m.groups()[:6]))
    return secs + float(m.group(7) or 0)


def main():
    scenarios = sys.argv[1:] or ["big", "small", "latency", "poll"]
    client = s3()
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    summary = {}
    # /var/tmp, not /tmp: the test suite, often run just before, creates and deletes
    # thousands of files under /tmp (see set_aside for what that costs here).
    with tempfile.TemporaryDirectory(prefix="s3x-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as work:
        us = create_cost(work)
        print(f"scratch folder {work}: a file create takes {us:.0f} us")
        if us > 200:
            print("  slow: files were deleted near it in the last minutes (see set_aside in benches/bench.py);\n"
                  "  scenarios that create many files will be slowed and noisy: wait 5 minutes, or set BENCH_DIR")
        try:
            for s in scenarios:
                {"big": scenario_big, "small": scenario_small, "latency": scenario_latency, "poll": scenario_poll_and_idle, "single": scenario_single}[s](work, client, summary)
        finally:
            for prefix in LATER:
                delete_prefix(client, prefix)
    print("\nsummary (JSON):", json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
