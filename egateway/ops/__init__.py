"""
What operators run alongside the gateway's own work: the audit trail.
"""
