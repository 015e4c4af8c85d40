"""drivesim's fault injection (:class:`Fault`) and the counters a test reads back
(:class:`SimCounters`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tools.drivesim.protocol import KINDS, _ApiError


@dataclass
class Fault:
    """One injected fault; see :meth:`DriveSim.inject`. ``fired`` counts its uses."""

    kind: str
    times: int | None = None
    probability: float | None = None
    match: str | None = None
    retry_after: float | None = None
    delay: float = 0.5
    status: int | None = None
    after_bytes: int | None = None
    skip: int = 0
    fired: int = 0
    seen: int = 0
    reason: str | None = None
    message: str | None = None

    def matches(self, kind: str, target: str) -> bool:
        if self.match is None:
            return True
        if self.match in KINDS:
            return self.match == kind
        return re.search(self.match, target) is not None

    def error(self) -> _ApiError:
        """The error reply of this fault; ``reason``/``message``, when set, replace the
        kind's own (e.g. a 403 ``dailyLimitExceeded``, or a rate limit worded like the
        daily cap)."""
        err = self._error()
        if self.reason is not None:
            err.reason = self.reason
        if self.message is not None:
            err.message = self.message
        return err

    def _error(self) -> _ApiError:
        ra = self.retry_after
        if self.kind == "rate_limit":
            return _ApiError(403, "userRateLimitExceeded", "User Rate Limit Exceeded", "usageLimits", ra)
        if self.kind == "too_many":
            return _ApiError(429, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits",
                             1.0 if ra is None else ra)
        if self.kind == "daily_limit":
            return _ApiError(403, "userRateLimitExceeded", "User rate limit exceeded.", "usageLimits", ra)
        if self.kind == "quota":
            return _ApiError(403, "storageQuotaExceeded",
                             "The user's Drive storage quota has been exceeded.", "usageLimits")
        if self.status == 500:
            return _ApiError(500, "internalError", "Internal Error", "global", ra)
        return _ApiError(self.status or 503, "backendError", "Service Unavailable", "global", ra)


@dataclass(frozen=True)
class SimCounters:
    """A snapshot of the server's counters.

    ``requests``: HTTP requests (and calls inside batches) per kind (see ``KINDS``), faulted
    ones included; ``faults``: faults fired per fault kind; ``files_created``: files and
    folders created; ``created_by_name``: the same per name; ``bytes_uploaded``: media bytes
    in completed uploads; ``bytes_received``: body bytes of upload calls read off the wire
    (multipart envelopes included), re-sent and abandoned ones too; ``uploads_started``:
    resumable sessions opened; ``max_in_flight``: the most HTTP requests of a kind served
    at the same time (from reading the request line to the last byte of the reply, ``slow``
    delays included), e.g. ``max_in_flight["download"] > 1`` when a client overlaps its
    ranged GETs."""

    requests: dict[str, int]
    faults: dict[str, int]
    files_created: int
    created_by_name: dict[str, int]
    bytes_uploaded: int
    bytes_received: int
    uploads_started: int
    max_in_flight: dict[str, int] = field(default_factory=dict)
