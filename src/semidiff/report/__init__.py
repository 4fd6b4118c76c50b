"""The report, the last stage of the data flow: finished runs -> :mod:`.collect` (results aggregated
over seeds) -> :mod:`.tables` and :mod:`.figures` -> :mod:`.build` (``semidiff report``).

It reads run folders and bench folders only; it trains nothing and imports no runner.
"""
