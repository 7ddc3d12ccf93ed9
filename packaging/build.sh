#!/usr/bin/env bash
# Builds the Debian and RPM packages from the [package.metadata.deb] and
# [package.metadata.generate-rpm] sections of Cargo.toml, then checks what is inside
# (dpkg-deb -c / rpm -qlp) against the list of files the units and docs need.
#
# Usage: packaging/build.sh [--install-tools] [--profile dev|release]
#   --install-tools  install what is missing: the packagers (cargo install --locked
#                    --debug, the pinned versions below: about 3 min on a clean machine)
#                    and Debian's rpm (apt-get, as root), which lists the RPM.
#                    tests/run.sh always passes it.
#   --profile        which build to package (default release, what you ship). tests/run.sh
#                    packages the dev build the tests already made: a release build from
#                    scratch costs about 10 CPU-minutes, and the packaging is the same.
# The manual pages (s3-exchange.1 and one per command) come from the clap definitions:
# examples/manpage.rs writes them into target/man/ and they are gzipped there.
# Exit: 0 built and checked; 1 a step or a check failed; 2 a tool is missing and
# --install-tools was not given (nothing built).
# Prints the paths of the packages on the last lines (DEB=..., RPM=...).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== packaging: %s\n' "$*" >&2; }

install_tools=no
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --install-tools) install_tools=yes; shift ;;
    --profile) profile=$2; shift 2 ;;
    *) log "unknown argument $1"; exit 64 ;;
  esac
done
case $profile in
  release) dir=release ;;
  dev) dir=debug ;;
  *) log "--profile must be dev or release"; exit 64 ;;
esac

# The packagers, pinned: the versions this packaging is checked with. --install-tools
# builds them unoptimised (--debug), which halves the install and makes the same packages
# (the same .deb; an RPM differing only in its build time, as any two runs do). Measured on 2 cores shared with a test run (load 2 / load 3-5):
#   cargo-deb           --debug 38 s / 42 s    release 1 min 01 s / 1 min 29 s
#   cargo-generate-rpm  --debug 1 min 51 s / 2 min 19 s    release 3 min 37 s / 6 min 41 s
# (4.3 instead of 8.6 CPU-minutes together). The price: the debug cargo-generate-rpm
# hashes slowly, so the dev RPM takes 30 s instead of 2 s and this whole script, with
# everything built, 54 s instead of 10 s. Release builds of the tools, for a machine that
# packages often: cargo install --locked cargo-deb@3.8.0 cargo-generate-rpm@0.21.1
PACKAGERS=(cargo-deb@3.8.0 cargo-generate-rpm@0.21.1)
INSTALL_FLAGS=(--debug)
missing=()
for spec in "${PACKAGERS[@]}" rpm; do
  command -v "${spec%@*}" >/dev/null 2>&1 || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ] && [ "$install_tools" = no ]; then
  log "SKIP: not installed: ${missing[*]} (packaging/build.sh --install-tools installs them)"
  exit 2
