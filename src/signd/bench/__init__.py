"""signd's benchmark: ``signd-bench`` (see ``python -m signd.bench --help``)."""
