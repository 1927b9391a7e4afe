#!/bin/sh
# Start, stop or restart one test containerd. integration/containerd.py copies this file next to
# the test containerd's config with the five settings below filled in.
#
# `restart` is what node-agent runs as `--reload-command`. While the file $BREAK_FLAG exists,
# `restart` only stops containerd, deletes the flag and exits with the code written in it: one
# failed restart that leaves containerd dead, then working restarts again (a rollback test).
set -eu

CONFIG=@CONFIG@
PIDFILE=@PIDFILE@
LOG=@LOG@
SOCKET=@SOCKET@
BREAK_FLAG=@BREAK_FLAG@

# Loop bounds in tenths of a second.
KILL_AFTER=100
GIVE_UP_AFTER=200

pid_alive() {
    # A pid that is reaped late shows as a zombie, which `kill -0` would call alive.
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

running_pid() {
    # Prints the pid of *our* containerd: alive and started with our config (pids get reused).
    [ -r "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    pid_alive "$pid" || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$CONFIG" || return 1
    echo "$pid"
}

do_stop() {
    pid=$(running_pid) || { rm -f "$PIDFILE"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    tenths=0
    while pid_alive "$pid"; do
        tenths=$((tenths + 1))
        [ "$tenths" -eq "$KILL_AFTER" ] && kill -KILL "$pid" 2>/dev/null
        [ "$tenths" -ge "$GIVE_UP_AFTER" ] && { echo "containerd $pid does not exit" >&2; return 1; }
        sleep 0.1
    done
    rm -f "$PIDFILE" "$SOCKET"
}

do_start() {
    running_pid >/dev/null && return 0
    rm -f "$SOCKET"
    # setsid: containerd outlives this script and is not in the caller's process group, so a
    # caller that kills the group on a timeout does not take containerd with it. All three std
    # fds are redirected: a caller capturing our output must not wait for containerd to exit.
    # env -i: no proxy or other variables from the test run leak into containerd.
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        setsid containerd --config "$CONFIG" </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    # Return once containerd serves its socket, as systemd's Type=notify would; whether CRI is
    # healthy is the caller's check.
    tenths=0
    until [ -S "$SOCKET" ]; do
        pid_alive "$pid" || { echo "containerd exited during start, see $LOG" >&2; return 1; }
        tenths=$((tenths + 1))
        [ "$tenths" -ge "$GIVE_UP_AFTER" ] && { echo "no socket $SOCKET, see $LOG" >&2; return 1; }
        sleep 0.1
    done
}

do_restart() {
    if [ -e "$BREAK_FLAG" ]; then
        code=$(cat "$BREAK_FLAG")
        rm -f "$BREAK_FLAG"
        do_stop
        echo "restart broken on purpose by the test: containerd left stopped" >&2
        exit "${code:-0}"
    fi
    do_stop
    do_start
}

case "${1:-}" in
start) do_start ;;
stop) do_stop ;;
restart) do_restart ;;
status) running_pid ;;
*)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac
