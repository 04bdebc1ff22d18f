"""A transport for an MLflow tracking server over HTTP(S), built on ``requests``.

Why not ``MlflowClient`` here: its HTTP layer retries on its own for minutes (7 retries, 120 s
timeouts, settings that are process-wide environment variables), hides ``Retry-After`` from its
caller and makes extra requests (``set_terminated`` reads the run back). This transport makes
exactly one request per call, with a short timeout, and leaves retrying to the worker's policy.
It speaks MLflow's public REST API (``/api/2.0/mlflow``), and the artifact proxy
(``/api/2.0/mlflow-artifacts``) for runs whose artifacts the server stores.
"""

from __future__ import annotations

import email.utils
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

from ._config import parse_bool, redact_text, redact_uri
from ._exceptions import PermanentError, TransientError
from ._transport import KEY_TAG, Metric, RunRef

_API = "/api/2.0/mlflow"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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

    def describe(self) -> str:
        return redact_uri(self._uri) or ""

    # -- plumbing -------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
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

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = self._uri + path
        payload = json.dumps(body, allow_nan=False) if body is not None else data
        try:
            response = self._session().request(
                method,
                url,
                data=payload,
                params=params,
                headers=headers,
                timeout=self._timeout,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(self._clean(f"{method} {path}: {type(exc).__name__}")) from None
        except requests.RequestException as exc:
            raise TransientError(self._clean(f"{method} {path}: {exc}")) from None
        status = response.status_code
        if status < 300:
            if not response.content:
                return {}
            try:
                parsed = response.json()
            except ValueError:
                raise TransientError(f"{method} {path}: answer is not JSON") from None
            return parsed if isinstance(parsed, dict) else {}
        code, message = _error_of(response)
        text = self._clean(f"{method} {path}: HTTP {status} {code}: {message}")
        if status in _TRANSIENT_STATUS or (status >= 500 and status != 501):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise TransientError(text, retry_after=retry_after)
        raise PermanentError(text, code=code, status=status)

    def _clean(self, text: str) -> str:
        return redact_text(text, self._uri)

    # -- the Transport interface ------------------------------------------------------------

    def get_or_create_experiment(self, name: str) -> str:
        try:
            found = self._request(
                "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name}
            )
            experiment = found.get("experiment", {})
            if experiment.get("lifecycle_stage") == "deleted":
                raise PermanentError(
                    f"experiment {name!r} is deleted; restore it or choose another name",
                    code="RESOURCE_DELETED",
                )
            return str(experiment["experiment_id"])
        except PermanentError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            created = self._request("POST", f"{_API}/experiments/create", body={"name": name})
            return str(created["experiment_id"])
        except PermanentError as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                raise
        found = self._request(
            "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name}
        )
        return str(found["experiment"]["experiment_id"])

    def find_run(self, experiment_id: str, key: str) -> RunRef | None:
        found = self._request(
            "POST",
            f"{_API}/runs/search",
            body={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{KEY_TAG}` = '{key}'",
                "run_view_type": "ALL",
                "max_results": 1,
            },
        )
        runs = found.get("runs") or []
        if not runs:
            return None
        info = runs[0]["info"]
        return RunRef(run_uuid=info["run_id"], artifact_uri=info.get("artifact_uri", ""))

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        created = self._request(
            "POST",
            f"{_API}/runs/create",
            body={
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_time": start_time_ms,
                "tags": [{"key": k, "value": v} for k, v in tags],
            },
        )
        info = created["run"]["info"]
        return RunRef(run_uuid=info["run_id"], artifact_uri=info.get("artifact_uri", ""))

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._request(
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

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self._request(
            "POST",
            f"{_API}/runs/update",
            body={
                "run_id": run_uuid,
                "status": status,
                "end_time": end_time_ms,
            },
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
            raise PermanentError(f"{local_path} no longer exists", code="ARTIFACT_MISSING")
        for file, name in uploads:
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            try:
                handle = file.open("rb")
            except OSError as exc:
                raise PermanentError(
                    f"cannot read {file}: {exc}", code="ARTIFACT_MISSING"
                ) from None
            with handle:
                self._request(
                    "PUT",
                    f"{_ARTIFACTS_API}/{quote(root)}/{quote(name)}",
                    data=handle,
                    headers={"Content-Type": mime},
                )

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def _error_of(response: requests.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return str(body.get("error_code", "UNKNOWN")), str(body.get("message", ""))[:500]
    return "UNKNOWN", (response.text or response.reason or "")[:200]


def _proxied_artifact_root(artifact_uri: str) -> str | None:
    """The path under the server's artifact proxy, for ``mlflow-artifacts:/...`` roots."""
    parts = urlsplit(artifact_uri)
    if parts.scheme != "mlflow-artifacts" or parts.netloc:
        return None
    return parts.path.strip("/")


def _log_artifact_with_mlflow(run: RunRef, local_path: str, tracking_uri: str) -> None:
    """Artifact roots the proxy does not serve (s3://, gs://, a path): MLflow's own repository."""
    from ._client import upload_with_repository

    upload_with_repository(run.artifact_uri, local_path, tracking_uri)
