"""A transport for an MLflow tracking server over HTTP(S), built on ``requests``.

Why not ``MlflowClient`` here: its HTTP layer retries on its own for minutes (7 retries, 120 s
timeouts, settings that are process-wide environment variables), hides ``Retry-After`` from its
caller and makes extra requests (``set_terminated`` reads the run back). This transport makes
exactly one request per call, with a short timeout, and leaves retrying to the exporters' policy.
It speaks MLflow's public REST API (``/api/2.0/mlflow``), and the artifact proxy
(``/api/2.0/mlflow-artifacts``) for runs whose artifacts the server stores.

What an answer means, sessions, the in-flight limit, redirects and fork safety are
:mod:`.http`'s: every request here goes through :class:`.http.HttpClient` and
:func:`.http.classify`.
"""

from __future__ import annotations

import gzip
import json
import mimetypes
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .. import _fork
from .._config import parse_bool, redact_text, redact_uri
from .._exceptions import PermanentError, StoreRefused, TransientError
from .base import (
    ASSESSMENT_KEY,
    ASSESSMENTS_UNSUPPORTED,
    KEY_TAG,
    Assessment,
    Dataset,
    Metric,
    RunRef,
    TraceEnd,
    key_filter,
    prefix_filter,
)
from .http import MAX_IN_FLIGHT, HttpClient, classify, mlflow_error, retry_after_seconds

__all__ = ["MAX_IN_FLIGHT", "RestTransport", "retry_after_seconds", "shared_transport"]

#: The first MLflow release whose server takes OTLP spans on ``/v1/traces``.
_TRACES_SINCE = (3, 6)
#: The first MLflow release with assessments on traces.
_ASSESSMENTS_SINCE = (3, 0)
#: The first MLflow release whose ``StartTraceV3`` merges into a trace its spans created
#: (before it, the trace's tags, metadata and assessments were replaced by the request's).
_UPSERTS_SINCE = (3, 13)
_TRACES_V3 = "/api/3.0/mlflow/traces"
#: Error codes a server gives for an endpoint it does not have.
_NO_ENDPOINT_CODES = frozenset({"ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED"})

_API = "/api/2.0/mlflow"
#: Where MLflow's own UI reads a metric over a range of steps (every server since 2.x).
_AJAX_API = "/ajax-api/2.0/mlflow"
#: The most points one range read asks for; an answer that holds this many may be sampled.
RANGE_READ_LIMIT = 2500
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1  # the range's steps are int32 in MLflow's API
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_PAGE = 1000
_ENV_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
_shared: dict[tuple[object, ...], RestTransport] = {}
_shared_lock = threading.Lock()


def shared_transport(tracking_uri: str, *, timeout: float) -> RestTransport:
    """The process's transport to this server (with these settings): sinks share connections.

    Each caller must ``close()`` it once; it really closes when the last one does."""
    key = (tracking_uri.rstrip("/"), timeout, *(os.environ.get(k) for k in _ENV_KEYS))
    with _shared_lock:
        transport = _shared.get(key)
        if transport is None:
            transport = _shared[key] = RestTransport(tracking_uri, timeout=timeout)
            transport._shared_key = key
        transport._users += 1
        return transport


def _forget_shared_in_child() -> None:
    """A forked child starts with no shared transport: the parent's are the parent's (their
    users, and a lock a parent thread may have held at the fork)."""
    global _shared_lock
    _shared_lock = threading.Lock()
    for transport in _shared.values():
        transport._shared_key = None
    _shared.clear()


_fork.at_fork_in_child(_forget_shared_in_child)


