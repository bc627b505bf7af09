# Shared settings for the native stack. Sourced by every compose/native/*.sh script.
# Every value can be overridden from the environment; nothing secret is stored here.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export REPO_ROOT
export CDRSYNC_HOME="${CDRSYNC_HOME:-$REPO_ROOT/.stack}"   # state: data, logs, pids, jars
export STACK_LOGS="$CDRSYNC_HOME/logs" STACK_RUN="$CDRSYNC_HOME/run"
export STACK_DATA="$CDRSYNC_HOME/data" STACK_LIB="$CDRSYNC_HOME/lib"

export PG_PORT="${PG_PORT:-55432}"
export PG_SUPERUSER="${PG_SUPERUSER:-postgres}"
export PG_REPL_USER="${PG_REPL_USER:-cdrsync_cdc}"
export PG_REPL_PASSWORD="${PG_REPL_PASSWORD:-cdc-local-only}"   # demo stack only; set it in the environment elsewhere
export KAFKA_PORT="${KAFKA_PORT:-9092}" KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-localhost:$KAFKA_PORT}"
export CONNECT_PORT="${CONNECT_PORT:-8083}"
export CONNECT_URL="${CONNECT_URL:-http://localhost:$CONNECT_PORT}"
export FHIR_PORT="${FHIR_PORT:-8080}"
export FHIR_BASE_URL="${FHIR_BASE_URL:-http://localhost:$FHIR_PORT/fhir}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
export CDRSYNC_WEB_PORT="${CDRSYNC_WEB_PORT:-6066}" CDRSYNC_MONITOR_PORT="${CDRSYNC_MONITOR_PORT:-6067}"

mkdir -p "$STACK_LOGS" "$STACK_RUN" "$STACK_DATA" "$STACK_LIB"
