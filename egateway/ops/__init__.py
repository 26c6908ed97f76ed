"""
What operators run alongside the gateway's own work: the audit trail, TLS,
health and drain, the main log, operator signals and the SSH manhole.
"""
