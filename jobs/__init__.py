"""Orchestration: Ray tasks and MLflow tracking around `padim_core`. Entry points: `python -m jobs.<name>`."""
