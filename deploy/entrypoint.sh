#!/usr/bin/env bash
# Container entrypoint: one image, one role per container, chosen by the first argument or BATON_ROLE.
#
#   serve   [FLAGS]                  baton serve: Ray, router and workers in one container
#   router  [FLAGS]                  baton router
#   prefill [FLAGS] | decode [FLAGS] baton worker --role prefill|decode
#   ray-head   [RAY-FLAGS] [CMD...]  a Ray head node; with CMD (e.g. `baton up`), run it beside Ray
#   ray-worker [RAY-FLAGS] [CMD...]  a Ray node joining BATON_RAY_ADDRESS (or RAY_ADDRESS); then CMD
#   any other command                run as is (e.g. `baton status`, `bash`)
#
# FLAGS are baton flags (they override BATON_* variables). RAY-FLAGS are extra `ray start` options.
# Under KubeRay (annotation ray.io/overwrite-container-cmd: "true") the Ray roles run the operator's
# generated `ray start` from KUBERAY_GEN_RAY_START_CMD instead of building their own.
#
# With a CMD, the container lives while both Ray and CMD live: when either exits, the other is
# stopped (CMD first, so it can drain) and the container exits with the status of the first to end.
set -euo pipefail

readonly ROLES=" serve router prefill decode ray-head ray-worker "
# How long a CMD waits for the local Ray node to answer before giving up.
readonly RAY_READY_TIMEOUT_S="${RAY_READY_TIMEOUT_S:-300}"

log() { echo "baton-entrypoint: $*" >&2; }
die() {
  log "error: $*"
  exit 64
}

is_true() {
  case "${1,,}" in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

# The address Ray advertises: BATON_HOST unless it is a wildcard, then this container's first address.
node_ip() {
  local host="${BATON_HOST:-127.0.0.1}"
  if [[ "$host" == "0.0.0.0" || "$host" == "::" ]]; then
    host="$(hostname -i | awk '{print $1}')"
  fi
  echo "$host"
}

# Replaces the current process with `ray start ... --block`: KubeRay's generated command, or our own.
start_ray() {
  local kind="$1"
  shift
  if [[ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]]; then
    local cmd="$KUBERAY_GEN_RAY_START_CMD"
    [[ "$cmd" == *"--block"* ]] || cmd="$cmd --block"
    exec bash -c "$cmd $*"
  fi
  local ip
  ip="$(node_ip)"
  local -a args=(--node-ip-address="$ip" --disable-usage-stats --block)
  if [[ "$kind" == head ]]; then
    args+=(--head --port=6379)
    if is_true "${BATON_DASHBOARD:-off}"; then
      args+=(--include-dashboard=true --dashboard-host="$ip")
    else
      args+=(--include-dashboard=false)
    fi
  else
    local address="${BATON_RAY_ADDRESS:-${RAY_ADDRESS:-}}"
    [[ -n "$address" ]] || die "ray-worker needs BATON_RAY_ADDRESS (the head's host:port)"
    args+=(--address="$address")
  fi
  exec ray start "${args[@]}" "$@"
}

# Waits until the Ray node started by `start_ray` (pid $1, a node of kind $2) answers health checks.
wait_for_ray() {
  local ray_pid="$1" kind="$2"
  local -a address=()
  if [[ "$kind" == head ]]; then
    address=(--address="$(node_ip):6379")
  elif [[ -n "${BATON_RAY_ADDRESS:-${RAY_ADDRESS:-}}" ]]; then
    address=(--address="${BATON_RAY_ADDRESS:-${RAY_ADDRESS:-}}")
  fi
  local deadline=$((SECONDS + RAY_READY_TIMEOUT_S))
  until ray health-check "${address[@]}" >/dev/null 2>&1; do
    if ! kill -0 "$ray_pid" 2>/dev/null; then
      log "ray start exited before the node became healthy"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "Ray did not become healthy within ${RAY_READY_TIMEOUT_S}s"
      return 1
    fi
    sleep 1
  done
}

# ray-head / ray-worker: leading dash arguments go to `ray start`, the rest (after an optional --)
# is the command to run beside the Ray node.
run_ray_node() {
  local kind="$1"
  shift
  local -a ray_flags=()
  while [[ $# -gt 0 && "$1" == -* && "$1" != "--" ]]; do
    ray_flags+=("$1")
    shift
  done
  [[ "${1:-}" != "--" ]] || shift
  ulimit -n 65536 2>/dev/null || log "could not raise the open-file limit (Ray may run out of descriptors)"

  if [[ $# -eq 0 ]]; then
    start_ray "$kind" "${ray_flags[@]}"
  fi

  # Job control: each background job gets its own process group, so stopping one stops its children.
  set -m
  start_ray "$kind" "${ray_flags[@]}" &
  local ray_pid=$!
  local cmd_pid=""
  # On SIGTERM (pod deletion): stop CMD first so it can drain, then the Ray node.
  trap 'stop_all "$cmd_pid" "$ray_pid"; exit 143' TERM INT
  if ! wait_for_ray "$ray_pid" "$kind"; then
    stop_all "" "$ray_pid"
    exit 1
  fi
  "$@" &
  cmd_pid=$!
  local status=0
  wait -n "$ray_pid" "$cmd_pid" || status=$?
  if kill -0 "$cmd_pid" 2>/dev/null; then
    log "the Ray node exited (status $status); stopping: $*"
  else
    log "'$*' exited (status $status); stopping the Ray node"
  fi
  stop_all "$cmd_pid" "$ray_pid"
  exit "$status"
}

# Stops CMD (its whole process group) and waits for it, then the Ray node the same way.
stop_all() {
  local cmd_pid="$1" ray_pid="$2"
  if [[ -n "$cmd_pid" ]] && kill -0 "$cmd_pid" 2>/dev/null; then
    kill -TERM -- "-$cmd_pid" 2>/dev/null || true
    wait "$cmd_pid" 2>/dev/null || true
  fi
  if kill -0 "$ray_pid" 2>/dev/null; then
    ray stop >/dev/null 2>&1 || true
    kill -TERM -- "-$ray_pid" 2>/dev/null || true
    wait "$ray_pid" 2>/dev/null || true
  fi
}

main() {
  local role="${BATON_ROLE:-serve}"
  if [[ $# -gt 0 && "$ROLES" == *" $1 "* ]]; then
    role="$1"
    shift
  elif [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
  fi
  [[ "$ROLES" == *" $role "* ]] || die "unknown role '$role' (expected one of:$ROLES)"
  export BATON_ROLE="$role"

  case "$role" in
    serve) exec baton serve "$@" ;;
    router) exec baton router "$@" ;;
    prefill | decode) exec baton worker --role "$role" "$@" ;;
    ray-head) run_ray_node head "$@" ;;
    ray-worker) run_ray_node worker "$@" ;;
  esac
}

main "$@"
