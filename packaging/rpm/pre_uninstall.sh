# s3-exchange %preun: on erase ($1 = 0) stop the system instances.
if [ -d /run/systemd/system ] && [ "$1" -eq 0 ]; then
  systemctl stop 's3-exchange@*.service' >/dev/null 2>&1 || :
fi
