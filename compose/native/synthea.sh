#!/usr/bin/env bash
# Synthea (synthetic patients) for the benchmark: not a service, only jars. compose/synthea/pom.xml is resolved
# from Maven Central into $STACK_LIB/synthea (once; again when the pom changes), as kafka.sh resolves the broker.
#   synthea.sh install   resolve the jars
#   synthea.sh path      print the jar directory (for java -cp "<dir>/*")
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SYNTHEA_POM="$REPO_ROOT/compose/synthea/pom.xml"
SYNTHEA_LIB="$STACK_LIB/synthea"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

cmd_install() {
  command -v "$JAVA" >/dev/null || die "java not found (Java 17 is needed)"
  command -v mvn >/dev/null || die "mvn not found (Maven 3.8+ is needed)"
  maven_copy "$SYNTHEA_POM" "$SYNTHEA_LIB"
  ls "$SYNTHEA_LIB"/synthea-*.jar >/dev/null 2>&1 || die "synthea jar missing from $SYNTHEA_LIB"
}

case "${1:-}" in
  install) cmd_install ;;
  path) echo "$SYNTHEA_LIB" ;;
  *) echo "usage: $0 {install|path}" >&2; exit 2 ;;
esac
