"""Transports: the MLflow-facing surface, blocking calls with explicit ids.

- :mod:`.base`: the :class:`~rlm_mlflow.Transport` interface every exporter speaks to.
- :mod:`.rest`: a tracking server over its REST API (and its OTLP endpoint for spans), one
  request per try, shared by every sink that talks to the same server.
- :mod:`.client`: anything else (the embedded sqlite store, file stores, plugins) through
  ``MlflowClient`` and the store it opens, in-process.
"""
