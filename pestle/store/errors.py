"""What every repository shares: the store's error and its clock."""

from __future__ import annotations

from datetime import datetime, timezone


class StoreError(RuntimeError):
    """The store cannot do what was asked (unreachable, missing or corrupt document)."""


class StoreUnreachable(StoreError):
    """No answer from the store's server (refused, closed or timed-out connections): an
    outage that may pass, unlike refused credentials or a bad request."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    """pymongo returns naive UTC unless the client is tz-aware; compare in aware UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the store failing (pestle's StoreError, or the driver's or
    GridFS's own errors that reached a caller): for messages outside pestle.store, which
    does not import the driver."""
    import gridfs.errors
    import pymongo.errors

    return isinstance(exc, (StoreError, pymongo.errors.PyMongoError, gridfs.errors.GridFSError))


def is_store_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot be reached for now (the server stopped,
    restarts, or the network dropped): worth waiting for and trying again, unlike a refused
    request. pymongo's ``AutoReconnect`` covers closed connections, network timeouts and
    ``ServerSelectionTimeoutError``."""
    import pymongo.errors

    return isinstance(exc, (StoreUnreachable, pymongo.errors.ConnectionFailure))