class RestTransport:
    """One request per call to an MLflow tracking server; see the module docstring."""

    #: Every request goes through HttpClient.request, which calls may_begin as it goes out.
    announces_sends = True

    def __init__(
        self,
        tracking_uri: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        env: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ) if env is None else env
        self._uri = tracking_uri.rstrip("/")
        headers = {"User-Agent": "rlm-mlflow", "Content-Type": "application/json"}
        auth: tuple[str, str] | None = None
        user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
        token = env.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            auth = (user, password)
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        verify: bool | str = True
        if parse_bool(env.get("MLFLOW_TRACKING_INSECURE_TLS")):
            verify = False
        elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self.http = HttpClient(
            self._uri,
            timeout=(min(connect_timeout, timeout) if timeout else connect_timeout, timeout),
            headers=headers,
            auth=auth,
            verify=verify,
            cert=env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
        )
        self._shared_key: tuple[object, ...] | None = None
        self._no_range_reads = False  # the server has no range read of a metric (older)
        # The server's version from ``/version``: a tuple once read, () when it did not say.
        self._version: tuple[int, int] | tuple[()] | None = None
        # One read of it at a time: the sinks of a process share this transport, and hundreds
        # of them closing at once would each ask (each read an answer's time at the server).
        self._version_lock = threading.Lock()
        _fork.register(self, RestTransport._new_version_lock)  # a read out at a fork: not ours
        self._users = 0

    def _new_version_lock(self) -> None:
        self._version_lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self._uri

    def describe(self) -> str:
        return redact_uri(self._uri) or ""

    # -- plumbing -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        want_json: bool = True,
    ) -> dict[str, Any]:
        """One request; the parsed JSON answer, or what :func:`.http.classify` raises."""
        payload = json.dumps(body, allow_nan=False) if body is not None else data
        response = self.http.send(method, path, data=payload, params=params, headers=headers)
        return classify(response, f"{method} {path}", want_json=want_json, clean=self._clean)

    def _clean(self, text: str) -> str:
        return redact_text(text, self._uri)

    # -- the Transport interface ------------------------------------------------------------

    def get_or_create_experiment(self, name: str) -> str:
        try:
            found = self.request(
                "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name}
            )
            return _experiment_id(found, name)
        except PermanentError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST" or isinstance(exc, StoreRefused):
                raise
        try:
            created = self.request("POST", f"{_API}/experiments/create", body={"name": name})
            return _field(created, "experiment_id", "create experiment")
        except PermanentError as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                raise
        found = self.request(
            "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name}
        )
        return _experiment_id(found, name)

    def check_experiment(self, experiment_id: str) -> None:
        found = self.request(
            "GET", f"{_API}/experiments/get", params={"experiment_id": experiment_id}
        )
        experiment = found.get("experiment")
        if not isinstance(experiment, dict):
            raise TransientError("get experiment: the answer has no experiment")
        if experiment.get("lifecycle_stage") == "deleted":
            raise _deleted(str(experiment.get("name", experiment_id)))

    def _search(self, experiment_id: str, filter_string: str, limit: int) -> list[RunRef]:
        runs: list[RunRef] = []
        token: str | None = None
        while True:
            body: dict[str, Any] = {
                "experiment_ids": [experiment_id],
                "filter": filter_string,
                "run_view_type": "ACTIVE_ONLY",
                "max_results": min(limit, _PAGE),
            }
            if token:
                body["page_token"] = token
            found = self.request("POST", f"{_API}/runs/search", body=body)
            runs.extend(_run_ref(run) for run in found.get("runs") or [])
            token = found.get("next_page_token")
            if not token or len(runs) >= limit:
                return runs

    def find_runs(self, experiment_id: str, key: str) -> list[RunRef]:
        return self._search(experiment_id, key_filter(key), 100)

    def find_runs_by_prefix(self, experiment_id: str, prefix: str) -> list[RunRef]:
        return self._search(experiment_id, prefix_filter(prefix), 10**9)

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        created = self.request(
            "POST",
            f"{_API}/runs/create",
            body={
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_time": start_time_ms,
                "tags": [{"key": k, "value": v} for k, v in tags],
            },
        )
        run = created.get("run")
        if not isinstance(run, dict):
            raise TransientError("create run: the answer has no run")
        return _run_ref(run)

    def delete_run(self, run_uuid: str) -> None:
        try:
            self.request("POST", f"{_API}/runs/delete", body={"run_id": run_uuid})
        except PermanentError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def run_status(self, run_uuid: str) -> str | None:
        try:
            found = self.request("GET", f"{_API}/runs/get", params={"run_id": run_uuid})
        except PermanentError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        info = (found.get("run") or {}).get("info") or {}
        if info.get("lifecycle_stage") == "deleted":
            return None
        return str(info.get("status", "")) or None

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.request(
            "POST",
            f"{_API}/runs/log-batch",
            body={
                "run_id": run_uuid,
                "metrics": [
                    {"key": m.key, "value": m.value, "timestamp": m.timestamp_ms, "step": m.step}
                    for m in metrics
                ],
                "params": [{"key": k, "value": v} for k, v in params],
                "tags": [{"key": k, "value": v} for k, v in tags],
            },
        )

    def metric_history_range(
        self, run_uuid: str, key: str, start_step: int, end_step: int
    ) -> list[Metric] | None:
        if self._no_range_reads or not (_INT32_MIN <= start_step <= end_step <= _INT32_MAX):
            return None
        path = f"{_AJAX_API}/metrics/get-history-bulk-interval"
        params = {
            "run_ids": run_uuid,
            "metric_key": key,
            "start_step": str(start_step),
            "end_step": str(end_step),
            "max_results": str(RANGE_READ_LIMIT),
        }
        # No answer (a reset, a timeout) is retried like any request. An answer that is not
        # MLflow's (a proxy that lets only /api/ through: its 403, 404, 502 or login page) turns
        # range reads off for this server, and MLflow refusing this one read costs a read of the
        # whole history instead, whose own answer says what is wrong.
        response = self.http.send("GET", path, params=params)
        if response.status_code != 200:
            if mlflow_error(response.content) is None:
                self._no_range_reads = True
                return None
            try:
                classify(response, f"GET {path}", want_json=True, clean=self._clean)
            except PermanentError:  # StoreRefused too: the whole history's read says so
                return None
        try:
            found = json.loads(response.content)
            points = found.get("metrics") or []
            if len(points) >= RANGE_READ_LIMIT:
                return None  # the server may have sampled the range: not exact
            return [_metric(key, m) for m in points]
        except (AttributeError, TypeError, ValueError):  # a 200 that is not MLflow's answer
            self._no_range_reads = True
            return None

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        points: list[Metric] = []
        token: str | None = None
        while True:
            params = {"run_id": run_uuid, "metric_key": key, "max_results": "25000"}
            if token:
                params["page_token"] = token
            found = self.request("GET", f"{_API}/metrics/get-history", params=params)
            points.extend(_metric(key, m) for m in found.get("metrics") or [])
            token = found.get("next_page_token")
            if not token:
                return points

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self.request(
            "POST",
            f"{_API}/runs/update",
            body={"run_id": run_uuid, "status": status, "end_time": end_time_ms},
        )

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        root = _proxied_artifact_root(run.artifact_uri)
        if root is None:
            _log_artifact_with_mlflow(run, local_path, self._uri)
            return
        path = Path(local_path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            uploads = [(f, f.relative_to(path).as_posix()) for f in files]
        elif path.is_file():
            uploads = [(path, path.name)]
        else:
            raise PermanentError(f"{local_path} does not exist", code="ARTIFACT_MISSING")
        for file, name in uploads:
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            try:
                handle = file.open("rb")
            except OSError as exc:
                raise PermanentError(
                    f"cannot read {file}: {exc}", code="ARTIFACT_MISSING"
                ) from None
            with handle:
                self.request(
                    "PUT",
                    f"{_ARTIFACTS_API}/{quote(root)}/{quote(name)}",
                    data=handle,
                    headers={"Content-Type": mime},
                    want_json=False,
                )

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        body = gzip.compress(request, compresslevel=1)
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "x-mlflow-experiment-id": experiment_id,
        }
        if run_uuid:
            headers["x-mlflow-run-id"] = run_uuid
        response = self.http.send("POST", "/v1/traces", data=body, headers=headers)
        status = response.status_code
        if status in (404, 405, 501) and self._no_trace_ingest(response):
            raise PermanentError(
                f"the server does not take traces (HTTP {status} on /v1/traces: MLflow 3.6 "
                "or newer with a database store is needed)",
                code="TRACES_UNSUPPORTED",
                status=status,
            )
        classify(response, "POST /v1/traces", want_json=False, clean=self._clean)

    def assessment_keys(self, trace_id: str) -> set[str]:
        path = f"{_TRACES_V3}/{quote(trace_id, safe='')}"
        answer = self._assessments_call("GET", path, None)
        trace = answer.get("trace")
        info = trace.get("trace_info") if isinstance(trace, dict) else None
        if not isinstance(info, dict):
            raise TransientError("get trace: the answer has no trace info")
        keys: set[str] = set()
        for found in info.get("assessments") or ():
            metadata = found.get("metadata") if isinstance(found, dict) else None
            if isinstance(metadata, dict) and isinstance(metadata.get(ASSESSMENT_KEY), str):
                keys.add(metadata[ASSESSMENT_KEY])
        return keys

    def create_assessment(self, trace_id: str, assessment: Assessment) -> None:
        path = f"{_TRACES_V3}/{quote(trace_id, safe='')}/assessments"
        self._assessments_call("POST", path, {"assessment": assessment.body(trace_id)})

    def link_traces(self, run_uuid: str, trace_ids: Sequence[str]) -> None:
        self.request(
            "POST",
            f"{_API}/traces/link-to-run",
            body={"trace_ids": list(trace_ids), "run_id": run_uuid},
        )

    def log_dataset(self, run_uuid: str, dataset: Dataset) -> None:
        self.request(
            "POST",
            f"{_API}/runs/log-inputs",
            body={"run_id": run_uuid, "datasets": [{"dataset": dataset.body()}]},
        )

    def _assessments_call(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        payload = json.dumps(body, allow_nan=False) if body is not None else None
        response = self.http.send(method, path, data=payload)
        status = response.status_code
        if status in (404, 405, 501) and self._lacks_endpoint(response, _ASSESSMENTS_SINCE):
            raise PermanentError(
                f"the server has no assessments (HTTP {status} on {method} {path}: MLflow 3 "
                "or newer is needed)",
                code=ASSESSMENTS_UNSUPPORTED,
                status=status,
            )
        return classify(response, f"{method} {path}", clean=self._clean)

    def _lacks_endpoint(self, response: Any, since: tuple[int, int]) -> bool:
        """MLflow's own error says the endpoint is missing, or the server's ``/version`` is
        older than ``since``. A missing trace (``RESOURCE_DOES_NOT_EXIST``) is not that."""
        error = mlflow_error(response.content)
        if error is not None:
            return error[0] in _NO_ENDPOINT_CODES
        return response.status_code != 501 and self._older_than(since)

    def _no_trace_ingest(self, response: Any) -> bool:
        """The server itself says it takes no spans: MLflow's own error for the endpoint, or
        a page from a server whose ``/version`` is older than OTLP ingest. Anything else (a
        proxy's page during a redeploy) is not taken for it."""
        if mlflow_error(response.content) is not None:
            return True
        if response.status_code == 501:
            return False
        return self._older_than(_TRACES_SINCE)

    def _older_than(self, since: tuple[int, int]) -> bool:
        version = self._server_version()
        return version is not None and version != () and version < since

    def _server_version(self) -> tuple[int, int] | tuple[()] | None:
        """The server's (major, minor) from ``/version``, read once; () when what answers
        does not say it (a proxy's page, no such path); None when nothing answered."""
        with self._version_lock:  # a read out already: its answer, not one more read
            if self._version is not None:
                return self._version
            try:
                answer = self.http.send("GET", "/version")
            except TransientError:
                return None
            if answer.status_code >= 500 or answer.status_code == 429:
                return None  # a server or proxy in trouble now: asked again later
            found = re.fullmatch(r"\s*(\d+)\.(\d+)[^\s]*\s*", answer.text[:64])
            if answer.status_code != 200 or found is None:
                self._version = ()
            else:
                self._version = (int(found[1]), int(found[2]))
            return self._version

    def upserts_traces(self) -> bool | None:
        version = self._server_version()
        if version is None:
            return None
        return bool(version) and version >= _UPSERTS_SINCE

    def finish_trace(self, experiment_id: str, end: TraceEnd) -> None:
        info: dict[str, Any] = {
            "trace_id": end.trace_id,
            "trace_location": {
                "type": "MLFLOW_EXPERIMENT",
                "mlflow_experiment": {"experiment_id": experiment_id},
            },
            "request_time": _timestamp(end.request_time_ms),
            "execution_duration": f"{max(0, end.duration_ms) / 1000:.3f}s",
            "state": end.state,
        }
        if end.run_uuid:
            info["trace_metadata"] = {"mlflow.sourceRun": end.run_uuid}
        if end.assessments:
            at = _timestamp(end.at_ms)
            info["assessments"] = [
                {
                    **assessment.body(end.trace_id),
                    "assessment_id": assessment.assessment_id,
                    "create_time": at,
                    "last_update_time": at,
                }
                for assessment in end.assessments
            ]
        self._assessments_call("POST", _TRACES_V3, {"trace": {"trace_info": info}})

    def hurry(self, closing: bool) -> None:
        """A sink of this process begins (True) or ends (False) closing against a deadline:
        meanwhile more requests may be in flight (:data:`.http.CLOSING_IN_FLIGHT`)."""
        self.http.slots.hurry(closing)

    def close(self) -> None:
        if self._shared_key is not None:
            with _shared_lock:
                self._users -= 1
                if self._users > 0:
                    return
                if _shared.get(self._shared_key) is self:
                    del _shared[self._shared_key]
        self.http.close()


def _deleted(name: str) -> StoreRefused:
    return StoreRefused(
        f"experiment {name!r} is deleted; restore it in MLflow or choose another experiment "
        "name (nothing is sent until then; everything is kept)",
        code="EXPERIMENT_DELETED",
    )


def _field(answer: dict[str, Any], name: str, what: str) -> str:
    value = answer.get(name)
    if value is None or value == "":
        raise TransientError(f"{what}: the answer has no {name}")
    return str(value)


def _experiment_id(answer: dict[str, Any], name: str) -> str:
    experiment = answer.get("experiment")
    if not isinstance(experiment, dict):
        raise TransientError("get experiment: the answer has no experiment")
    if experiment.get("lifecycle_stage") == "deleted":
        raise _deleted(name)
    return _field(experiment, "experiment_id", "get experiment")


def _metric(key: str, point: dict[str, Any]) -> Metric:
    """One point of a metric's history as MLflow's JSON answer gives it."""
    return Metric(
        key,
        float(point.get("value", 0.0)),
        int(point.get("timestamp", 0)),
        int(point.get("step", 0)),
    )


def _run_ref(run: dict[str, Any]) -> RunRef:
    info = run.get("info") or {}
    data = run.get("data") or {}
    tags = {t.get("key"): t.get("value") for t in data.get("tags") or []}
    run_uuid = info.get("run_id") or info.get("run_uuid")
    if not run_uuid:
        raise TransientError("the answer has no run id")
    return RunRef(
        run_uuid=str(run_uuid),
        artifact_uri=str(info.get("artifact_uri", "")),
        key=str(tags.get(KEY_TAG) or ""),
        status=str(info.get("status", "")),
        start_time_ms=int(info.get("start_time") or 0),
        has_data=bool(data.get("metrics") or data.get("params")),
        latest=_latest(data.get("metrics") or []),
    )


def _latest(metrics: Any) -> tuple[tuple[str, int, int], ...] | None:
    """The latest point of each metric of a run's answer (None if one cannot be read)."""
    if not isinstance(metrics, list):
        return None
    latest: list[tuple[str, int, int]] = []
    for metric in metrics:
        if not isinstance(metric, dict) or not isinstance(metric.get("key"), str):
            return None
        try:
            latest.append((metric["key"], int(metric.get("step") or 0), int(metric["timestamp"])))
        except (KeyError, TypeError, ValueError):
            return None
    return tuple(latest)


def _proxied_artifact_root(artifact_uri: str) -> str | None:
    """The path under the server's artifact proxy, for ``mlflow-artifacts:/...`` roots."""
    parts = urlsplit(artifact_uri)
    if parts.scheme != "mlflow-artifacts" or parts.netloc:
        return None
    return parts.path.strip("/")


def _log_artifact_with_mlflow(run: RunRef, local_path: str, tracking_uri: str) -> None:
    """Artifact roots the proxy does not serve (s3://, gs://, a path): MLflow's own repository."""
    from .client import upload_with_repository

    upload_with_repository(run.artifact_uri, local_path, tracking_uri)


def _timestamp(ms: int) -> str:
    """Milliseconds since the epoch as protobuf's JSON form of a Timestamp (RFC 3339, UTC)."""
    seconds, millis = divmod(max(0, ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
