"""Study scripts: one-off measurements that use the public harness (benchmarks) and passes (compress).

Not part of the installed package (pyproject packages only compress*, pipelines*, benchmarks*). Run them from
the repository root as modules, e.g. `python -m studies.quantize_compare --help`; see studies/README.md."""
