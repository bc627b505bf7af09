#!/usr/bin/env bash
# Kafka Connect (distributed worker, one node) + Debezium PostgreSQL connector for the native stack.
# REST on $CONNECT_URL; jars resolved from Maven Central by compose/connect/pom.xml into $STACK_LIB/connect.
#   connect.sh install   resolve the jars (once; again when pom.xml changes) and check them for mixed Jetty
#   connect.sh start     render worker.properties, start, wait until GET /connectors answers 200
#   connect.sh stop      graceful stop (SIGTERM), SIGKILL after 60 s
#   connect.sh status    one line; exit 1 when down
# Connector configs may use ${env:NAME}: the worker resolves it from its own environment (env.sh exports
# PG_PORT, PG_REPL_USER, PG_REPL_PASSWORD, ...), so start the worker from this script.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNECT_POM="$REPO_ROOT/compose/connect/pom.xml"
CONNECT_LIB="$STACK_LIB/connect"
CONNECT_PROPS="$STACK_RUN/connect-worker.properties"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# shellcheck disable=SC2206
CONNECT_JVM=("$JAVA" ${CONNECT_HEAP_OPTS:--Xms256m -Xmx1g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20
  -Djava.awt.headless=true "-Dlog4j2.configurationFile=file:$REPO_ROOT/compose/connect/log4j2.properties"
  -cp "$CONNECT_LIB/*")

connect_ok() { http_ok "$CONNECT_URL/connectors"; }

# The known trap: Jetty 9 jars (jetty-security-9.*, jetty-servlet-9.*) next to Connect's Jetty 12 make the REST
# server die with NoClassDefFoundError .../HandlerWrapper and the JVM hang on exit. Refuse such a lib/.
check_jetty() {
  local majors
  majors="$(find "$CONNECT_LIB" -maxdepth 1 -name 'jetty-*.jar' -printf '%f\n' \
    | sed -nE 's/.*-([0-9]+)\.[0-9]+\.[0-9]+[^/]*\.jar$/\1/p' | sort -u | tr '\n' ' ')"
  case "$majors" in
    "12 ") ;;
    *) die "mixed or unexpected Jetty versions in $CONNECT_LIB (majors: ${majors:-none}); fix the exclusions in $CONNECT_POM: $(cd "$CONNECT_LIB" && ls jetty-*.jar | tr '\n' ' ')" ;;
  esac
}

cmd_install() {
  command -v "$JAVA" >/dev/null || die "java not found (Java 17 is needed)"
  maven_copy "$CONNECT_POM" "$CONNECT_LIB"
  ls "$CONNECT_LIB"/connect-runtime-*.jar "$CONNECT_LIB"/debezium-connector-postgres-*.jar >/dev/null 2>&1 \
    || die "connect-runtime or debezium-connector-postgres jar missing from $CONNECT_LIB"
  check_jetty
}

cmd_start() {
  cmd_install
  if is_running connect; then
    log "connect already running (pid $(pid_of connect))"
  else
    render_template "$REPO_ROOT/compose/connect/worker.properties" "$CONNECT_PROPS"
    port_open "$CONNECT_PORT" && die "port $CONNECT_PORT is already taken by another process (set CONNECT_PORT)"
    start_bg connect "${CONNECT_JVM[@]}" org.apache.kafka.connect.cli.ConnectDistributed "$CONNECT_PROPS"
  fi
  wait_until connect 180 connect_ok
}

cmd_stop() { stop_bg connect 60; }

cmd_status() {
  if is_running connect && connect_ok; then
    echo "connect: up (pid $(pid_of connect), $CONNECT_URL, connectors: $(curl -fsS --max-time 5 "$CONNECT_URL/connectors" 2>/dev/null))"
  elif is_running connect; then
    echo "connect: down (pid $(pid_of connect) running but $CONNECT_URL/connectors does not answer 200)"; return 1
  else
    echo "connect: down ($CONNECT_URL)"; return 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
