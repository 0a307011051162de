"""Experiment configs: each file's `get_config()` starts from `configs.default`."""
