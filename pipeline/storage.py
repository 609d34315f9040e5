"""The one module that knows about storage: URLs in, bytes and file objects out.

Every other module takes URLs (a local path, ``file://...`` or ``s3://bucket/key``) and calls
the functions here. S3 credentials come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN``) or, without them, from the standard
AWS credential chain (shared credentials file, profile, web identity/IRSA, container and
instance roles), never from config; the endpoint from ``AWS_ENDPOINT_URL`` and the region
from ``AWS_REGION``; they never appear in messages.

Transient failures (connection errors, timeouts, 5xx, throttling) are retried with
exponential backoff, a bounded number of times; everything else fails at once with a one-line
:class:`StorageError` naming the URL.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import http.client
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from pipeline.errors import ConfigError, PipelineError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.5  # seconds before the first retry, doubled per retry
MAX_BACKOFF = 8.0
TMP_MARK = ".tmp-"  # temp keys are ".{name}.tmp-{uuid}" next to the final key

_SECRET_OPTIONS = {
    "key",
    "secret",
    "token",
    "password",
    "username",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
}
# Matched by class name over the MRO so botocore/aiohttp need not be imported here.
_TRANSIENT_NAMES = {
    "ConnectionError",
    "HTTPClientError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ClientPayloadError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "IncompleteRead",
    "FSTimeoutError",
    "TimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",  # botocore: the body ended before its Content-Length
}
_TRANSIENT_ERRNOS = {
    errno.EREMOTEIO,
    errno.EBUSY,
    errno.EIO,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
}
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


class StorageError(PipelineError):
    """A storage operation failed for good: missing bucket/object, denied, or unreachable."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: connection drops, timeouts, 5xx, throttling."""
    if isinstance(exc, _PERMANENT):
        return False
    if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
        return True
    status = getattr(exc, "response", None) or {}
    if isinstance(status, dict):  # botocore ClientError that s3fs did not translate
        code = status.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code >= 500 or status.get("Error", {}).get("Code") in ("SlowDown", "Throttling"):
            return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def endpoint_of(url: str) -> str:
    """The endpoint a URL's requests go to (for messages; never credentials)."""
    return _endpoint(url) or "the local filesystem"


def _endpoint(url: str) -> str:
    if _protocol(url) in ("s3", "s3a"):
        return os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    return ""


def describe_error(exc: BaseException, url: str) -> str:
    """One line naming the URL and what went wrong (never credentials)."""
    if isinstance(exc, StorageError):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower():
            return f"{url}: bucket {_bucket(url)!r} does not exist ({text})"
        return f"{url}: no such file or object"
    if isinstance(exc, PermissionError):
        hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" if _bucket(url) else ""
        return f"{url}: access denied{hint}: {text}"
    where = f" at {_endpoint(url)}" if _endpoint(url) else ""
    return f"{url}{where}: {type(exc).__name__}: {text}"


def retry_call(
    fn: Callable[[], T],
    url: str,
    what: str = "access",
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> T:
    """Call ``fn()``; retry transient errors ``retries`` times with doubling backoff.

    Raises:
        StorageError: a permanent error, or a transient one that outlived the retries.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if isinstance(e, (StorageError, ConfigError)):
                raise
            if not is_transient(e):
                raise StorageError(f"cannot {what} {describe_error(e, url)}") from e
            if attempt == retries:
                raise StorageError(
                    f"cannot {what} {describe_error(e, url)} (gave up after {retries + 1} attempts)"
                ) from e
            delay = min(backoff * 2**attempt, MAX_BACKOFF)
            log.warning(
                "transient error on %s (%s), retry %d/%d in %.1fs",
                url,
                type(e).__name__,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def process_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for worker processes of a process that uses storage.

    s3fs runs an asyncio loop in a thread of this process. A ``fork``ed child shares that
    loop's epoll instance and sockets, and the parent's loop can then miss responses that
    already arrived (seen here: S3 calls stalling 60 s after a DataLoader or Pool forked).
    ``forkserver`` children fork from a clean server process instead; the server imports
    ``__main__`` (as multiprocessing's default does: scripts need an ``if __name__ ==
    "__main__":`` guard) and ``preload`` once, so each worker starts in milliseconds. Such
    children start with the server's environment: run :func:`inherit_environ` in each.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


def inherit_environ(environ: dict[str, str]) -> None:
    """Make ``os.environ`` the given parent's (credentials set after the server started)."""
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


# ---------------------------------------------------------------------------- filesystems


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


SCHEMES = ("file", "local", "s3", "s3a")  # a plain path is "file"


def check_url(url: str, key: str = "") -> None:
    """Raise unless ``url`` is a local path, ``file://`` or ``s3://``: the schemes whose
    credentials and errors this module handles. :func:`get_fs` asks here (a
    :class:`StorageError`), and so do the configs at load time, naming their ``key`` (a
    :class:`ConfigError`)."""
    if _protocol(url) not in SCHEMES:
        msg = (
            f"{url}: unsupported URL scheme {_protocol(url)!r} "
            "(expected a local path, file://... or s3://bucket/key)"
        )
        raise ConfigError(key, msg) if key else StorageError(msg)


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0] if _protocol(url) in ("s3", "s3a") else ""


