"""
The C{egateway} command: the gateway in the foreground, as
C{twistd --nodaemon --pidfile= egateway ...} runs it, for systemd units,
containers and C{pip install egateway && egateway}.

Its arguments are egateway's own settings (C{egateway --help}); twistd's
daemon options (C{--uid}, C{--logfile}, ...) remain available through
C{twistd egateway}.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from twisted.scripts.twistd import ServerOptions, runApp
    from twisted.python import usage

    from egateway.tap import Options

    Options.command = "egateway"
    arguments = list(sys.argv[1:] if argv is None else argv)
    config = ServerOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", "egateway", *arguments])
    except usage.UsageError as e:
        sys.stderr.write(f"egateway: {e}; see egateway --help\n")
        raise SystemExit(2) from None
    runApp(config)


if __name__ == "__main__":
    main()
