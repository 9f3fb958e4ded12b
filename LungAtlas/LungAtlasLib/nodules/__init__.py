"""The nodule atlas: nodules in, mapped into atlas space, counted and compared.

Steps, one module each (data flows downwards):

- :mod:`.inputs`        nodule tables from CSV points, Slicer markups, nodule masks, NLST ``ctab`` rows
- :mod:`.mapping`       patient LPS points -> atlas LPS points through the registration transform
- :mod:`.density`       Gaussian density maps in atlas space
- :mod:`.lobes`         per-lobe counts, shares, volume-normalised rates with Wilson intervals;
                        central vs peripheral
- :mod:`.phenotypes`    phenotype groups, chi-square on lobe counts, permutation test on density maps
- :mod:`.longitudinal`  one participant's nodules matched across screens (new vs persistent)
- :mod:`.atlas_stats`   the ``lungatlas atlas-stats`` command that writes maps, tables and the report

Every nodule table carries one row per nodule with a ``status`` column: ``"ok"``
for a nodule that is used, otherwise the reason it is excluded. Rows are never
dropped silently.
"""
