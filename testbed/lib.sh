# shellcheck shell=bash
# The constants below are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared by testbed/up, testbed/down and testbed/scenario: where the state
# lives, which binary runs, and how processes are started in and stopped
# from the testbed's hosts. Sourced, not run.

TB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly TB_ROOT
readonly TB_NET="$TB_ROOT/testbed/net"
# Every file the testbed makes: CA, configs, tokens, data, logs, pid files.
TB=${TESTBED_DIR:-/tmp/trellis-testbed}
readonly TB
TRELLIS_BIN=${TRELLIS_BIN:-$TB_ROOT/target/debug/trellis}

readonly TD=trellis.local
readonly NS=shop
readonly SERVER_PORT=7400
readonly GW_PORT=15443
# A gateway's port for its own zone's workloads (zone_listen): peers use
# GW_PORT, whose TCP side then refuses workload names (Export holds).
readonly ZONE_GW_PORT=15444
# The relay in front of west's gateway (see testbed/up): what other zones dial.
readonly GW_RELAY_PORT=25443
readonly INBOUND_PORT=15006
readonly AGENT_ADMIN=127.0.0.1:15020
readonly AGENT_DNS=127.0.0.1:8600
readonly APP_PORT=8080

# The address of a host, from testbed/net's one list of hosts.
host_ip() {
  "$TB_NET" hosts | awk -v h="$1" '$1 == h { print $3 }'
}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { echo "testbed: $*" >&2; exit 1; }

now_ms() { date +%s%3N; }

# Builds the binary when it is missing and TRELLIS_BIN was not given.
ensure_bin() {
  if [[ ! -x $TRELLIS_BIN ]]; then
    if [[ $TRELLIS_BIN == "$TB_ROOT/target/debug/trellis" ]]; then
      log "building $TRELLIS_BIN"
      (cd "$TB_ROOT" && nice -n 10 cargo build --bin trellis) || die "build failed"
    else
      die "TRELLIS_BIN=$TRELLIS_BIN is not an executable"
    fi
  fi
  TRELLIS_BIN=$(readlink -f "$TRELLIS_BIN")
}

# The mesh is up when `up` finished; `up` writes this file last.
testbed_is_up() { [[ -f $TB/up.done ]]; }

# Starts `trellis ARGS...` in host NS as the process NAME: log in
# $TB/logs/NAME.log, pid in $TB/pids/NAME. setsid detaches it from the
# caller's terminal, so a Ctrl-C aimed at a scenario reaches the scenario's
# trap (which stops things in order) rather than every process at once.
# Neither setsid (not a group leader in the background) nor `ip netns exec`
# forks, so $! is the trellis process itself.
spawn() {
  local name=$1 ns=$2
  shift 2
  setsid ip netns exec "$ns" "$TRELLIS_BIN" "$@" \
    >"$TB/logs/$name.log" 2>&1 </dev/null &
  echo "$! $ns" >"$TB/pids/$name"
}

pid_of() { [[ -f $TB/pids/$1 ]] && read -r pid _ <"$TB/pids/$1" && echo "$pid"; }

# Whether PID is still the trellis process we started (and not a reused pid).
# A rebuilt binary shows as "PATH (deleted)" for processes started before.
is_ours() {
  local exe
  [[ -n $1 && -e /proc/$1 ]] || return 1
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [[ ${exe% (deleted)} == "$TRELLIS_BIN" ]]
}

alive() { is_ours "$(pid_of "$1")"; }

# SIGTERM to every named process, then SIGKILL to those still running
# after GRACE seconds. Pid files go once their process is gone.
stop_procs() {
  local grace=$1 name pid deadline
  shift
  for name in "$@"; do
    pid=$(pid_of "$name") || continue
    if is_ours "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  deadline=$((SECONDS + grace))
  for name in "$@"; do
    pid=$(pid_of "$name") || continue
    while is_ours "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if is_ours "$pid"; then
      log "$name (pid $pid) did not stop within ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$TB/pids/$name"
  done
}

# Runs an operator verb from the east server's host with the operator's
# credentials. SERVER defaults to east's server.
op() {
  local ns=tb-east-server
  if [[ ${1:-} == --in ]]; then ns=$2; shift 2; fi
  ip netns exec "$ns" "$TRELLIS_BIN" "$@" --credentials "$TB/operator"
}

# Polls CMD... every 0.25 s until it succeeds or SECONDS_ pass.
wait_for() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(now_ms) + secs * 1000))
  until "$@" >/dev/null 2>&1; do
    if (($(now_ms) > deadline)); then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.25
  done
}

# An agent's metric (summed over the label sets that match the pattern).
agent_metric() {
  local ns=$1 pattern=$2
  ip netns exec "$ns" curl -fsS --max-time 2 "http://$AGENT_ADMIN/metrics" |
    awk -v p="$pattern" 'index($0, p) == 1 { s += $NF; n++ } END { if (n) printf "%d\n", s; else print 0 }'
}
