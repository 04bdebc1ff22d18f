"""A transport for an MLflow tracking server over HTTP(S), built on ``requests``.

Why not ``MlflowClient`` here: its HTTP layer retries on its own for minutes (7 retries, 120 s
timeouts, settings that are process-wide environment variables), hides ``Retry-After`` from its
caller and makes extra requests (``set_terminated`` reads the run back). This transport makes
exactly one request per call, with a short timeout, and leaves retrying to the exporters' policy.
It speaks MLflow's public REST API (``/api/2.0/mlflow``), and the artifact proxy
(``/api/2.0/mlflow-artifacts``) for runs whose artifacts the server stores.

It also decides what an answer means: 401 and 403 are a refusal of our credentials, whatever the
body says (a login page, an HTML error), so the whole store is refused, not one request; an
answer that is not MLflow's JSON (an empty body, a page from a proxy) is a transient failure, never
a success.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import math
import mimetypes
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3.exceptions

from .._config import parse_bool, redact_text, redact_uri
from .._exceptions import PermanentError, StoreRefused, TransientError
from .base import KEY_TAG, Metric, RunRef, key_filter, prefix_filter

_API = "/api/2.0/mlflow"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_PAGE = 1000
#: Requests one process has in flight to one server at most, whatever the number of sinks: a
#: tracking server has a small database pool (5 + 10 by default) and a handful of workers.
MAX_IN_FLIGHT = 4
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


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Parse ``Retry-After``: delta-seconds or an HTTP date. None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (no connection was made)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


class RestTransport:
    """One request per call to an MLflow tracking server; see the module docstring."""

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
        self._timeout = (min(connect_timeout, timeout) if timeout else connect_timeout, timeout)
        self._local = threading.local()
        self._headers = {"User-Agent": "rlm-mlflow", "Content-Type": "application/json"}
        self._auth: tuple[str, str] | None = None
        user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
        token = env.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            self._auth = (user, password)
        elif token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._verify: bool | str = True
        if parse_bool(env.get("MLFLOW_TRACKING_INSECURE_TLS")):
            self._verify = False
        elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            self._verify = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self._cert = env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._shared_key: tuple[object, ...] | None = None
        self._users = 0
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    @property
    def uri(self) -> str:
        return self._uri

    def describe(self) -> str:
        return redact_uri(self._uri) or ""

    # -- plumbing -------------------------------------------------------------------------------

    def session(self) -> requests.Session:
        """This thread's HTTP session (connections are reused, one pool per thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            if self._auth:
                session.auth = self._auth
            session.verify = self._verify
            if self._cert:
                session.cert = self._cert
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

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
        """One request; the parsed JSON answer, or the exceptions of the module docstring."""
        url = self._uri + path
        payload = json.dumps(body, allow_nan=False) if body is not None else data
        try:
            with self._slots:
                response = self.session().request(
                    method, url, data=payload, params=params, headers=headers, timeout=self._timeout
                )
        except requests.RequestException as exc:
            raise TransientError(
                self._clean(f"{method} {path}: {type(exc).__name__}"),
                maybe_committed=not _never_sent(exc),
            ) from None
        return self.answer(response, f"{method} {path}", want_json=want_json)

    def answer(
        self, response: requests.Response, what: str, *, want_json: bool = True
    ) -> dict[str, Any]:
        status = response.status_code
        if status in (401, 403):
            raise StoreRefused(
                self._clean(
                    f"{what}: the server refused our credentials (HTTP {status}); set "
                    "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                ),
                code="UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED",
                status=status,
            )
        if status < 300:
            if not want_json:
                return {}
            if not response.content:
                raise TransientError(f"{what}: HTTP {status} with an empty body")
            try:
                parsed = response.json()
            except ValueError:
                kind = response.headers.get("Content-Type", "unknown type")
                raise TransientError(
                    f"{what}: HTTP {status} with a body that is not JSON ({kind})"
                ) from None
            if not isinstance(parsed, dict):
                raise TransientError(f"{what}: HTTP {status} with an unexpected JSON answer")
            return parsed
        code, message = _error_of(response)
        text = self._clean(f"{what}: HTTP {status} {code}: {message}")
        if status in _TRANSIENT_STATUS or (status >= 500 and status != 501):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise TransientError(text, retry_after=retry_after)
        if code == "INVALID_PARAMETER_VALUE" and "'active' state" in message:
            code = "RUN_NOT_ACTIVE"  # the run (or its experiment) was deleted
        raise PermanentError(text, code=code, status=status)

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

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        points: list[Metric] = []
        token: str | None = None
        while True:
            params = {"run_id": run_uuid, "metric_key": key, "max_results": "25000"}
            if token:
                params["page_token"] = token
            found = self.request("GET", f"{_API}/metrics/get-history", params=params)
            for m in found.get("metrics") or []:
                points.append(
                    Metric(
                        key,
                        float(m.get("value", 0.0)),
                        int(m.get("timestamp", 0)),
                        int(m.get("step", 0)),
                    )
                )
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
        try:
            self.request("POST", "/v1/traces", data=body, headers=headers, want_json=False)
        except PermanentError as exc:
            if isinstance(exc, StoreRefused) or exc.status not in (404, 405, 501):
                raise
            raise PermanentError(
                f"the server does not take traces (HTTP {exc.status} on /v1/traces: MLflow 3.6 "
                "or newer with a database store is needed)",
                code="TRACES_UNSUPPORTED",
                status=exc.status,
            ) from None

    def close(self) -> None:
        if self._shared_key is not None:
            with _shared_lock:
                self._users -= 1
                if self._users > 0:
                    return
                if _shared.get(self._shared_key) is self:
                    del _shared[self._shared_key]
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


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
    )


def _error_of(response: requests.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return str(body.get("error_code", "UNKNOWN")), str(body.get("message", ""))[:500]
    return "UNKNOWN", f"{response.reason or ''} ({len(response.content)} bytes, not JSON)"


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
