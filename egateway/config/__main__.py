"""
C{python -m egateway.config}: print the configuration reference table the
README embeds.
"""

from egateway.config.reference import reference_markdown

print(reference_markdown(), end="")
