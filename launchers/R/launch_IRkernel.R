#!/usr/bin/env Rscript
# Start an R kernel (IRkernel) on a remote host for egateway (or Enterprise
# Gateway) and report its connection info back to the gateway.
#
# Usage, as Enterprise Gateway's launch_IRkernel.R:
#   Rscript launch_IRkernel.R --kernel-id ID --response-address IP:PORT \
#       --public-key KEY [--port-range LO..HI] [--spark-context-initialization-mode none]
# (and the --RemoteProcessProxy.* aliases; --customAppName is accepted and ignored).
#
# The handshake (ports, connection file, the encrypted payload, the comm
# port) is done by irkernel_handshake.py beside this file, which reuses
# egateway's Python launcher: R's openssl package lacks RSA-OAEP with
# SHA-256, and the comm port must be served while IRkernel runs.  It needs
# a Python 3 with the `cryptography` package: EG_LAUNCHER_PYTHON, else
# PYSPARK_PYTHON, else python3 on PATH.  Arguments reach it as JSON in the
# environment, never through a shell; the launch token (first line of
# stdin with EG_LAUNCH_TOKEN_STDIN=1) is read by it from our stdin.
#
# Spark context initialisation (lazy/eager SparkR sessions) is not
# supported: any mode other than "none" is refused.

args <- commandArgs(trailingOnly = TRUE)

mode_at <- which(args %in% c("--spark-context-initialization-mode",
                              "--RemoteProcessProxy.spark-context-initialization-mode"))
if (length(mode_at) > 0 && mode_at[1] < length(args) && args[mode_at[1] + 1] != "none") {
    message("launch_IRkernel.R: only --spark-context-initialization-mode none is supported")
    quit(save = "no", status = 1)
}

script <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[1])
helper <- file.path(dirname(normalizePath(script)), "irkernel_handshake.py")
python <- Sys.getenv("EG_LAUNCHER_PYTHON", Sys.getenv("PYSPARK_PYTHON", "python3"))

Sys.setenv(EG_LAUNCHER_ARGV = as.character(jsonlite::toJSON(args)), EG_KERNEL_PID = Sys.getpid())
connection_file <- suppressWarnings(system2(python, shQuote(helper), stdout = TRUE))
status <- attr(connection_file, "status")
# Nothing of the launch stays in the kernel's environment.
Sys.unsetenv(c("EG_LAUNCHER_ARGV", "EG_KERNEL_PID", "EG_LAUNCH_TOKEN", "EG_LAUNCH_TOKEN_STDIN"))
if (!is.null(status) && status != 0 || length(connection_file) == 0) {
    message("launch_IRkernel.R: the handshake helper failed; see the messages above")
    quit(save = "no", status = 1)
}
connection_file <- connection_file[length(connection_file)]

tryCatch(IRkernel::main(connection_file), finally = unlink(connection_file))
