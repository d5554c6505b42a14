# RPM %postun for trellis: on upgrade ($1 >= 1) restart the units that run;
# RPM has no purge, so /var/lib/trellis stays (and edited configuration is
# kept as .rpmsave).
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart trellis-server.service trellis-gateway.service \
            trellis-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
