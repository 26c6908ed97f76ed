"""
Chromium flags that keep a test's browser on the machine.

Headless Chromium still talks to Google by itself: it looked up
C{content-autofill.googleapis.com}, C{accounts.google.com} and
C{update.googleapis.com} during one JupyterLab scenario (seen with
C{strace -f -e connect,sendto}).  Tests reach only loopback, so every host
name except loopback's resolves to nothing (the rule applies to address
literals too, hence the loopback exclusions), and the background services
that would ask are off.  What is left is Chromium connecting a UDP socket to
a public address to learn its own local address: no datagram is sent
(checked the same way).

Imported by the JupyterLab driver (run as a script from this directory) and
by the dashboard's browser helper.
"""

OFFLINE_CHROMIUM = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-pings",
    "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter,Translate",
)
