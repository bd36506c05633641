"""Reading back what the jobs left in MLflow."""

from __future__ import annotations

from typing import Any


def logged_model_files(client: Any, model_id: str, path: str | None = None) -> list[str]:
    """Every file of a logged model (MLflow 3's LoggedModel), as paths inside it, recursively."""
    files = []
    for item in client.list_logged_model_artifacts(model_id, path):
        files.extend(logged_model_files(client, model_id, item.path) if item.is_dir else [item.path])
    return sorted(files)


def version_files(client: Any, name: str, alias: str) -> list[str]:
    """Every file of the logged model behind a registered model's alias (its source is `models:/<model id>`)."""
    source = client.get_model_version_by_alias(name, alias).source
    assert source.startswith("models:/"), source
    return logged_model_files(client, source.removeprefix("models:/"))


def runs_by_name(client: Any, experiment_id: str, job: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The one parent run of the experiment (of `jobs.<job>` when given) and its children by run name."""
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags
               and (job is None or run.data.tags.get("job") == f"jobs.{job}")]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], children