fi
for spec in "${missing[@]}"; do
  start=$(date +%s)
  if [ "$spec" = rpm ]; then
    log "installing Debian's rpm (apt-get), to list the RPM"
    [ "$(id -u)" = 0 ] || { log "FAIL: rpm is missing and only root can install it"; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends rpm >/dev/null
  else
    log "installing $spec (cargo install --locked ${INSTALL_FLAGS[*]})"
    cargo install --locked "${INSTALL_FLAGS[@]}" "$spec" >&2
  fi
  log "$spec installed in $(( $(date +%s) - start )) s"
done
for spec in "${PACKAGERS[@]}"; do
  tool=${spec%@*}
  have=$(cargo "${tool#cargo-}" --version | awk '{print $2}')
  [ "$have" = "${spec#*@}" ] || log "note: $tool $have is installed; checked with ${spec#*@}"
done

# A dev build is the one tests/run.sh's `cargo test --all-targets` made: the binary
# together with a target that needs the dev-dependencies, whose features (hyper's server,
# ...) are then unified into the shared dependencies; `--bin` alone would rebuild the AWS
# SDK crates for minutes. A release build is what you ship: the binary alone.
start=$(date +%s)
if [ "$profile" = dev ]; then
  cargo build --profile dev --locked --bin s3-exchange --example manpage >&2
else
  cargo build --profile release --locked --bin s3-exchange >&2
fi
log "$profile build in $(( $(date +%s) - start )) s"

# The manual pages, from the clap definitions, dated by the last commit. The example's
# dev build whatever --profile says (the pages do not depend on it).
log "manual pages (examples/manpage.rs)"
rm -rf target/man
date=$(git log -1 --format=%cs 2>/dev/null || date +%F)
cargo run --quiet --profile dev --locked --example manpage -- target/man "$date" >&2
gzip -9n target/man/*.1
if command -v lexgrog >/dev/null 2>&1; then
  # man-db's parser: each page has a NAME line that whatis/apropos can index.
  for page in target/man/*.1.gz; do
    lexgrog "$page" >/dev/null || { log "FAIL: lexgrog cannot parse $page"; exit 1; }
  done
fi

# Both packagers read the binary from target/release/ (the metadata's path); a dev build
# is staged there as a stripped copy in a separate folder, never over a release binary.
out=target/packages
rm -rf "$out"
mkdir -p "$out/release"
cp "target/$dir/s3-exchange" "$out/release/s3-exchange"
strip -s "$out/release/s3-exchange"
# A dev package is a check, not a release: fast compression (2 min -> 20 s here).
fast=()
rpm_fast=()
if [ "$profile" = dev ]; then fast=(--fast); rpm_fast=(--payload-compress gzip); fi
CARGO_TARGET_DIR="$out" cargo deb --no-build --no-strip --locked "${fast[@]}" -o "$out/" >&2
deb=$(ls "$out"/*.deb)
cargo generate-rpm --target-dir "$out" -o "$out/" "${rpm_fast[@]}" >&2
rpm_file=$(ls "$out"/*.rpm)

expected=(
  usr/bin/s3-exchange
  lib/systemd/system/s3-exchange@.service
  usr/lib/systemd/user/s3-exchange.service
  etc/s3-exchange/config.example.toml
  usr/share/doc/s3-exchange/README.md
  usr/share/doc/s3-exchange/SEMANTICS.md
  usr/share/s3-exchange/install-user.sh
  usr/share/man/man1/s3-exchange.1.gz
)
for cmd in run sync check status init; do
  expected+=("usr/share/man/man1/s3-exchange-$cmd.1.gz")
done
fail=0
deb_list=$(dpkg-deb -c "$deb")
for f in "${expected[@]}"; do
  grep -q " \./$f\$" <<<"$deb_list" || { log "FAIL: $deb lacks /$f"; fail=1; }
done
grep -q '^-rwxr-xr-x .* \./usr/bin/s3-exchange$' <<<"$deb_list" || { log "FAIL: /usr/bin/s3-exchange is not 755"; fail=1; }
conffiles=$(dpkg-deb -I "$deb" conffiles 2>/dev/null || true)
grep -qx /etc/s3-exchange/config.example.toml <<<"$conffiles" || { log "FAIL: the example configuration is not a conffile"; fail=1; }
postinst=$(dpkg-deb -I "$deb" postinst 2>/dev/null || true)
grep -q 'systemctl daemon-reload' <<<"$postinst" || { log "FAIL: postinst does not reload systemd"; fail=1; }

rpm_list=$(rpm -qlp "$rpm_file" 2>/dev/null)
for f in "${expected[@]}"; do
  f=${f/#lib\/systemd\/system/usr\/lib\/systemd\/system}
  grep -qx "/$f" <<<"$rpm_list" || { log "FAIL: $rpm_file lacks /$f"; fail=1; }
done
rpm -qp --configfiles "$rpm_file" 2>/dev/null | grep -qx /etc/s3-exchange/config.example.toml \
  || { log "FAIL: the example configuration is not %config in the RPM"; fail=1; }
rpm -qp --scripts "$rpm_file" 2>/dev/null | grep -q 'systemctl daemon-reload' \
  || { log "FAIL: the RPM scriptlets do not reload systemd"; fail=1; }

[ "$fail" = 0 ] || exit 1
log "ok: $(du -h "$deb" | cut -f1) $deb, $(du -h "$rpm_file" | cut -f1) $rpm_file"
echo "DEB=$deb"
echo "RPM=$rpm_file"
