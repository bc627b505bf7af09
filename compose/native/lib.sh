# Helpers shared by the service scripts: pid files, waiting for health, clean stops.
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_of() { local f="$STACK_RUN/$1.pid"; [ -f "$f" ] && cat "$f" || true; }
is_running() { local p; p="$(pid_of "$1")"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# start_bg NAME CMD...: run CMD detached, its output in logs/NAME.log, its pid in run/NAME.pid.
start_bg() {
  local name="$1"; shift
  if is_running "$name"; then log "$name already running (pid $(pid_of "$name"))"; return 0; fi
  log "starting $name (log: $STACK_LOGS/$name.log)"
  setsid nohup "$@" >>"$STACK_LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$STACK_RUN/$name.pid"
}

# poll_until NAME SECONDS CMD...: poll CMD once a second until it succeeds (0) or SECONDS pass (1); fail with
# the log tail if NAME's process exits meanwhile.
poll_until() {
  local name="$1" limit="$2"; shift 2
  local i
  for ((i = 0; i < limit; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -f "$STACK_RUN/$name.pid" ] && ! is_running "$name"; then
      tail -n 40 "$STACK_LOGS/$name.log" >&2 || true; die "$name exited during start-up"
    fi
    sleep 1
  done
  return 1
}

# wait_until NAME SECONDS CMD...: poll_until, and fail with the log tail if CMD never succeeds.
wait_until() {
  local name="$1" limit="$2"
  if poll_until "$@"; then log "$name is healthy"; return 0; fi
  tail -n 40 "$STACK_LOGS/$name.log" >&2 || true
  die "$name not healthy after ${limit}s"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 5 "$1"; }

# stop_bg NAME [SECONDS]: TERM the process group, wait, then KILL; removes the pid file.
stop_bg() {
  local name="$1" limit="${2:-30}" p i
  p="$(pid_of "$name")"
  if [ -z "$p" ] || ! kill -0 "$p" 2>/dev/null; then rm -f "$STACK_RUN/$name.pid"; return 0; fi
  log "stopping $name (pid $p)"
  kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
  for ((i = 0; i < limit; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 1; done
  kill -0 "$p" 2>/dev/null && { log "$name did not stop in ${limit}s; killing"; kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" || true; }
  rm -f "$STACK_RUN/$name.pid"
}

# maven_copy POM DEST: resolve a pinned pom's runtime dependencies into DEST (once).
maven_copy() {
  local pom="$1" dest="$2"
  if [ -f "$dest/.complete" ] && [ "$dest/.complete" -nt "$pom" ]; then return 0; fi
  log "resolving $(basename "$(dirname "$pom")") jars from Maven Central into $dest"
  rm -rf "$dest"; mkdir -p "$dest"
  mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dest" \
    || die "maven could not resolve $pom"
  touch "$dest/.complete"
}

# render_template SRC DEST: copy SRC to DEST replacing ${NAME} with the environment variable NAME
# (fails on an unset one). Other forms, e.g. Connect's ${env:NAME}, are left alone.
render_template() {
  perl -pe 's/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/defined $ENV{$1} ? $ENV{$1} : die "render_template: $1 is not set\n"/ge' \
    "$1" > "$2.tmp" || { rm -f "$2.tmp"; die "could not render $1"; }
  mv "$2.tmp" "$2"
}
