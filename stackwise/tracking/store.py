"""Where runs are recorded: the MLflow tracking URI, the local store layout, and safe access.

The default store is ``./mlruns`` in the working directory::

    mlruns/
      mlflow.db                          SQLite backend (runs, params, metrics, tags)
      artifacts/<experiment>/...         artifacts of the experiments StackWise creates
      checkpoints/<experiment>/<hash>/   training checkpoints of interrupted grid points
      locks/                             advisory locks shared by concurrent `stackwise run`s
      data-fingerprints.json             sha256 of data files, by path, size and mtime

Every store keeps that state in a folder of its own (`local_root`), so two stores never share
checkpoints, locks or artifacts: a database named ``mlflow.db`` (the store-folder form, like
``./mlruns``) keeps it in its own folder; any other database ``x.db`` in ``x.stackwise/`` beside
it; a remote store (an MLflow server, a database server) in
``./mlruns/remote/<scheme>-<host>-<port>-<hash>/`` of the working folder.

MLflow 3's file store is deprecated, so even the default store is a database. Resolution order:
the `--tracking-uri` flag, then ``$MLFLOW_TRACKING_URI``, then the YAML ``tracking.uri``, then
the default above. A plain path names a store folder laid out like ``./mlruns`` (``mlflow.db``
inside it; a path ending in ``.db`` is the database itself); a ``file:`` URI is MLflow's legacy
file store. Nothing is created on disk by resolving; `prepare_store` does that, and only the
runner calls it, when a run actually starts (so validation never writes to the store).
`check_tracking_uri` tells, before anything runs, why a URI cannot be used.

`check_tracking_uri` is the one pre-check that `run`, `compare` and `ui` share: a remote store
must answer one call of MLflow's REST API, a database URI needs its driver installed and its
server reachable, and a local store (database and state folder) must be writable.

SQLite allows one writer at a time. MLflow sets a busy timeout, but two processes can still
collide while the schema is first created, or a write can time out under load, so store creation
happens under a file lock and every write goes through `retry_locked`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import random
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_STORE_DIR = "mlruns"
DATABASE_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CHECKPOINTS_DIR = "checkpoints"
LOCKS_DIR = "locks"
REMOTE_DIR = "remote"
STATE_SUFFIX = ".stackwise"

T = TypeVar("T")


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The SQLite store in ``<cwd>/mlruns/mlflow.db`` (absolute, so the URI works anywhere)."""
    root = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(root.resolve() / DEFAULT_STORE_DIR / DATABASE_NAME).as_posix()}"


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """The tracking URI to use: flag > $MLFLOW_TRACKING_URI > YAML `tracking.uri` > ./mlruns.

    An empty string counts as unset (CI often exports ``MLFLOW_TRACKING_URI=""``). A plain local
    path is made absolute and names a store folder like ``./mlruns`` (``<path>/mlflow.db``), or
    the database itself when it ends in ``.db``/``.sqlite``; MLflow 3 refuses to open the
    legacy file store a plain path used to mean (spell it ``file:///…`` to ask for one).
    """
    for candidate in (cli_uri, os.environ.get("MLFLOW_TRACKING_URI"), config_uri):
        if candidate and candidate.strip():
            return _normalise(candidate.strip())
    return default_tracking_uri()


def _normalise(uri: str) -> str:
    if "://" in uri or uri.startswith("databricks"):
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///relative.db is relative to the working directory: pin it now.
            relative = uri.removeprefix("sqlite:///")
            return f"sqlite:///{Path(relative).resolve().as_posix()}"
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix in SQLITE_SUFFIXES:
        return f"sqlite:///{path.as_posix()}"
    return f"sqlite:///{(path / DATABASE_NAME).as_posix()}"


