"""Sessions: which conversation (and which user) a root run belongs to.

MLflow groups traces into sessions by the ``session.id`` attribute of their root span (and reads
the user from ``user.id``); its Sessions page then lists each session with its turns. A root run
takes its session, and its user, from the first of:

1. :func:`session`, a context the caller opens around the agent's calls. It is a context
   variable, so it follows the code that runs inside it: the same thread, asyncio and trio tasks
   started inside it (they copy the context), ``asyncio.to_thread`` and anyio's worker threads.
   A thread started with ``threading.Thread`` or a thread pool starts with an empty context: it
   takes the innermost session open in the process when every open one was opened on one
   other thread (a script, a notebook, a chat loop that starts worker threads); with sessions
   open on several threads at once, such a thread has none (run it with
   ``contextvars.copy_context().run`` to give it the session of its caller).
2. For a session id: RLM Code's chat session, when the run is a chat turn (RLM Code starts the
   task of every turn with the session's id, see :func:`chat_session_of`).
3. The sink's settings ``session`` and ``user`` (``RLM_MLFLOW_SESSION``, ``RLM_MLFLOW_USER``).

A child run is in its root's trace, so only root runs look their session up. The lookup is a
context-variable read and a few comparisons: it runs in ``on_run_start``.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token
from types import TracebackType

#: The longest session or user id MLflow keeps (``MAX_CHARS_IN_TRACE_INFO_METADATA``).
MAX_ID_CHARS = 250

#: How RLM Code 0.1.13's ``run_chat_turn`` starts the task of each turn, before the session id.
CHAT_PREFIX = "RLM persistent chat session: "


def check_id(kind: str, value: object) -> str | None:
    """``value`` as a session or user id: None stays None; otherwise a non-empty string of at
    most :data:`MAX_ID_CHARS` characters, surrounding blanks removed, or ValueError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a string, not {type(value).__name__}")
    text = value.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{kind} must be valid text (it holds a lone surrogate)") from None
    if not text:
        raise ValueError(f"{kind} must not be empty")
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"{kind} must be at most {MAX_ID_CHARS} characters, not {len(text)}")
    return text


class session:
    """Root runs started inside this context belong to session ``session_id`` (and user
    ``user``) in MLflow: their traces carry ``session.id`` and ``user.id``.

    ``with rlm_mlflow.session("chat-7", user="ada"): program(question=...)``. Either may be
    left out: the other then comes from RLM Code's chat session or the sink's settings. Contexts
    nest (the inner one wins for what it gives). Works across ``await`` and in the tasks and
    threads started inside it (see the module's documentation for plain threads).
    """

    __slots__ = ("_given", "_token", "id", "thread", "user")

    def __init__(self, session_id: str | None = None, *, user: str | None = None) -> None:
        self.id = check_id("session_id", session_id)
        self.user = check_id("user", user)
        if self.id is None and self.user is None:
            raise ValueError("give a session id, a user, or both")
        self._given = (self.id, self.user)
        self.thread = 0
        self._token: Token[session | None] | None = None

    def __repr__(self) -> str:
        return f"rlm_mlflow.session({self.id!r}, user={self.user!r})"

    def __enter__(self) -> session:
        if self._token is not None:
            raise RuntimeError("this session context is already open: make a new one")
        outer = _current.get()
        if outer is not None:  # what this one does not give comes from the one around it
            self.id = self.id if self.id is not None else outer.id
            self.user = self.user if self.user is not None else outer.user
        self.thread = threading.get_ident()
        self._token = _current.set(self)
        with _lock:
            _opened((*_open, self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        self.id, self.user = self._given  # what it took from the context around it, given back
        with _lock:
            _opened(tuple(entry for entry in _open if entry is not self))
        if token is None:
            return
        try:
            _current.reset(token)
        except ValueError:  # left in another context (a generator resumed elsewhere)
            _current.set(token.old_value if token.old_value is not Token.MISSING else None)


_current: ContextVar[session | None] = ContextVar("rlm_mlflow_session", default=None)
_open: tuple[session, ...] = ()  # every session context open in the process, oldest first
# For threads with a context of their own: the innermost open context when every open one was
# opened on one thread, else None (sessions open on several threads: no way to tell which).
_fallback: session | None = None
_lock = threading.Lock()  # only for opening and closing contexts, never on a hook


def _opened(contexts: tuple[session, ...]) -> None:
    global _open, _fallback
    _open = contexts
    one_thread = bool(contexts) and all(c.thread == contexts[-1].thread for c in contexts)
    _fallback = contexts[-1] if one_thread else None


def current() -> session | None:
    """The session context the calling code runs in (see the module's documentation)."""
    found = _current.get()
    if found is not None:
        return found
    fallback = _fallback
    if fallback is not None and fallback.thread != threading.get_ident():
        return fallback
    return None


def chat_session_of(task: object) -> str | None:
    """RLM Code's chat session id, when ``task`` is the task of one of its chat turns."""
    if type(task) is not str or not task.startswith(CHAT_PREFIX):
        return None
    end = task.find("\n", len(CHAT_PREFIX), len(CHAT_PREFIX) + MAX_ID_CHARS + 1)
    found = task[len(CHAT_PREFIX) : end if end >= 0 else len(CHAT_PREFIX) + MAX_ID_CHARS]
    found = found.strip()
    return found[:MAX_ID_CHARS] or None


def of_root_run(
    task: object, session_id: str | None, user: str | None
) -> tuple[str | None, str | None]:
    """``(session id, user id)`` of a root run starting now with ``task``; ``session_id`` and
    ``user`` are the sink's settings."""
    found = current()
    if found is not None:
        if found.id is not None and found.user is not None:
            return found.id, found.user
        chat = chat_session_of(task) if found.id is None else found.id
        return chat or session_id, found.user or user
    return chat_session_of(task) or session_id, user
