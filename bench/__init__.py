"""``make bench``: BreastAI's ingest and analysis measured beside their references, reported as ratios.

bench/README.md says how to run it and how to read the table; ``bench.run`` is the command,
``bench.ingest`` and ``bench.analysis`` the two parts, ``bench.report`` and ``bench.machine``
the ratios, tables, results file and machine description.
"""