# URI schemes MLflow's tracking client can open (a `+driver` suffix, e.g. postgresql+psycopg2,
# is allowed on the database ones).
SUPPORTED_SCHEMES = (
    "sqlite",
    "file",
    "http",
    "https",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


# Database URI schemes -> SQLAlchemy's default driver module, and driver module -> the package
# that provides it (what the user has to install).
DEFAULT_DRIVERS = {"postgresql": "psycopg2", "mysql": "MySQLdb", "mssql": "pyodbc"}
DRIVER_MODULES = {"mysqldb": "MySQLdb", "mysqlconnector": "mysql.connector"}
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "pg8000": "pg8000",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql.connector": "mysql-connector-python",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# One read call of MLflow's REST API: what every MLflow tracking server answers.
REST_PROBE = "/api/2.0/mlflow/experiments/search"
SERVER_TIMEOUT = 10.0


def check_tracking_uri(uri: str, timeout: float = SERVER_TIMEOUT) -> str | None:
    """Why `uri` cannot be used as a tracking store, or None when it can (one line).

    Checked without creating anything: a known scheme; a legacy file store only where MLflow
    is told to allow it; a local store (its database and its state folder) writable; an MLflow
    server answers one read call of the REST API within `timeout` seconds; a database server
    has its Python driver installed and accepts a connection on its port.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()  # "databricks" alone is one too
    if scheme not in SUPPORTED_SCHEMES:
        return (
            f"unsupported tracking URI {uri!r}; use a folder, sqlite:///path/to/mlflow.db, "
            "http(s)://server:port or a database URI (postgresql://, mysql://, mssql://)"
        )
    database = sqlite_path(uri)
    if database is not None and database.is_dir():
        return f"{database} is a folder, not an SQLite database file"
    if scheme == "file":
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower()
        if allowed not in ("1", "true", "yes"):
            return (
                f"{uri} is an MLflow file store, which MLflow 3 no longer opens; use a folder "
                "path or sqlite:///…/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true to read "
                "an old one)"
            )
    if is_local_store(uri):
        return check_writable(uri)
    if scheme in ("http", "https"):
        return _check_server(uri, timeout)
    if scheme in DEFAULT_DRIVERS:
        return _check_database_server(uri, scheme, min(timeout, 5.0))
    return None


def check_writable(uri: str) -> str | None:
    """Why the local folders of store `uri` cannot be written (None when they can)."""
    targets = [local_root(uri)]
    database = sqlite_path(uri)
    if database is not None:
        targets.insert(0, database)
    for target in targets:
        existing = target
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.is_file() and existing != target:
            return f"{target} cannot be created: {existing} is a file"
        # SQLite writes a journal beside its database, so that folder must be writable too.
        folders = [existing] if existing.is_dir() else [existing.parent]
        if existing.is_file() and not os.access(existing, os.W_OK):
            return f"the tracking store {existing} is read-only"
        for folder in folders:
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"the tracking store cannot write in {folder}: the folder is read-only"
    return None


def _check_server(uri: str, timeout: float) -> str | None:
    """One read call of MLflow's REST API; why it failed, or None."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    parsed = urlparse(uri)
    if not parsed.hostname:
        return f"tracking URI {uri!r} names no host"
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        return f"tracking URI {uri!r} has an invalid port"
    request = urllib.request.Request(
        uri.rstrip("/") + REST_PROBE,
        data=json.dumps({"max_results": 1}).encode("utf-8"),
        headers={"Content-Type": "application/json", **_auth_headers()},
        method="POST",
    )
    context = None
    if parsed.scheme == "https":
        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower()
        if insecure in ("1", "true", "yes"):
            context = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(
                cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
            )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = response.read(1_000_000)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return (
                f"the MLflow tracking server at {uri} refused access (HTTP {error.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
            )
        return (
            f"{uri} is not an MLflow tracking server: {REST_PROBE} answered HTTP {error.code} "
            f"{error.reason}"
        )
    except TimeoutError:
        return f"the tracking server at {uri} did not answer within {timeout:g} s"
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            return f"the tracking server at {uri} did not answer within {timeout:g} s"
        text = getattr(reason, "strerror", None) or str(reason)
        return f"cannot reach the MLflow tracking server at {uri}: {text}"
    except (OSError, ValueError) as error:  # connection reset, a malformed answer
        text = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return f"cannot reach the MLflow tracking server at {uri}: {text}"
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("experiments", []), list):
        return f"{uri} is not an MLflow tracking server: {REST_PROBE} did not answer MLflow JSON"
    return None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (from its environment variables)."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    return {}


