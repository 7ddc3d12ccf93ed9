# s3-exchange %post: make systemd see the units; on upgrade ($1 > 1) restart the
# running instances so they run the new binary.
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
  if [ "$1" -gt 1 ]; then
    systemctl try-restart 's3-exchange@*.service' >/dev/null 2>&1 || :
  fi
fi
