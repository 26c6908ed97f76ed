"""
Kernel lifecycle: the manager, the per-kernel state machine, kernelspecs,
environments, sessions and culling.
"""
