"""Send recursive language-model agent runs to MLflow without ever slowing the agent down."""

from ._benchmark import Benchmark as Benchmark
from ._benchmark import benchmark as benchmark
from ._config import Overflow as Overflow
from ._config import SinkConfig as SinkConfig
from ._exceptions import PermanentError as PermanentError
from ._exceptions import StoreRefused as StoreRefused
from ._exceptions import TransientError as TransientError
from ._exceptions import TransportError as TransportError
from ._replay import ReplayReport as ReplayReport
from ._replay import replay as replay
from ._session import session as session
from ._sink import MLflowSink as MLflowSink
from ._sink import create_mlflow_sink_from_env as create_mlflow_sink_from_env
from ._stats import SinkStatistics as SinkStatistics
from ._transports.base import Metric as Metric
from ._transports.base import RunRef as RunRef
from ._transports.base import Transport as Transport

__all__ = [
    "Benchmark",
    "MLflowSink",
    "Metric",
    "Overflow",
    "PermanentError",
    "ReplayReport",
    "RunRef",
    "SinkConfig",
    "SinkStatistics",
    "StoreRefused",
    "TransientError",
    "Transport",
    "TransportError",
    "benchmark",
    "create_mlflow_sink_from_env",
    "replay",
    "session",
]

__version__ = "0.1.0"
