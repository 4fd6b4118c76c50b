"""``semidiff bench``: a grid of ordinary training runs (:mod:`.spec`), kept level with a folder of
records (:mod:`.records`) and trained cell by cell (:mod:`.runner`, :mod:`.cell`).

Data flow: bench YAML -> :class:`~semidiff.bench.spec.BenchSpec` -> :func:`~semidiff.bench.spec.grid_cells`
-> runs on disk (:func:`~semidiff.bench.runner.run_bench`) -> :mod:`semidiff.report`.
"""
