"""The report: an HTML page with PNG figures (matplotlib) and the tables it shows.

- :mod:`.figures`  one function per figure (box plots, density views, lobe bars, group shares)
- :mod:`.html`     :func:`.html.build_report` assembles sections of figures and tables
"""
