#!/usr/bin/env bash
# Builds the Debian and RPM packages from the [package.metadata.deb] and
# [package.metadata.generate-rpm] sections of Cargo.toml, then checks what is inside
# (dpkg-deb -c / rpm -qlp) against the list of files the units and docs need.
#
# Usage: packaging/build.sh [--install-tools] [--profile dev|release]
#   --install-tools  cargo install --locked the missing packagers (measured here:
#                    cargo-deb about 3 min, cargo-generate-rpm 6-13 min on 2 cores)
#   --profile        which build to package (default release, what you ship). tests/run.sh
#                    packages the dev build the tests already made: a release build from
#                    scratch costs about 10 CPU-minutes, and the packaging is the same.
# Exit: 0 built and checked; 1 a check failed; 2 a packager is missing (skipped).
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

for tool in cargo-deb cargo-generate-rpm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$install_tools" = yes ]; then
      log "installing $tool (cargo install --locked)"
      start=$(date +%s)
      cargo install --locked "$tool" >&2
      log "$tool installed in $(( $(date +%s) - start )) s"
    else
      log "SKIP: $tool is not installed (packaging/build.sh --install-tools installs it)"
      exit 2
    fi
  fi
done

start=$(date +%s)
cargo build --profile "$profile" --locked --bin s3-exchange >&2
log "$profile build in $(( $(date +%s) - start )) s"
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
)
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

if ! command -v rpm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing rpm (to list the package)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rpm >/dev/null 2>&1 || true
fi
if command -v rpm >/dev/null 2>&1; then
  rpm_list=$(rpm -qlp "$rpm_file" 2>/dev/null)
  for f in "${expected[@]}"; do
    f=${f/#lib\/systemd\/system/usr\/lib\/systemd\/system}
    grep -qx "/$f" <<<"$rpm_list" || { log "FAIL: $rpm_file lacks /$f"; fail=1; }
  done
  rpm -qp --configfiles "$rpm_file" 2>/dev/null | grep -qx /etc/s3-exchange/config.example.toml \
    || { log "FAIL: the example configuration is not %config in the RPM"; fail=1; }
  rpm -qp --scripts "$rpm_file" 2>/dev/null | grep -q 'systemctl daemon-reload' \
    || { log "FAIL: the RPM scriptlets do not reload systemd"; fail=1; }
else
  log "rpm is not installed: the RPM was built but its contents are not listed"
fi

[ "$fail" = 0 ] || exit 1
log "ok: $(du -h "$deb" | cut -f1) $deb, $(du -h "$rpm_file" | cut -f1) $rpm_file"
echo "DEB=$deb"
echo "RPM=$rpm_file"
