#!/usr/bin/env python3
"""
Start an Apache Toree (Scala) kernel for egateway (or Enterprise Gateway)
through spark-submit, and report its connection info to the gateway with
the same handshake as the Python launcher.

Usage (Enterprise Gateway's launcher arguments, then Toree's jar, then
spark-submit's own options after C{--})::

    launch_toree.py --kernel-id ID --response-address IP:PORT --public-key KEY \\
        [--port-range LO..HI] [--spark-context-initialization-mode lazy|eager|none] \\
        --toree-jar /path/toree-assembly-0.5.0-incubating.jar \\
        [-- --master spark://... --conf k=v ...]

Toree 0.5.0 runs on Spark 3.x with Scala 2.12 (pip's C{toree} and
C{pyspark<4}; Spark 4 is Scala 2.13 and cannot load it).  This process
does the handshake (C{../python/kernel_handshake.py}: ports, connection
file, the comm listener, which reports once Toree listens), then becomes
spark-submit (exec, so the kernel's pid is this one, which the gateway
started), running C{org.apache.toree.Main --profile <connection file>};
mode C{none} adds C{--nosparkcontext}.  spark-submit is
C{$SPARK_HOME/bin/spark-submit}, else the one on PATH.  Arguments never
pass through a shell.

Toree has no CurveZMQ support: its channels are signed, not encrypted, and
a version 2 payload says so.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0,
    os.environ.get("EG_PYTHON_LAUNCHER_DIR")
    or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"),
)
import launch_ipykernel as base  # noqa: E402
import kernel_handshake  # noqa: E402

UNENCRYPTED = "Apache Toree cannot encrypt its channels (it has no CurveZMQ support)"
TOREE_MAIN = "org.apache.toree.Main"


def split_arguments(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """
    The launcher's arguments, the Toree jar and spark-submit's options.
    """
    if "--" in argv:
        at = argv.index("--")
        own, submit = argv[:at], argv[at + 1:]
    else:
        own, submit = argv, []
    jar = ""
    kept: list[str] = []
    iterator = iter(own)
    for arg in iterator:
        if arg == "--toree-jar":
            jar = next(iterator, "")
        elif arg.startswith("--toree-jar="):
            jar = arg.split("=", 1)[1]
        else:
            kept.append(arg)
    if not jar or not os.path.isfile(jar):
        raise base.LaunchFailed(f"--toree-jar {jar!r} is not a file (Toree's assembly jar)")
    return kept, jar, submit


def main() -> int:
    import logging

    logging.basicConfig(format="[%(levelname)1.1s %(asctime)s launch_toree] %(message)s", level=logging.INFO)
    try:
        own, jar, submit = split_arguments(sys.argv[1:])
        args = base.parse_arguments(own)
        connection_file = kernel_handshake.start(args, os.getpid(), UNENCRYPTED)
    except base.LaunchFailed as e:
        base.LOG.error("%s", e)
        return 1
    spark_home = os.environ.get("SPARK_HOME", "")
    spark_submit = os.path.join(spark_home, "bin", "spark-submit") if spark_home else "spark-submit"
    toree = ["--profile", connection_file]
    if args.spark_context_initialization_mode == "none":
        toree.append("--nosparkcontext")
    # Not --add-opens java.util.jar: on Java 17 Toree's plugin search then
    # reaches class files its ASM cannot read and the kernel dies; without
    # it the search fails, is logged, and the kernel runs.
    argv = [spark_submit, *submit, "--name", args.kernel_id,
            "--class", TOREE_MAIN, jar, *toree]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(spark_submit, argv)


if __name__ == "__main__":
    sys.exit(main())
