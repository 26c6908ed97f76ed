"""
Launchers: the contract every way of starting a kernel implements, and one
module per cluster manager.  Knows nothing about HTTP.
"""
