"""Exporters: what a drain cycle's events become in MLflow.

Each exporter owns its batching and its idempotency, and talks to MLflow only through a
:class:`~rlm_mlflow.Transport`:

- :mod:`.runs`: MLflow runs (created once, found by their key), params, tags, step and summary
  metrics, artifacts, statuses; :mod:`.convert` holds MLflow's rules for names and values.
- :mod:`.traces`: each RLM run tree as one MLflow trace, its spans built by :mod:`.spans` with
  ids derived from the runs' keys.
"""
