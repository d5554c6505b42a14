# RPM %pre for trellis: the system account, before the files land.
getent group trellis >/dev/null || groupadd --system trellis
getent passwd trellis >/dev/null || useradd --system --gid trellis \
    --home-dir /var/lib/trellis --no-create-home --shell /sbin/nologin \
    --comment "Trellis service mesh" trellis
exit 0