# What botocore's default credential chain reads, in its order (for the error message), and
# the variables that change its answer (a found chain is remembered per their values).
CREDENTIAL_CHAIN = (
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials and config files "
    "(AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_PROFILE), web identity/IRSA "
    "(AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN), container and instance roles"
)
_CHAIN_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
)
_chain_found: set[tuple] = set()


def _check_credential_chain(url: str) -> None:
    """Raise unless botocore's default credential chain resolves credentials. s3fs then
    resolves them itself, so temporary ones (IRSA, instance roles) keep being refreshed."""
    env = tuple(os.environ.get(k) for k in _CHAIN_ENV)
    if env in _chain_found:
        return
    import botocore.session

    try:
        found = botocore.session.Session().get_credentials() is not None
    except Exception as e:  # a missing profile, a partial or unreadable credential source
        raise StorageError(
            f"{url}: the AWS credential chain failed ({type(e).__name__}: {first_line(e, 200)})"
        ) from None
    if not found:
        raise StorageError(f"{url}: no S3 credentials found (tried {CREDENTIAL_CHAIN})")
    _chain_found.add(env)


def _s3_options(url: str, options: dict) -> dict:
    opts = dict(options)
    if not opts.get("anon"):
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            opts.update(key=key, secret=secret)
            if os.environ.get("AWS_SESSION_TOKEN"):
                opts["token"] = os.environ["AWS_SESSION_TOKEN"]
        else:
            _check_credential_chain(url)
    client = dict(opts.pop("client_kwargs", {}))
    if os.environ.get("AWS_ENDPOINT_URL"):
        client["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client.setdefault("region_name", region)
    opts["client_kwargs"] = client
    # Bounded botocore behaviour: our retry_call owns the retry policy, so a dead endpoint
    # fails in seconds instead of botocore's long default chain.
    config = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 1}}
    opts["config_kwargs"] = {**config, **opts.get("config_kwargs", {})}
    opts.setdefault("use_listings_cache", False)
    return opts


def _options(url: str, storage_options: dict | None) -> dict:
    """``storage_options`` checked (no credentials) and, for S3, completed from the
    environment (:func:`_s3_options`)."""
    check_url(url)
    options = dict(storage_options or {})
    secret = sorted(k for k in options if k.lower() in _SECRET_OPTIONS)
    if secret:
        raise ConfigError(
            "storage_options",
            f"credentials must come from the environment, not config (remove {', '.join(secret)})",
        )
    return _s3_options(url, options) if _protocol(url) in ("s3", "s3a") else options


