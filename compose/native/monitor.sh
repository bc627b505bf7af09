#!/usr/bin/env bash
# `cdrsync monitor` in the background: consumer lag, Debezium connector states, replication slots and target
# probes on http://localhost:$CDRSYNC_MONITOR_PORT/metrics for Prometheus. start | stop | status.
# Its log is $STACK_LOGS/monitor.log; the volumes it reports default to the stack's data directories.
# Like a service manager (systemd Restart=on-failure, a Kubernetes pod), it starts the monitor again when it
# exits with an error: librdkafka can abort the process when Kafka drops a connection in the middle of an
# admin request (confluentinc/librdkafka#4605).
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CDRSYNC_BIN="${CDRSYNC_BIN:-$REPO_ROOT/.venv/bin/cdrsync}"
export CDRSYNC_MONITOR_VOLUMES="${CDRSYNC_MONITOR_VOLUMES:-stack-data=$STACK_DATA}"

case "${1:-}" in
  start)
    # shellcheck disable=SC2016
    start_bg monitor bash -c 'trap "exit 0" TERM
      while true; do
        "$0" monitor && exit 0
        echo "----- monitor exited with $?; restarting in 2 s -----"; sleep 2
      done' "$CDRSYNC_BIN"
    wait_until monitor 60 http_ok "http://localhost:$CDRSYNC_MONITOR_PORT/metrics"
    ;;
  stop) stop_bg monitor 30 ;;
  status)
    if is_running monitor && http_ok "http://localhost:$CDRSYNC_MONITOR_PORT/metrics"; then
      echo "monitor: up (pid $(pid_of monitor), metrics http://localhost:$CDRSYNC_MONITOR_PORT/metrics)"
    else
      echo "monitor: down"; exit 1
    fi
    ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
