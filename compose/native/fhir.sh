#!/usr/bin/env bash
# Local FHIR R4 server for the native stack: HAPI FHIR JPA 8.8.0 (Maven Central artifacts, assembled by the small
# Maven project in compose/fhir) in embedded Jetty, H2 file database in $STACK_DATA/fhir, base $FHIR_BASE_URL.
#   fhir.sh install   build compose/fhir into $STACK_LIB/fhir (once; again when its pom.xml or sources change)
#   fhir.sh start     install if needed, start detached, wait until GET $FHIR_BASE_URL/metadata answers 200
#   fhir.sh stop      clean shutdown (SIGTERM: Jetty, then Hibernate and H2), SIGKILL after 60 s
#   fhir.sh status    one line; exit 0 only when /metadata answers 200
# Settings live in compose/fhir/fhir-server.properties; env.sh's FHIR_PORT and the path of FHIR_BASE_URL override
# the port and base path there. Also: FHIR_JAVA_OPTS (heap, default -Xms256m -Xmx2g), FHIR_BIND_HOST (default
# 127.0.0.1), FHIR_START_TIMEOUT (seconds, default 300: a cold first start creates the schema). A second server
# of the same build (the fault suite's hospital FHIR endpoint): FHIR_NAME (service name for its pid and log,
# default fhir) with FHIR_PORT, FHIR_BASE_URL and FHIR_DATA (its database directory, default $STACK_DATA/$FHIR_NAME).
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FHIR_SRC="$REPO_ROOT/compose/fhir"
FHIR_LIB="$STACK_LIB/fhir"
FHIR_JAR="$FHIR_LIB/cdrsync-fhir-server.jar"
FHIR_NAME="${FHIR_NAME:-fhir}"
FHIR_DATA="${FHIR_DATA:-$STACK_DATA/$FHIR_NAME}"
FHIR_STAMP="$FHIR_LIB/.build-stamp"
FHIR_START_TIMEOUT="${FHIR_START_TIMEOUT:-300}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# Path part of FHIR_BASE_URL (http://localhost:8080/fhir -> /fhir), so the servlet is mounted where clients look.
fhir_base_path() {
  local rest="${FHIR_BASE_URL#*://}"
  case "$rest" in */*) echo "/${rest#*/}" ;; *) echo "/" ;; esac
}

# shellcheck disable=SC2206
FHIR_JVM=("$JAVA" ${FHIR_JAVA_OPTS:--Xms256m -Xmx2g} -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
  -Dfile.encoding=UTF-8 "-Dfhir.config=$FHIR_SRC/fhir-server.properties" "-Dfhir.port=$FHIR_PORT"
  "-Dfhir.host=${FHIR_BIND_HOST:-127.0.0.1}" "-Dfhir.base-path=$(fhir_base_path)" "-Dfhir.data-dir=$FHIR_DATA"
  -jar "$FHIR_JAR")

# Fingerprint of everything that goes into the build (not fhir-server.properties: it is read at start).
fhir_source_hash() {
  (cd "$FHIR_SRC" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

metadata_ok() { http_ok "$FHIR_BASE_URL/metadata" 2>/dev/null; }

cmd_install() {
  command -v "$JAVA" >/dev/null || die "java not found (Java 17 is needed)"
  command -v mvn >/dev/null || die "mvn not found (Maven 3.8+ is needed)"
  local want
  want="$(fhir_source_hash)"
  if [ -f "$FHIR_JAR" ] && [ -f "$FHIR_STAMP" ] && [ "$(cat "$FHIR_STAMP")" = "$want" ]; then return 0; fi
  if is_running fhir || is_running "$FHIR_NAME"; then  # never swap the jars under a running server
    log "compose/fhir changed but a server of it is running: rebuild skipped; fhir.sh stop && fhir.sh start rebuilds"
    return 0
  fi
  log "building the FHIR server (compose/fhir, HAPI FHIR JPA from Maven Central) into $FHIR_LIB"
  rm -rf "$FHIR_LIB"; mkdir -p "$FHIR_LIB"
  if ! mvn -B -q -f "$FHIR_SRC/pom.xml" package "-Dfhir.build.directory=$FHIR_LIB" >"$STACK_LOGS/fhir-build.log" 2>&1; then
    tail -n 40 "$STACK_LOGS/fhir-build.log" >&2
    die "maven build of compose/fhir failed (full log: $STACK_LOGS/fhir-build.log)"
  fi
  [ -f "$FHIR_JAR" ] || die "build finished but $FHIR_JAR is missing"
  echo "$want" > "$FHIR_STAMP"
  log "FHIR server built ($(find "$FHIR_LIB/lib" -name '*.jar' | wc -l) jars)"
}

cmd_start() {
  is_running "$FHIR_NAME" || cmd_install
  if is_running "$FHIR_NAME"; then
    log "$FHIR_NAME already running (pid $(pid_of "$FHIR_NAME"))"
  else
    port_open "$FHIR_PORT" && die "port $FHIR_PORT is already taken by another process (set FHIR_PORT)"
    mkdir -p "$FHIR_DATA"
    start_bg "$FHIR_NAME" "${FHIR_JVM[@]}"
  fi
  wait_until "$FHIR_NAME" "$FHIR_START_TIMEOUT" metadata_ok
}

cmd_stop() { stop_bg "$FHIR_NAME" 60; }

cmd_status() {
  if metadata_ok; then
    if is_running "$FHIR_NAME"; then echo "$FHIR_NAME: up (pid $(pid_of "$FHIR_NAME"), $FHIR_BASE_URL)"
    else echo "$FHIR_NAME: up ($FHIR_BASE_URL answers, but not started by this stack: no pid in $STACK_RUN)"; fi
  elif is_running "$FHIR_NAME"; then
    echo "$FHIR_NAME: down (pid $(pid_of "$FHIR_NAME") running but $FHIR_BASE_URL/metadata does not answer 200 yet)"; return 1
  else
    echo "$FHIR_NAME: down ($FHIR_BASE_URL)"; return 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