def _check_database_server(uri: str, scheme: str, timeout: float) -> str | None:
    """The database driver is installed and the server accepts a connection."""
    import importlib.util

    dialect = uri.split(":", 1)[0]
    driver = dialect.split("+", 1)[1] if "+" in dialect else ""
    module = DRIVER_MODULES.get(driver.lower(), driver) if driver else DEFAULT_DRIVERS[scheme]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        package = DRIVER_PACKAGES.get(module, module)
        return (
            f"tracking URI {dialect}://… needs the database driver {module!r}, which is not "
            f"installed: pip install {package}"
        )
    parsed = urlparse(uri)
    host = parsed.hostname
    if not host:
        return None  # a local socket or a DSN in the query: the driver knows how to connect
    try:
        port = parsed.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return f"tracking URI {dialect}://… has an invalid port"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"cannot reach the database server {host}:{port} of the tracking URI: {reason}"
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def file_store_path(uri: str) -> Path | None:
    """The folder of a ``file://`` store URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


def is_local_store(uri: str) -> bool:
    return sqlite_path(uri) is not None or file_store_path(uri) is not None


def local_root(uri: str) -> Path:
    """The local folder of store `uri`'s own state: checkpoints, locks, artifacts, fingerprints.

    A database named ``mlflow.db`` is a store folder (like ``./mlruns``): that folder. Any other
    database ``x.db`` gets ``x.stackwise/`` beside it, so stores in one folder share nothing.
    A file store is its own folder; a remote store (an MLflow server, a database server) gets
    ``./mlruns/remote/<scheme>-<host>-<port>-<hash>/`` on this machine.
    """
    database = sqlite_path(uri)
    if database is not None:
        if database.name == DATABASE_NAME:
            return database.parent
        stem = database.stem if database.suffix == ".db" else database.name
        return database.with_name(f"{stem}{STATE_SUFFIX}")
    folder = file_store_path(uri)
    if folder is not None:
        return folder
    return Path.cwd().resolve() / DEFAULT_STORE_DIR / REMOTE_DIR / remote_store_name(uri)


def remote_store_name(uri: str) -> str:
    """A folder name for a remote store: readable parts plus a hash of the URI (no password)."""
    import hashlib

    parsed = urlparse(uri)
    netloc = parsed.hostname or ""
    try:
        port = parsed.port
    except ValueError:
        port = None
    public = parsed._replace(netloc=f"{netloc}:{port}" if port else netloc).geturl()
    parts = [parsed.scheme.split("+", 1)[0], netloc, str(port or ""), parsed.path.strip("/")]
    readable = "-".join(p for p in parts if p)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in readable)[:80]
    digest = hashlib.sha256(public.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}"


def artifact_root(uri: str) -> str | None:
    """Where artifacts of experiments created by StackWise go (None: the server decides)."""
    if sqlite_path(uri) is not None:
        return (local_root(uri) / ARTIFACTS_DIR).as_uri()
    return None


def experiment_artifact_location(uri: str, experiment_name: str) -> str | None:
    """The artifact location of a new experiment, or None to let MLflow choose."""
    root = artifact_root(uri)
    if root is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name)
    return f"{root}/{safe}"


def checkpoint_dir(uri: str, experiment_name: str, config_hash: str) -> Path:
    """Checkpoint folder of one grid point (by its config hash) of one experiment."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name)
    return local_root(uri) / CHECKPOINTS_DIR / safe / config_hash


