#!/bin/sh
# Installs s3-exchange for the current user, without root: the binary in
# ~/.local/bin, the systemd user unit in ~/.config/systemd/user, and a starter
# configuration (never overwriting an existing one) with the folders it names.
#
# Usage: packaging/install-user.sh [--binary PATH] [--unit PATH] [--bucket NAME] [--region REGION]
#   --binary  the s3-exchange binary (default: target/release/s3-exchange beside this
#             script's tree, else the one on PATH)
#   --unit    the user unit (default: ../systemd/s3-exchange.service beside this script)
#   --bucket, --region  written into a new configuration
set -eu

here=$(cd "$(dirname "$0")" && pwd)
binary=""
unit="$here/../systemd/s3-exchange.service"
bucket=""
region=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --unit) unit=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    --region) region=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-user.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$binary" ]; then
  if [ -x "$here/../target/release/s3-exchange" ]; then
    binary="$here/../target/release/s3-exchange"
  elif command -v s3-exchange >/dev/null 2>&1; then
    binary=$(command -v s3-exchange)
  else
    echo "install-user.sh: no binary: run 'cargo build --release' first or pass --binary PATH" >&2
    exit 1
  fi
fi
[ -f "$unit" ] || { echo "install-user.sh: no unit file at $unit (pass --unit PATH)" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then
  echo "install-user.sh: run this as the user who trades files, not as root (for a system-wide install use the .deb/.rpm and s3-exchange@USER.service)" >&2
  exit 1
fi

bin_dir="$HOME/.local/bin"
unit_dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
mkdir -p "$bin_dir" "$unit_dir"
install -m 755 "$binary" "$bin_dir/s3-exchange.new"
mv -f "$bin_dir/s3-exchange.new" "$bin_dir/s3-exchange"
echo "installed $bin_dir/s3-exchange"

# The packaged unit runs /usr/bin/s3-exchange; this one runs the copy in ~/.local/bin.
sed 's|^ExecStart=/usr/bin/s3-exchange|ExecStart=%h/.local/bin/s3-exchange|' "$unit" > "$unit_dir/s3-exchange.service.new"
mv -f "$unit_dir/s3-exchange.service.new" "$unit_dir/s3-exchange.service"
echo "installed $unit_dir/s3-exchange.service"

set -- init
[ -n "$bucket" ] && set -- "$@" --bucket "$bucket"
[ -n "$region" ] && set -- "$@" --region "$region"
"$bin_dir/s3-exchange" "$@" | grep -v '^next:\|^  ' || true

if systemctl --user daemon-reload >/dev/null 2>&1; then
  reloaded=yes
else
  reloaded=no
fi

config="${S3_EXCHANGE_CONFIG:-${XDG_CONFIG_HOME:-$HOME/.config}/s3-exchange/config.toml}"
echo
echo "next steps:"
[ -z "$bucket" ] && echo "  \$EDITOR $config          # set s3.bucket and s3.region"
echo "  $bin_dir/s3-exchange check --write   # credentials, list and upload rights"
[ "$reloaded" = no ] && echo "  systemctl --user daemon-reload"
echo "  systemctl --user enable --now s3-exchange"
echo "  loginctl enable-linger \$USER          # keep it running while you are logged out (may need an administrator)"
echo "  journalctl --user -u s3-exchange -f"
