#!/usr/bin/env bash
# A cdrsync stream worker in the background (for the demo): start | stop | status.
# Its RocksDB tables live in $CDRSYNC_HOME/worker; its log in $STACK_LOGS/worker.log.
# Like a service manager (systemd Restart=on-failure, a Kubernetes pod), it starts the worker again when
# it exits with an error: the worker exits on purpose rather than acknowledge what it could not pass on.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CDRSYNC_BIN="${CDRSYNC_BIN:-$REPO_ROOT/.venv/bin/cdrsync}"
export CDRSYNC_STATE_DIR="${CDRSYNC_STATE_DIR:-$CDRSYNC_HOME/worker}"
export CDRSYNC_WEB_PORT="${CDRSYNC_WEB_PORT:-6066}"
# A static group member: restarted, it takes its partitions back at once instead of after the 30 s session.
export CDRSYNC_GROUP_INSTANCE_ID="${CDRSYNC_GROUP_INSTANCE_ID:-${CDRSYNC_APP_ID:-cdrsync}@$(hostname):$CDRSYNC_WEB_PORT}"

case "${1:-}" in
  start)
    # shellcheck disable=SC2016
    start_bg worker bash -c 'trap "exit 0" TERM
      while true; do
        "$0" worker && exit 0
        echo "----- worker exited with $?; restarting in 2 s -----"; sleep 2
      done' "$CDRSYNC_BIN"
    wait_until worker 120 http_ok "http://localhost:$CDRSYNC_WEB_PORT/metrics"
    # Then until it is ready (/readyz: partitions assigned, tables recovered, every target reachable), so that
    # what is written next is handled by a running pipeline, not left waiting on its start. Not ready in time
    # (a target down, say) is no failure: the worker runs and catches up once it is ready.
    ready_url="http://localhost:$CDRSYNC_WEB_PORT/readyz"
    if poll_until worker "${CDRSYNC_READY_WAIT_SECONDS:-120}" http_ok "$ready_url"; then
      log "worker is ready (partitions assigned, tables recovered, targets reachable)"
    else
      log "WARNING: worker not ready after ${CDRSYNC_READY_WAIT_SECONDS:-120} s; it runs on and catches up once" \
        "ready: $(curl -sS --max-time 5 "$ready_url" 2>&1)"
    fi
    ;;
  stop) stop_bg worker 60 ;;
  status)
    if is_running worker && http_ok "http://localhost:$CDRSYNC_WEB_PORT/metrics"; then
      echo "worker: up (pid $(pid_of worker), metrics http://localhost:$CDRSYNC_WEB_PORT/metrics)"
    else
      echo "worker: down"; exit 1
    fi
    ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
