#!/usr/bin/env bash
# The whole native stack, in dependency order: postgres -> kafka -> connect (-> fhir, when compose/native/fhir.sh
# exists) -> prometheus (it scrapes the workers and `cdrsync monitor`, which run outside this script). Every service
# script is idempotent and waits until its service is healthy.
#   stack.sh install   resolve/install everything without starting anything (Maven jars, PostgreSQL package)
#   stack.sh up        start every service in order; stop at the first that does not become healthy
#   stack.sh down      stop every service in reverse order
#   stack.sh status    one line per service; exit 1 when any is down
# STACK_SERVICES="postgres kafka" limits the set (same order rules).
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NATIVE_DIR="$REPO_ROOT/compose/native"

services() {
  local all=(postgres kafka connect) s
  [ -f "$NATIVE_DIR/fhir.sh" ] && all+=(fhir)
  [ -f "$NATIVE_DIR/prometheus.sh" ] && all+=(prometheus)
  for s in "${all[@]}"; do
    if [ -z "${STACK_SERVICES:-}" ] || [[ " $STACK_SERVICES " == *" $s "* ]]; then echo "$s"; fi
  done
}

svc() { bash "$NATIVE_DIR/$1.sh" "$2"; }

cmd_install() {
  local s
  for s in $(services); do svc "$s" install || die "install of $s failed"; done
}

cmd_up() {
  local s t0=$SECONDS t
  for s in $(services); do
    t=$SECONDS
    if ! svc "$s" start; then
      log "stack up FAILED at $s (log: $STACK_LOGS/$s.log); services started before it are left running (stack.sh down stops them)"
      exit 1
    fi
    log "$s up in $((SECONDS - t))s"
  done
  log "stack up in $((SECONDS - t0))s"
  cmd_status
}

cmd_down() {
  local s rc=0 f
  for f in "$STACK_RUN"/fhir-*.pid; do  # a second FHIR server a test started (FHIR_NAME) and left running
    [ -e "$f" ] || continue
    s="$(basename "$f" .pid)"
    FHIR_NAME="$s" bash "$NATIVE_DIR/fhir.sh" stop || { log "stopping $s failed"; rc=1; }
  done
  for s in $(services | tac); do svc "$s" stop || { log "stopping $s failed"; rc=1; }; done
  return $rc
}

cmd_status() {
  local s rc=0
  for s in $(services); do svc "$s" status || rc=1; done
  return $rc
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|up|down|status}" >&2; exit 2 ;;
esac