def get_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it.

    Args:
        url: a local path, ``file://...`` or ``s3://bucket/key``.
        storage_options: non-secret fsspec options (e.g. ``{"anon": True}``).

    Raises:
        ConfigError: ``storage_options`` holds a credential.
        StorageError: an unsupported scheme, or no S3 credentials in the environment or
            the AWS credential chain.
    """
    options = _options(url, storage_options)
    if _protocol(url) in ("s3", "s3a"):
        fs = _remote_fs(_protocol(url), options)
        return fs, fs._strip_protocol(url)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: unsupported URL ({e})") from None


# One remote filesystem (and so one S3 client, its connection pool and credential refresher)
# per process and set of options, created on first use and reused by every later call, from
# any thread. Keyed by pid (a forked child builds its own rather than share the parent's
# loop) and by the variables that steer the credential chain (other keys, another client).
_remote: dict[str, Any] = {}
_remote_lock = threading.Lock()
_remote_created: Counter = Counter()
_remote_preloaded: Counter = Counter()  # of those, built on preload_s3_models()' models
_remote_forked: Counter = Counter()  # of those, taken from preload_s3_client() before a fork


def _remote_fs(protocol: str, options: dict) -> Any:
    chain = [os.environ.get(k) for k in _CHAIN_ENV]
    token = fsspec.utils.tokenize(os.getpid(), protocol, options, chain)
    with _remote_lock:
        fs = _remote.get(token)
        if fs is None:
            session = _s3_session(options) if protocol in ("s3", "s3a") else None
            extra = {"session": session} if session is not None else {}
            try:
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options, **extra)
            except (ImportError, ValueError) as e:
                raise StorageError(f"{protocol}://: unsupported URL ({e})") from None
            _remote[token] = fs
            _remote_created[os.getpid()] += 1
            _remote_preloaded[os.getpid()] += session is not None
        return fs


# botocore's S3 models (service, endpoint rules, partitions: ~0.15 s of JSON parsing), loaded
# once by preload_s3_models() in a process that forks workers, as (data_path, loader).
_warm_models: tuple[Any, Any] | None = None


def preload_s3_models() -> None:
    """Parse botocore's S3 models now, in this process, for every S3 client made later here
    or in a child forked from it (the forkserver calls this: :mod:`pipeline.data.preload`).

    A loader worker creates its S3 client at its first shard, and every epoch starts new
    workers: with the models already parsed that takes ~0.05 s instead of ~0.2 s (measured
    on 2 cores; docs/PERFORMANCE.md). Only the parsed files are shared; each client still
    gets its own session, credentials and connection pool. Never raises: without it a
    client simply loads the models itself.
    """
    global _warm_models
    try:
        import botocore.loaders
        import botocore.session

        data_path = botocore.session.Session().get_config_variable("data_path")
        loader = botocore.loaders.create_loader(data_path)
        for kind in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model("s3", kind)
        for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
            loader.load_data(name)
        _warm_models = (data_path, loader)
    except Exception as e:  # an old or patched botocore: clients load their models
        log.debug("S3 models not preloaded: %s", first_line(e, 200))


def _s3_session(options: dict) -> Any:
    """A new aiobotocore session that reads the preloaded models, or None (s3fs makes its
    own). Built from the options s3fs would build it from, so a ``profile`` still applies."""
    if _warm_models is None:
        return None
    import inspect

    import s3fs
    from aiobotocore.session import AioSession

    own = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters)
    fsspec_own = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
    session_kwargs = {k: v for k, v in options.items() if k not in own | fsspec_own}
    try:
        session = AioSession(**session_kwargs)
        data_path, loader = _warm_models
        if session.get_config_variable("data_path") != data_path:  # AWS_DATA_PATH changed
            return None
    except Exception:  # let s3fs build its session and report the problem itself
        return None
    session.register_component("data_loader", loader)
    return session


def clients_created(preloaded: bool = False, forked: bool = False) -> int:
    """S3 clients this process has created: remote filesystems (each holds one client) and
    :func:`open_object` clients, each reused. ``preloaded``: only those that read
    :func:`preload_s3_models`' models; ``forked``: only those :func:`preload_s3_client` built
    before this process was forked (taken, not built, here)."""
    counter = _remote_forked if forked else _remote_preloaded if preloaded else _remote_created
    return counter[os.getpid()]


# The s3fs options a plain botocore client reproduces: s3fs makes the same create_client
# call from them. With any other option (requester_pays, sse_kms_key_id, ...) shard reads go
# through s3fs, which knows it.
_OBJECT_OPTIONS = {"key", "secret", "token", "anon", "client_kwargs", "config_kwargs"}
_OBJECT_IGNORED = {"use_listings_cache", "listings_expiry_time", "skip_instance_cache"}
_object_clients: dict[tuple[int, str], Any] = {}  # (pid, options' token): that process's
# token: (an unused client, the pid it was made in, whether on the preloaded models)
_forked_clients: dict[str, tuple[Any, int, bool]] = {}


class ObjectStream:
    """One S3 object read from byte ``start`` to its end, or to byte ``end`` (exclusive), with
    one GET (``Range`` where ``start`` > 0 or ``end`` is given) through a synchronous botocore
    client.

    The GET is sent at the first :meth:`read`, in the caller's thread (a read-ahead thread),
    and the body is read straight from the socket by ``http.client`` under urllib3 (each
    ``read(n)`` one allocation filled from the kernel; urllib3's own ``read`` passes every
    chunk through its buffer as well): no event loop, no read-ahead cache. Its length is checked against the
    response's ``Content-Length``, and the connection goes back to the client's pool at the
    end. An in-process 60,000-image Fashion-MNIST epoch (139 MB) costs ~0.07 CPU-s more than
    from local shards, against ~0.3 through s3fs's streamed file (docs/PERFORMANCE.md).

    A transient error (a cut connection, a timeout, 5xx, throttling) is retried as s3fs
    retries a request, ``retries`` times in a row with a short backoff: the GET is sent again
    for the bytes not read yet (``Range``, ``If-Match`` the first response's ETag, so the
    object cannot change under the reader); bytes read since start the count again, so a long
    shard survives any number of cuts that each let it progress. Past that it raises, as do
    other errors, s3fs's way: a missing key ``FileNotFoundError``, a refused one
    ``PermissionError``.
    """

    BACKOFF = 0.1  # seconds before the first retry, doubled per retry

    def __init__(
        self,
        client: Any,
        url: str,
        retries: int = DEFAULT_RETRIES - 1,
        start: int = 0,
        end: int | None = None,
    ):
        self.client, self.url, self.retries, self.end = client, url, retries, end
        self.bucket, _, self.key = url.split("://", 1)[1].partition("/")
        self.body, self.pos, self.etag, self.failures, self.eof = None, start, "", 0, False
        self.raw: http.client.HTTPResponse | None = None  # the body's socket reader
        self.left = 0  # bytes the current response has yet to deliver

    def _get(self) -> None:
        from botocore.exceptions import ClientError

        if self.end is not None and self.pos >= self.end:
            self.eof = True
            return
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.end is not None:
            extra["Range"] = f"bytes={self.pos}-{self.end - 1}"
        if self.etag:
            extra["IfMatch"] = self.etag
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key, **extra)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":  # nothing left
                self.eof = True
                return
            if is_transient(e):
                raise
            from s3fs.errors import translate_boto_error

            raise translate_boto_error(e) from e
        self.body, self.etag = response["Body"], self.etag or response.get("ETag", "")
        self.left = response.get("ContentLength")
        # botocore's StreamingBody wraps urllib3's response (never decoding it), which wraps
        # http.client's; another layout (a newer botocore), or no length, reads the body
        fp = getattr(getattr(self.body, "_raw_stream", None), "_fp", None)
        known = isinstance(fp, http.client.HTTPResponse) and isinstance(self.left, int)
        self.raw = fp if known else None

    def _read(self, n: int) -> bytes:
        from botocore.exceptions import IncompleteReadError

        if self.raw is None:
            return self.body.read(None if n < 0 else n)
        data = self.raw.read(None if n < 0 else n)
        if not data and self.left and n:  # http.client returns b"" when the server hangs up
            expected = self.pos + self.left
            raise IncompleteReadError(actual_bytes=self.pos, expected_bytes=expected)
        self.left -= len(data)
        if not self.left:
            self.body._raw_stream.release_conn()  # read to the end: the connection is reusable
        return data

    def read(self, n: int = -1) -> bytes:
        while not self.eof:
            try:
                if self.body is None:
                    self._get()
                    continue
                data = self._read(n)
            except Exception as e:
                if not is_transient(e) or self.failures >= self.retries:
                    raise
                self.close()
                self.body = self.raw = None
                time.sleep(self.BACKOFF * 2**self.failures)
                self.failures += 1
                continue
            self.pos += len(data)
            self.eof, self.failures = not data, 0
            return data
        return b""

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


def open_object(
    url: str, storage_options: dict | None = None, start: int = 0, end: int | None = None
) -> ObjectStream | None:
    """A one-GET reader (:class:`ObjectStream`) of the S3 object at ``url`` from byte
    ``start`` up to ``end`` (None: its end), through this process's client for these options,
    or None where s3fs must read it (a local URL, or an option a plain botocore client does not
    reproduce)."""
    if _protocol(url) not in ("s3", "s3a"):
        return None
    options = _options(url, storage_options)  # the same checks and options as get_fs'
    if set(options) - _OBJECT_OPTIONS - _OBJECT_IGNORED:
        return None
    token, pid = _object_token(options), os.getpid()
    with _remote_lock:
        client = _object_clients.get((pid, token))
        if client is None:
            forked = _forked_clients.pop(token, None)
            if forked is not None and forked[1] != pid:  # made before this process forked
                client, _, preloaded = forked
                _remote_created[pid] += 1
                _remote_preloaded[pid] += preloaded
                _remote_forked[pid] += 1
            else:
                client = _object_client(options)
            _object_clients[(pid, token)] = client
    return ObjectStream(client, url, start=start, end=end)


def _object_token(options: dict) -> str:
    chain = [os.environ.get(k) for k in _CHAIN_ENV]
    return fsspec.utils.tokenize({k: options.get(k) for k in _OBJECT_OPTIONS}, chain)


def preload_s3_client() -> None:
    """Build, in this process, the client :func:`open_object` needs for S3 URLs without
    storage options (keys from the environment), and leave it unused: a process forked from
    this one (the forkserver calls this: :mod:`pipeline.data.preload`) takes it at its first
    shard instead of building one, ~15 ms less before each loader worker's first batch, every
    epoch. A copy is only ever used by one forked process, never by this one: its connection
    pool is still empty at the fork. Without keys in the environment (the credential chain,
    which may ask the network) it does nothing; it never raises.
    """
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return
    try:
        options = _options("s3://preload", None)
        token, pid = _object_token(options), os.getpid()
        preloaded = _remote_preloaded[pid]
        client = _object_client(options)
        _forked_clients[token] = (client, pid, _remote_preloaded[pid] > preloaded)
    except Exception as e:  # a worker builds its own
        log.debug("S3 client not preloaded: %s", first_line(e, 200))


def _object_client(options: dict) -> Any:
    """The botocore S3 client s3fs would build from ``options`` (its ``set_session``)."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    session = botocore.session.Session()
    data_path = session.get_config_variable("data_path")
    preloaded = _warm_models is not None and data_path == _warm_models[0]
    if preloaded:
        session.register_component("data_loader", _warm_models[1])
    # copies: botocore's Config rewrites a ``retries`` dict it is given in place
    config = copy.deepcopy(options.get("config_kwargs") or {})
    kwargs = copy.deepcopy(options.get("client_kwargs") or {})
    if options.get("anon"):
        config["signature_version"] = UNSIGNED
        for arg in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            kwargs.pop(arg, None)
    else:
        for opt, arg in (
            ("key", "aws_access_key_id"),
            ("secret", "aws_secret_access_key"),
            ("token", "aws_session_token"),
        ):
            if options.get(opt) is not None:
                kwargs.setdefault(arg, options[opt])
    client = session.create_client("s3", config=Config(**config), **kwargs)
    _remote_created[os.getpid()] += 1
    _remote_preloaded[os.getpid()] += preloaded
    return client


