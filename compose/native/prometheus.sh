#!/usr/bin/env bash
# Prometheus for the native stack (Debian package `prometheus`): scrapes the workers and `cdrsync monitor` and
# evaluates compose/prometheus/rules. Config rendered into $CDRSYNC_HOME/prometheus, data in $STACK_DATA/prometheus,
# UI and API on http://localhost:$PROMETHEUS_PORT (alerts: /alerts). No Alertmanager: alerts are read there.
#   prometheus.sh install   apt-get install prometheus when prometheus or promtool is missing (needs root)
#   prometheus.sh start     render and check the config (promtool), start, wait until /-/ready; reload if running
#   prometheus.sh stop      SIGTERM, wait
#   prometheus.sh status    one line; exit 1 when down
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export PROMETHEUS_HOME="$CDRSYNC_HOME/prometheus"
PROM_CONFIG="$PROMETHEUS_HOME/prometheus.yml"
PROM_DATA="$STACK_DATA/prometheus"
PROM_URL="http://localhost:$PROMETHEUS_PORT"

cmd_install() {
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || die "prometheus/promtool not found; install the Debian package 'prometheus' (needs root)"
  log "installing Prometheus from Debian packages"
  # No recommends: they would add node-exporter. The package's own service is not ours and is left alone.
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  disable_package_service
}

# The package enables its own service on port 9090 where systemd runs; we just installed it, and ours replaces it.
disable_package_service() {
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    log "stopping the Debian package's prometheus service (port 9090); the stack runs its own"
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
}

cmd_start() {
  cmd_install
  mkdir -p "$PROMETHEUS_HOME/targets" "$PROM_DATA"
  render_template "$REPO_ROOT/compose/prometheus/prometheus.yml" "$PROM_CONFIG"
  promtool check config "$PROM_CONFIG" >/dev/null || die "promtool rejects $PROM_CONFIG (or its rules)"
  if is_running prometheus; then
    log "prometheus already running (pid $(pid_of prometheus)); reloading its config"
    curl -fsS -X POST "$PROM_URL/-/reload" >/dev/null || die "prometheus did not reload $PROM_CONFIG"
    return 0
  fi
  if port_open "$PROMETHEUS_PORT"; then
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
      die "the Debian package's own prometheus service holds port $PROMETHEUS_PORT: 'systemctl disable --now prometheus' or set PROMETHEUS_PORT"
    fi
    die "port $PROMETHEUS_PORT is already taken by another process (set PROMETHEUS_PORT)"
  fi
  start_bg prometheus prometheus --config.file="$PROM_CONFIG" --storage.tsdb.path="$PROM_DATA" \
    --storage.tsdb.retention.time="${PROMETHEUS_RETENTION:-15d}" \
    --web.listen-address="${PROMETHEUS_BIND_HOST:-127.0.0.1}:$PROMETHEUS_PORT" --web.enable-lifecycle
  wait_until prometheus 60 http_ok "$PROM_URL/-/ready"
}

cmd_status() {
  if is_running prometheus && http_ok "$PROM_URL/-/ready"; then
    echo "prometheus: up (pid $(pid_of prometheus), $PROM_URL, alerts $PROM_URL/alerts)"
  else
    echo "prometheus: down ($PROM_URL)"; return 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) stop_bg prometheus 30 ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
