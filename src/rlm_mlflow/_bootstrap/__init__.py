"""The folder ``rlm-mlflow run`` puts first on ``PYTHONPATH``: it holds only ``sitecustomize``."""
