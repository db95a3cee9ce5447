# Process plumbing shared by the bench sections (sourced, not run). The section keeps its own
# PIDS=() array (every process it starts), its traps (`trap cleanup EXIT`) and its say/die.

# stop_pid PID: TERM, wait up to 10 s, then KILL.
stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# cleanup: stops every process in PIDS, children first (/usr/bin/time and nginx's master have
# children of their own), by PID.
cleanup() {
  local pid child
  for pid in "${PIDS[@]}"; do
    for child in $(pgrep -P "$pid" 2>/dev/null || true); do stop_pid "$child"; done
    stop_pid "$pid"
  done
  wait 2>/dev/null || true
}

# ensure_tools LOG TOOL=PACKAGE...: installs the Debian packages of the tools that are missing
# (the machines run as root), or dies saying what to run. Adds /usr/sbin to PATH (nginx).
ensure_tools() {
  local log="$1" pair tool missing=()
  shift
  for pair in "$@"; do
    tool="${pair%%=*}"
    command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null \
      || missing+=("${pair#*=}")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing ${missing[*]} (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } > "$log" 2>&1 \
      || die "could not install ${missing[*]}: run apt-get update && apt-get install -y ${missing[*]} (log: $log)"
  fi
  export PATH="$PATH:/usr/sbin"
}

# port_free PORT: nothing listens on it.
port_free() { [[ -z "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]]; }

# wait_port PORT PID: until something listens, or the process died, or 15 s.
wait_port() {
  local port="$1" pid="$2" i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# rotate R A B C...: the list rotated left by R (round R's order in interleaved rounds).
rotate() { local r="$1" k; shift; local a=("$@") n=$#; for ((k = 0; k < n; k++)); do echo "${a[(k + r) % n]}"; done; }