def is_local(url: str) -> bool:
    """Whether ``url`` is on the local filesystem (a path or ``file://``)."""
    return _protocol(url) in ("file", "local")


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def join(url: str, *parts: str) -> str:
    """``join("s3://b/data", "train", "x.tar") == "s3://b/data/train/x.tar"``."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


# ---------------------------------------------------------------------------- operations


def open_url(
    url: str,
    mode: str = "rb",
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    **open_kwargs: Any,
) -> IO:
    """Open ``url`` (retrying transient errors on open); the caller closes it.

    For reads, later transient errors surface from ``read()``; callers that stream (the
    shard reader) reopen and skip ahead themselves.
    """
    fs, path = get_fs(url, storage_options)
    if "w" in mode and _is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    return retry_call(lambda: fs.open(path, mode, **open_kwargs), url, "open", retries, backoff)


def read_bytes(
    url: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> bytes:
    """The whole object at ``url``."""
    fs, path = get_fs(url, storage_options)
    return retry_call(lambda: fs.cat_file(path), url, "read", retries, backoff)


def exists(
    url: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> bool:
    fs, path = get_fs(url, storage_options)
    return retry_call(lambda: fs.exists(path), url, "check", retries, backoff)


def size(
    url: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> int:
    fs, path = get_fs(url, storage_options)
    return int(retry_call(lambda: fs.size(path), url, "stat", retries, backoff))


def listdir(
    url: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> list[str]:
    """Sorted base names directly under ``url``; ``[]`` if it does not exist."""
    fs, path = get_fs(url, storage_options)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError as e:
            if _bucket(url) and "bucket" in str(e).lower():
                raise
            return []
        return sorted({basename(e) for e in entries if e.rstrip("/") != path.rstrip("/")})

    return retry_call(ls, url, "list", retries, backoff)


def remove(
    url: str,
    storage_options: dict | None = None,
    missing_ok: bool = True,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> None:
    fs, path = get_fs(url, storage_options)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    retry_call(rm, url, "remove", retries, backoff)


@contextlib.contextmanager
def atomic_write(
    url: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> Iterator[IO]:
    """Write ``url`` so no reader ever sees it half-written.

    Yields a binary file that writes ``.{name}.tmp-{uuid}`` next to ``url``; on a clean exit
    the temp object is published under its final name (``os.replace`` locally, server-side
    copy + delete on S3). On an exception the temp object is removed and ``url`` untouched.
    """
    fs, path = get_fs(url, storage_options)
    name = basename(path)
    tmp = f"{fs._parent(path)}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    if _is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    published = False
    try:
        with retry_call(lambda: fs.open(tmp, "wb"), url, "write", retries, backoff) as f:
            yield f
        retry_call(lambda: fs.mv(tmp, path), url, "publish", retries, backoff)
        published = True
    except Exception as e:
        if isinstance(e, PipelineError) or not isinstance(e, OSError):
            raise
        raise StorageError(f"cannot write {describe_error(e, url)}") from e
    finally:
        if not published:
            with contextlib.suppress(Exception):
                fs.rm_file(tmp)


def put_atomic(
    url: str,
    data: bytes,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> None:
    """Write ``data`` to ``url`` atomically (see :func:`atomic_write`), retrying as a whole."""

    def put() -> None:
        with atomic_write(url, storage_options, retries=0) as f:
            f.write(data)

    def attempt() -> None:
        try:
            put()
        except StorageError as e:  # re-expose the cause so retry_call can classify it
            raise (e.__cause__ or e) from None

    retry_call(attempt, url, "write", retries, backoff)


def download_dir(
    url: str,
    local_dir: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> str:
    """The files under ``url`` as a local folder: ``url`` itself if local, else a recursive
    copy into ``local_dir`` (returned)."""
    fs, path = get_fs(url, storage_options)
    if _is_local(fs):
        if not fs.isdir(path):
            raise StorageError(f"{url}: no such folder")
        return path

    def get() -> None:
        if not fs.isdir(path):
            raise FileNotFoundError(path)
        fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)

    retry_call(get, url, "download", retries, backoff)
    return local_dir
