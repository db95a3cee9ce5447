#!/usr/bin/env bash
# `cluster.sh up`: start a local kube-apiserver + etcd (the Rust e2e harness, via the
# keybrake-cluster binary) in the background and write target/e2e/env.
# `cluster.sh down`: stop it. `cluster.sh status`: say whether it runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
out="$root/target/e2e"
pid_file="$out/cluster.pid"
env_file="$out/env"
log_file="$out/cluster.log"
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin="$target_dir/debug/keybrake-cluster"
mkdir -p "$out"

running() { [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

up() {
  if running; then
    echo "cluster already running (pid $(cat "$pid_file")): source target/e2e/env"
    return 0
  fi
  "${CARGO:-cargo}" build -q -p keybrake-e2e --bin keybrake-cluster
  rm -f "$env_file" "$pid_file"
  # setsid: a Ctrl-C in this terminal must not stop the plane; `down` does.
  setsid "$bin" serve --dir "$out/cluster" --env-file "$env_file" --pid-file "$pid_file" \
    </dev/null >"$log_file" 2>&1 &
  local launcher=$!
  # Ready when the env file appears; bounded wait, fails fast if the process dies.
  local deadline=$((SECONDS + 180))
  until [[ -s "$env_file" ]]; do
    if ! kill -0 "$launcher" 2>/dev/null; then
      echo "cluster failed to start; $log_file:" >&2
      tail -n 30 "$log_file" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "cluster not ready after 180 s; $log_file:" >&2
      tail -n 30 "$log_file" >&2
      down
      exit 1
    fi
    sleep 0.1
  done
  cat "$log_file"
  echo "cluster running (pid $(cat "$pid_file")). Use it with: source target/e2e/env"
}

down() {
  if ! running; then
    echo "no cluster running"
    rm -f "$pid_file" "$env_file"
    return 0
  fi
  local pid
  pid=$(cat "$pid_file")
  kill -TERM "$pid"
  # keybrake-cluster stops kube-apiserver and etcd before it exits; bounded wait for that.
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "cluster (pid $pid) did not stop in 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$pid_file" "$env_file"
  echo "cluster stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if running; then echo "running (pid $(cat "$pid_file"))"; else echo "stopped"; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
