"""
The egateway benchmark: gateway versus direct jupyter_client, in one run.

Run it as C{python bench/run.py}; see C{bench/README.md}.
"""
