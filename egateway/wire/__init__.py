"""
The Jupyter wire protocol (pure functions) and the ZMQ channel seam.
"""
