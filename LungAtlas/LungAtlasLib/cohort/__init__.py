"""The cohort engine: ingest (DICOM tree or manifest, NLST tables), resumable per-case
stages with atomic records, and execution on Dask (in-process, local, scheduler, SLURM/PBS).

See :mod:`.pipeline` for the Python API and docs/cohort.md for the command line.
"""
