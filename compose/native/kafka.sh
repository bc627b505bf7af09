#!/usr/bin/env bash
# Apache Kafka for the native stack: one KRaft node (broker+controller) on localhost:$KAFKA_PORT, data in
# $STACK_DATA/kafka, jars resolved from Maven Central by compose/kafka/pom.xml into $STACK_LIB/kafka.
#   kafka.sh install   resolve the jars (once; again when pom.xml changes)
#   kafka.sh start     render server.properties, format storage once, start, wait until the broker answers metadata
#   kafka.sh stop      controlled shutdown (SIGTERM), SIGKILL after 60 s
#   kafka.sh status    one line; exit 1 when down
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_POM="$REPO_ROOT/compose/kafka/pom.xml"
KAFKA_LIB="$STACK_LIB/kafka"
KAFKA_DATA="$STACK_DATA/kafka"
KAFKA_PROPS="$STACK_RUN/kafka-server.properties"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# shellcheck disable=SC2206
KAFKA_JVM=("$JAVA" ${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  "-Dlog4j.configuration=file:$REPO_ROOT/compose/kafka/log4j.properties" -cp "$KAFKA_LIB/*")
kafka_java() { "${KAFKA_JVM[@]}" "$@"; }

# Health: send a Metadata v1 request (all topics) over the PLAINTEXT listener and look for this broker, as
# advertised, in the answer. Pure bash, so polling needs no JVM or Python client.
kafka_metadata_ok() {
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    # size=18 | api_key=3 (Metadata) | version=1 | correlation_id=7 | client_id="hlth" | topics=null (-1)
    printf "\x00\x00\x00\x12\x00\x03\x00\x01\x00\x00\x00\x07\x00\x04hlth\xff\xff\xff\xff" >&3
    dd bs=65536 count=1 status=none <&3' _ "$KAFKA_PORT" 2>/dev/null | grep -aq localhost
}

cmd_install() {
  command -v "$JAVA" >/dev/null || die "java not found (Java 17 is needed)"
  maven_copy "$KAFKA_POM" "$KAFKA_LIB"
  ls "$KAFKA_LIB"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing from $KAFKA_LIB"
}

cmd_start() {
  cmd_install
  if is_running kafka; then
    log "kafka already running (pid $(pid_of kafka))"
  else
    render_template "$REPO_ROOT/compose/kafka/server.properties" "$KAFKA_PROPS"
    if [ ! -f "$KAFKA_DATA/meta.properties" ]; then
      mkdir -p "$KAFKA_DATA"
      local cluster_id
      cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$STACK_LOGS/kafka.log" | tail -n 1)"
      [ -n "$cluster_id" ] || die "StorageTool random-uuid failed; see $STACK_LOGS/kafka.log"
      log "formatting $KAFKA_DATA (cluster id $cluster_id)"
      kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" >>"$STACK_LOGS/kafka.log" 2>&1 \
        || { tail -n 20 "$STACK_LOGS/kafka.log" >&2; die "kafka storage format failed"; }
    fi
    port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is already taken by another process (set KAFKA_PORT)"
    start_bg kafka "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_PROPS"
  fi
  wait_until kafka 120 kafka_metadata_ok
}

cmd_stop() { stop_bg kafka 60; }

cmd_status() {
  if is_running kafka && kafka_metadata_ok; then
    echo "kafka: up (pid $(pid_of kafka), $KAFKA_BOOTSTRAP)"
  elif is_running kafka; then
    echo "kafka: down (pid $(pid_of kafka) running but the broker does not answer on $KAFKA_BOOTSTRAP)"; return 1
  else
    echo "kafka: down ($KAFKA_BOOTSTRAP)"; return 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
