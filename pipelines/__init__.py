"""pipelines: the config schema, the runner and the `compress` CLI."""
