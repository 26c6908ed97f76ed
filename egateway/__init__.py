"""
egateway: an enterprise Jupyter kernel gateway built on Twisted.
"""

__version__ = "0.1.0"
