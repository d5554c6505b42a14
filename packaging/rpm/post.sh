# RPM %post for trellis: the state directory (owner only) and the
# configuration directory (read by the trellis group). A fresh install
# enables and starts nothing: there is no configuration yet.
mkdir -p /var/lib/trellis
chown trellis:trellis /var/lib/trellis
chmod 0700 /var/lib/trellis
chown root:trellis /etc/trellis
chmod 0750 /etc/trellis
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
exit 0