def lock_path(uri: str, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return local_root(uri) / LOCKS_DIR / f"{safe}.lock"


def prepare_store(uri: str) -> None:
    """Create the local folders a store needs (called when a run starts, never on validation)."""
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        (local_root(uri) / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
    folder = file_store_path(uri)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)


def owner() -> str:
    """This process as the owner of a lock or a RUNNING run: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner_text: str) -> bool | None:
    """Whether the process `owner_text` (``host:pid``) still runs; None when it cannot be told
    from here (another host)."""
    host, _, pid = owner_text.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


class FileLock:
    """An advisory lock on a file (``flock``), released by the OS if the process dies; the file
    names its holder (``host:pid``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(handle)
            return False
        self._handle = handle
        # Who holds it, for people and tools reading the folder (the OS lock is what counts).
        with contextlib.suppress(OSError):
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"{owner()}\n".encode(), 0)
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """Whether another process holds the lock at `path` (without keeping it)."""
    if not path.exists():
        return False
    probe = FileLock(path)
    if probe.acquire(blocking=False):
        probe.release()
        return False
    return True


def is_lock_error(error: BaseException) -> bool:
    """Whether `error` is SQLite's "database is locked" (as raised, or inside MLflow's error)."""
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def retry_locked(
    action: Callable[[], T], attempts: int = 8, base_delay: float = 0.2, what: str = ""
) -> T:
    """Run `action`, retrying with jittered backoff while SQLite reports a lock.

    Any other error is raised at once; so is a lock error after `attempts` tries (about 25 s of
    waiting on top of MLflow's own busy timeout). Before each retry the garbage of store calls
    this process had cut short is collected (`release_interrupted_calls`): it may be what holds
    the lock.
    """
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:
            if not is_lock_error(error) or attempt == attempts - 1:
                raise
            gc.collect()
            time.sleep(base_delay * (2**attempt) * (0.5 + random.random()))
    raise RuntimeError(f"unreachable: {what}")  # pragma: no cover


def release_interrupted_calls(error: BaseException) -> None:
    """Let go of what the store calls `error` (Ctrl-C, a signal) cut short still hold.

    An interrupt that lands inside an MLflow call can leave that call's SQLite connection in a
    transaction, kept alive by the interrupt's traceback and by reference cycles until the
    garbage collector runs: the database stays locked for every process, this one included
    (which then cannot even mark its run KILLED). Clearing the finished frames of the traceback
    and collecting closes such connections.
    """
    traceback.clear_frames(error.__traceback__)
    gc.collect()


# Store writes on the way out of an interrupted run: a few tries, then a line saying why not
# (the next run of the grid closes what is left RUNNING).
INTERRUPTED_ATTEMPTS = 3


def end_run_or_say_why(
    client: MlflowClient, run_id: str, status: str, attempts: int = INTERRUPTED_ATTEMPTS
) -> str | None:
    """Mark run `run_id` `status`, retrying while the store is locked (`retry_locked`, bounded by
    `attempts`); None when it is marked, else one line saying why it is not."""
    try:
        retry_locked(lambda: client.set_terminated(run_id, status=status), attempts=attempts)
    except Exception as error:
        if not is_lock_error(error):
            raise
        return (
            f"run {run_id} could not be marked {status}: the tracking store stayed locked by "
            f"another process through {attempts} tries (database is locked); the next run of "
            "this grid closes it"
        )
    return None


# -- a tracking server that stops answering ------------------------------------------------------
# MLflow's client retries every request itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default,
# with exponential backoff: about 4 minutes of refused connections). What is still unanswered
# after that stops a run the way Ctrl-C does, as `TrackingUnavailable`; step metrics are buffered
# and resent by `stackwise.tracking.metric_writer.MetricWriter` until `tracking.server_wait_minutes`.

EXIT_TRACKING_UNAVAILABLE = 75  # EX_TEMPFAIL: a temporary failure; run the command again


class TrackingUnavailable(KeyboardInterrupt):
    """The tracking server stopped answering for longer than a run may wait.

    A KeyboardInterrupt, so every layer does what it does for Ctrl-C: the trainer writes a
    checkpoint, the runner marks the runs KILLED (as far as the server lets it) and the command
    stops; a rerun resumes. `details` collects what the layers did (checkpoint, unsent metrics).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[str] = []

    def __str__(self) -> str:
        return "; ".join([self.message, *self.details])


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable_reason(error: BaseException) -> str | None:
    """Why the tracking server did not take a request, when `error` says it could not be reached
    (refused or lost connections, timeouts, or 429/5xx answers until MLflow's client stopped
    retrying); None for any other error (a bad request, a deleted run, a local store)."""
    import requests

    for cause in _causes(error):
        if isinstance(cause, requests.exceptions.Timeout | TimeoutError):
            return "no answer in time"
        if isinstance(cause, requests.exceptions.RetryError):
            return "it kept answering with errors (HTTP 429/5xx)"
        if isinstance(cause, requests.exceptions.ConnectionError | ConnectionError):
            text = str(cause).lower()
            return "connection refused" if "refused" in text else "connection lost"
    return None


def server_gone(uri: str, error: BaseException) -> TrackingUnavailable:
    """The stop for a store call that failed because the server at `uri` could not be reached
    even with MLflow's retries (`unreachable_reason`)."""
    return TrackingUnavailable(
        f"the tracking server {uri} did not answer ({unreachable_reason(error)}) though MLflow's "
        "client retried (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR)"
    )


def end_run_if_reachable(client: MlflowClient, uri: str, run_id: str, status: str) -> bool:
    """Mark run `run_id` `status` if the store takes it at once; whether it did. For a run on
    its way out because the server is gone: it must not wait out MLflow's retries again, so a
    server is asked one quick question first (`check_tracking_uri`'s)."""
    if urlparse(uri).scheme in ("http", "https") and _check_server(uri, 2.0) is not None:
        return False
    return try_briefly(lambda: client.set_terminated(run_id, status=status))


def try_briefly(action: Callable[[], object], seconds: float = 5.0) -> bool:
    """Run `action` (a store call) for at most `seconds`; whether it completed. An action still
    waiting goes on in a daemon thread and dies with the process."""
    import threading

    done: list[bool] = []

    def attempt() -> None:
        with contextlib.suppress(Exception):
            action()
            done.append(True)

    thread = threading.Thread(target=attempt, name="stackwise-store-attempt", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(done)


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`, with the store's tables created under a lock.

    Two processes opening a fresh SQLite store at once would both try to create the schema;
    the lock makes the second one find it in place.
    """
    from mlflow import MlflowClient

    if sqlite_path(uri) is None:
        return MlflowClient(tracking_uri=uri)
    prepare_store(uri)
    with FileLock(lock_path(uri, "store-init")):
        # Creating the client may already build the store; touching it makes sure the tables
        # exist before the lock is released.
        client = retry_locked(lambda: MlflowClient(tracking_uri=uri), what="open store")
        retry_locked(lambda: client.search_experiments(max_results=1), what="open store")
    return client


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses, and
# opens experiments without traces in the GenAI view. StackWise experiments train models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created (with its artifact location) if it does not exist.

    The experiment is marked a model-training experiment (`EXPERIMENT_KIND_TAG`), so the MLflow
    UI opens it on its training-runs view; an existing one without the tag gets it. Creation
    races with other processes are settled by a file lock for local stores and by re-reading
    after a failed create for remote ones.
    """
    existing = retry_locked(lambda: client.get_experiment_by_name(name))
    if existing is not None:
        experiment_id = str(existing.experiment_id)
        if existing.lifecycle_stage == "deleted":
            retry_locked(lambda: client.restore_experiment(experiment_id))
        if EXPERIMENT_KIND_TAG not in existing.tags:
            retry_locked(
                lambda: client.set_experiment_tag(
                    experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            )
        return experiment_id
    lock: contextlib.AbstractContextManager[object] = (
        FileLock(lock_path(uri, "experiments")) if is_local_store(uri) else contextlib.nullcontext()
    )
    with lock:
        existing = retry_locked(lambda: client.get_experiment_by_name(name))
        if existing is not None:
            return str(existing.experiment_id)
        try:
            return str(
                retry_locked(
                    lambda: client.create_experiment(
                        name,
                        artifact_location=experiment_artifact_location(uri, name),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                    )
                )
            )
        except Exception:
            again = retry_locked(lambda: client.get_experiment_by_name(name))
            if again is None:
                raise
            return str(again.experiment_id)


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by model logging) at `uri` for the duration."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
