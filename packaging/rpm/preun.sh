# RPM %preun for trellis: $1 is 0 on erase (stop the units), 1 on upgrade
# (they keep running until %postun restarts them on the new binary).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop trellis-server.service trellis-gateway.service \
        trellis-agent.service >/dev/null 2>&1 || :
fi
exit 0
