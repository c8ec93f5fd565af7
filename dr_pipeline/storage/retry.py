"""Retries for storage I/O: exponential backoff with full jitter, and which errors deserve one.

Every error falls in one of three kinds:

- **transient** - HTTP 5xx / 408 / 429, throttling (``SlowDown``), timeouts, dropped
  connections, EIO-style I/O errors: the call is retried here with backoff + jitter;
- **permanent** - 4xx such as 403 / 404, ``FileNotFoundError``, ``PermissionError``, missing
  credentials, a read-only or full disk: never retried (not here, not as a shard retry);
  raised as ``PermanentError`` naming what failed, so the job reports it at once;
- **anything else** (a corrupt shard, a bug) - not retried here; the runner retries the
  whole shard a bounded number of times and then reports it.

The kind is read from the whole exception chain (``__cause__`` / ``__context__``), so a
reader's ``ShardReadError`` raised *from* a ``FileNotFoundError`` counts as permanent and an
``OSError(EIO)`` raised from an HTTP 500 counts as transient; a permanent link wins.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT, PERMANENT = "transient", "permanent"


class PermanentError(RuntimeError):
    """An error no retry can fix (403, 404, bad credentials, ...). The message names what failed.

    It holds only a message, so it survives pickling across Ray processes (an exception's
    ``__cause__`` does not) and the driver can tell it from a retryable failure.
    """


class RetriesExhausted(RuntimeError):
    """A transient error that did not go away within the retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # calls in all (1 = no retry)
    base_s: float = 0.5  # first backoff ceiling; doubles per attempt
    cap_s: float = 20.0  # longest single wait

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] (AWS architecture blog)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


DEFAULT_POLICY = RetryPolicy()

# ---------------------------------------------------------------------------- classification

_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EINVAL,
}
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EREMOTEIO,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.EBUSY,
    errno.ESTALE,
    errno.EINTR,
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "TooManyRequests",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "OperationAborted",
}
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "NoSuchKey",
    "NotFound",
    "InvalidBucketName",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}
# client-library errors that mean "the request never got a usable answer" (retry), and the
# ones that mean "this can never work" (do not); matched by class name along the MRO
_TRANSIENT_NAMES = {
    "HTTPClientError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ProxyConnectionError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ClientConnectionError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "IncompleteRead",
    "RemoteDisconnected",
    "ProtocolError",
    "ChunkedEncodingError",
    "ResponseParserError",
    "FSTimeoutError",
}
_PERMANENT_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "ParamValidationError",
    "NoRegionError",
    "UnknownServiceError",
    "InvalidConfigError",
    "ProfileNotFound",
}


def http_status(e: BaseException) -> int | None:
    """The HTTP status an exception carries (botocore ClientError, aiohttp, gcsfs, requests), if any."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599:
            return v
    v = getattr(resp, "status_code", None)
    return v if isinstance(v, int) and 100 <= v <= 599 else None


def _error_code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _kind_of(e: BaseException) -> str | None:
    """The kind one exception says by itself (None: it does not say)."""
    if isinstance(e, PermanentError):
        return PERMANENT
    if isinstance(e, RetriesExhausted):
        return None
    names = {c.__name__ for c in type(e).__mro__}
    if names & _PERMANENT_NAMES:
        return PERMANENT
    if isinstance(e, _PERMANENT_TYPES):
        return PERMANENT
    code = _error_code(e)
    if code in _PERMANENT_CODES:
        return PERMANENT
    if code in _TRANSIENT_CODES:
        return TRANSIENT
    status = http_status(e)
    if status is not None:
        if status in (408, 429) or status >= 500:
            return TRANSIENT
        if 400 <= status < 500:
            return PERMANENT
    if names & _TRANSIENT_NAMES or isinstance(e, (TimeoutError, ConnectionError)):
        return TRANSIENT
    if isinstance(e, OSError) and e.errno is not None:
        # an errno-less OSError is often a decoder's complaint (pyarrow raises OSError on corrupt data)
        if e.errno in _PERMANENT_ERRNOS:
            return PERMANENT
        if e.errno in _TRANSIENT_ERRNOS:
            return TRANSIENT
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
    return out


def classify(e: BaseException) -> str | None:
    """``"permanent"``, ``"transient"`` or None (neither: a data error or a bug)."""
    kinds = [_kind_of(x) for x in _chain(e)]
    if PERMANENT in kinds:
        return PERMANENT
    return TRANSIENT if TRANSIENT in kinds else None


def is_permanent(e: BaseException) -> bool:
    return classify(e) == PERMANENT


def describe(e: BaseException) -> str:
    """``Type: message`` plus the HTTP status and error code found anywhere in the chain."""
    # our own wrappers' messages already read "what: Type: message"
    msg = str(e) if type(e) in (PermanentError, RetriesExhausted) else f"{type(e).__name__}: {e}"
    chain = _chain(e)
    status = next((s for s in map(http_status, chain) if s is not None), None)
    code = next((c for c in map(_error_code, chain) if c is not None), None)
    if code == str(status):  # a HEAD error has no body: botocore uses the status as the code
        code = None
    extra = " ".join(x for x in (f"HTTP {status}" if status is not None else "", code or "") if x and x not in msg)
    return f"{msg} ({extra})" if extra else msg


def redact_url(url: str) -> str:
    """A URL safe for logs: no ``user:password@`` and no query string (signed URLs carry keys there)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------------------- retrying


def retry_call(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()``; retry transient errors with exponential backoff + full jitter.

    Permanent errors raise ``PermanentError("{what}: {Type}: {message}")`` at once; errors of
    neither kind propagate unchanged on the first failure; a transient error still failing
    after ``policy.attempts`` calls raises ``RetriesExhausted``.
    """
    policy = policy or DEFAULT_POLICY
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except PermanentError:
            raise
        except Exception as e:
            kind = classify(e)
            if kind == PERMANENT:
                raise PermanentError(f"{what}: {describe(e)}") from e
            if kind != TRANSIENT:
                raise
            if attempt >= policy.attempts:
                raise RetriesExhausted(f"{what}: still failing after {attempt} attempts: {describe(e)}") from e
            wait = policy.delay(attempt, rng)
            log.warning(
                "%s: transient error (attempt %d/%d), retrying in %.2fs: %s",
                what,
                attempt,
                policy.attempts,
                wait,
                describe(e),
            )
            sleep(wait)
    raise AssertionError("unreachable")


__all__ = [
    "DEFAULT_POLICY",
    "PermanentError",
    "RetriesExhausted",
    "RetryPolicy",
    "classify",
    "describe",
    "http_status",
    "is_permanent",
    "redact_url",
    "retry_call",
]
