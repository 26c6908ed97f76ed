#!/usr/bin/env bash
# Entry point of kernel container images (Kubernetes, Docker): start the
# kernel launcher for KERNEL_LANGUAGE with the connection details the
# gateway put in the environment.  Same environment contract as Enterprise
# Gateway's bootstrap-kernel.sh, so images and pod templates written for it
# work unchanged:
#
#   KERNEL_LANGUAGE        required; only "python" is supported here
#   KERNEL_ID              required
#   RESPONSE_ADDRESS       required (fallback EG_RESPONSE_ADDRESS), ip:port
#   PUBLIC_KEY             required (fallback EG_PUBLIC_KEY)
#   PORT_RANGE             optional (fallback EG_PORT_RANGE), default 0..0
#   KERNEL_LAUNCHERS_DIR   optional, default /usr/local/bin/kernel-launchers
#   KERNEL_SPARK_CONTEXT_INIT_MODE   optional, default none
#   KERNEL_CLASS_NAME      optional
#   EG_LAUNCH_TOKEN        optional; egateway's launcher then uses the
#                          authenticated version 2 handshake (it is handed
#                          to the launcher on its stdin, not in its
#                          environment)
#
# Arguments given to this script are passed on to the launcher (for
# example --ip 10.0.0.5).
#
# The launcher runs as a child of this shell rather than replacing it: as
# PID 1 of a container the shell reaps orphaned processes and forwards
# SIGTERM/SIGHUP to the kernel's process group, which a kernel running as
# PID 1 would not get by default.
set -u

die() {
    printf 'bootstrap-kernel.sh: %s\n' "$*" >&2
    exit 1
}

KERNEL_LAUNCHERS_DIR="${KERNEL_LAUNCHERS_DIR:-/usr/local/bin/kernel-launchers}"
RESPONSE_ADDRESS="${RESPONSE_ADDRESS:-${EG_RESPONSE_ADDRESS:-}}"
PUBLIC_KEY="${PUBLIC_KEY:-${EG_PUBLIC_KEY:-}}"
PORT_RANGE="${PORT_RANGE:-${EG_PORT_RANGE:-0..0}}"
KERNEL_SPARK_CONTEXT_INIT_MODE="${KERNEL_SPARK_CONTEXT_INIT_MODE:-none}"
KERNEL_CLASS_NAME="${KERNEL_CLASS_NAME:-}"

[ -n "${KERNEL_LANGUAGE:-}" ] || die "KERNEL_LANGUAGE is not set (expected python)"
[ -n "${KERNEL_ID:-}" ] || die "KERNEL_ID is not set"
[ -n "${RESPONSE_ADDRESS}" ] || die "RESPONSE_ADDRESS (or EG_RESPONSE_ADDRESS) is not set"
[ -n "${PUBLIC_KEY}" ] || die "PUBLIC_KEY (or EG_PUBLIC_KEY) is not set"

language="${KERNEL_LANGUAGE,,}"
case "${language}" in
    python)
        ;;
    r | scala)
        die "KERNEL_LANGUAGE=${KERNEL_LANGUAGE} is not supported by this bootstrap script (only python); use an image with that language's launcher"
        ;;
    *)
        die "unknown KERNEL_LANGUAGE=${KERNEL_LANGUAGE} (expected python)"
        ;;
esac

launcher=""
for candidate in "${KERNEL_LAUNCHERS_DIR}/python/launch_ipykernel.py" \
                 "${KERNEL_LAUNCHERS_DIR}/python/scripts/launch_ipykernel.py"; do
    if [ -f "${candidate}" ]; then
        launcher="${candidate}"
        break
    fi
done
[ -n "${launcher}" ] || die "no launch_ipykernel.py under ${KERNEL_LAUNCHERS_DIR}/python (set KERNEL_LAUNCHERS_DIR)"

python="$(command -v python3 || command -v python)" || die "no python3 or python on PATH"

arguments=(
    --kernel-id "${KERNEL_ID}"
    --port-range "${PORT_RANGE}"
    --response-address "${RESPONSE_ADDRESS}"
    --public-key "${PUBLIC_KEY}"
    --spark-context-initialization-mode "${KERNEL_SPARK_CONTEXT_INIT_MODE}"
)
if [ -n "${KERNEL_CLASS_NAME}" ]; then
    arguments+=(--kernel-class-name "${KERNEL_CLASS_NAME}")
fi

# ipykernel exits when this shell (its parent) goes away.
export JPY_PARENT_PID="$$"

# The launch token goes to the launcher on its stdin, not in its
# environment: a process's initial environment stays readable in
# /proc/<pid>/environ for its whole life, and the launcher is the kernel.
token="${EG_LAUNCH_TOKEN:-}"
unset EG_LAUNCH_TOKEN
if [ -n "${token}" ]; then
    EG_LAUNCH_TOKEN_STDIN=1 "${python}" "${launcher}" "${arguments[@]}" "$@" <<<"${token}" &
else
    "${python}" "${launcher}" "${arguments[@]}" "$@" &
fi
child="$!"
unset token

# shellcheck disable=SC2317  # called from the traps below
forward() {
    # The launcher leads its own process group: reach the kernel and its
    # comm listener together.
    kill "-$1" -- "-${child}" 2>/dev/null || kill "-$1" "${child}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward HUP' HUP
trap 'forward INT' INT

status=0
while :; do
    wait "${child}"
    status="$?"
    # wait returns early when a trapped signal arrives; keep waiting while
    # the launcher lives.
    kill -0 "${child}" 2>/dev/null || break
done
exit "${status}"
