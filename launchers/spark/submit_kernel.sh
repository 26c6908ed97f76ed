#!/bin/sh
# Run spark-submit for a kernel launcher in Spark client mode (the driver,
# and so the kernel, runs on this host), for example on an SSH host against
# a Spark standalone master:
#
#   submit_kernel.sh --master spark://master:7077 --deploy-mode client \
#       --name KERNEL_ID launch_ipykernel.py --kernel-id ... \
#       --spark-context-initialization-mode lazy
#
# Every argument goes to spark-submit unchanged (no eval, no word
# splitting).  spark-submit is $SPARK_HOME/bin/spark-submit, else the one
# on PATH.
#
# spark-submit gives the Python application a pipe of its own as stdin, so
# the launch token egateway's SSH launcher sends on stdin
# (EG_LAUNCH_TOKEN_STDIN=1) would never reach the kernel launcher: this
# script moves it into a private file (mktemp, mode 0600) named by
# EG_LAUNCH_TOKEN_FILE, which the launcher removes once read (and this
# script on exit, if the launcher never ran).  The token never enters an
# environment.
set -eu

submit=spark-submit
if [ -n "${SPARK_HOME:-}" ]; then
    submit="$SPARK_HOME/bin/spark-submit"
fi

if [ "${EG_LAUNCH_TOKEN_STDIN:-}" != 1 ]; then
    exec "$submit" "$@"
fi

unset EG_LAUNCH_TOKEN_STDIN
token_file=$(mktemp "${TMPDIR:-/tmp}/egateway-token.XXXXXXXXXX")
trap 'rm -f "$token_file"' EXIT
IFS= read -r token || true
printf '%s\n' "$token" >"$token_file"
unset token
EG_LAUNCH_TOKEN_FILE=$token_file
export EG_LAUNCH_TOKEN_FILE
"$submit" "$@" </dev/null
