"""Reads from HTTP and S3 stores: transient failures retried (bounded), an unreachable store told apart
from a damaged archive.

A dropped connection, a timeout or a 5xx answer says nothing about the archive's bytes, so such a
read is retried with backoff (RETRY_DELAYS); if it keeps failing, StoreAccessError says the store
could not be reached, never that the archive is damaged. A refused request (401/403) is not retried:
it is an access problem, reported as such. Anything else (a checksum or decoding failure) passes
through unchanged, for the reader to report as damage.
"""
from __future__ import annotations

import asyncio
import errno
import logging

from zarr.storage import WrapperStore

from .schema import ArchiveError

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds before each retry: 5 attempts, about 4 s in all
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REFUSED_STATUS = frozenset({401, 403})
TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE})


class StoreAccessError(ArchiveError):
    """The store holding an archive could not be reached or refused access; the archive may be intact."""


def _optional_classes() -> tuple[type[BaseException], ...]:
    """Transport-level errors of the optional remote backends (aiohttp for HTTP, botocore for S3)."""
    found: list[type[BaseException]] = []
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        from botocore import exceptions as boto

        found += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(found)


_TRANSPORT = (asyncio.TimeoutError, TimeoutError, ConnectionError) + _optional_classes()


def _status(exc: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ClientResponseError, botocore's ClientError), if any."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def classify(exc: BaseException) -> str | None:
    """'transient' (worth retrying), 'refused' (access denied) or None (not a transport problem)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        status = _status(e)
        if status in RETRY_STATUS:
            return "transient"
        if status in REFUSED_STATUS or isinstance(e, PermissionError):
            return "refused"
        if isinstance(e, _TRANSPORT) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
            return "transient"
    return None


class RetryingStore(WrapperStore):
    """A read-only remote store whose reads retry transient failures, then raise StoreAccessError."""

    def __init__(self, store, location: str = "the remote store"):
        super().__init__(store)
        self.location = location

    def _with_store(self, store):
        return type(self)(store, self.location)

    async def _retry(self, what: str, call):
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                return await call()
            except Exception as exc:
                kind = classify(exc)
                if kind is None:
                    raise
                if kind == "refused":
                    raise StoreAccessError(
                        f"{self.location}: the store refused to serve '{what}' ({type(exc).__name__}: {exc}); check "
                        "the credentials or permissions (storage options). The archive itself was not read, so "
                        "nothing is known to be wrong with it.") from exc
                if delay is None:
                    raise StoreAccessError(
                        f"{self.location}: cannot reach the store ({type(exc).__name__}: {exc}; {attempt + 1} "
                        f"attempts at '{what}' over {sum(RETRY_DELAYS):.0f} s). The server or network is down or "
                        "overloaded; the archive is not known to be damaged. Retry when it is reachable.") from exc
                log.info("transient error reading %s/%s (%s); retrying in %.1f s", self.location, what, exc, delay)
                await asyncio.sleep(delay)

    async def get(self, key, prototype, byte_range=None):
        return await self._retry(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        what = key_ranges[0][0] if key_ranges else "?"
        return await self._retry(what, lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key):
        return await self._retry(key, lambda: self._store.exists(key))
