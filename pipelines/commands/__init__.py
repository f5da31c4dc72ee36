"""One module per command family; `pipelines.cli` loads them lazily by name."""
