"""signd's benchmark: ``signd-bench`` (see ``python -m signd_bench --help``)."""
