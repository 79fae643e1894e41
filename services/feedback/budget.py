"""Per-principal byte budgets: a token bucket per credential, so one caller cannot take the
whole ingest path.

Each principal (a token's name; everyone, without tokens) may send on average
`rate` bytes per second, in bursts of up to `burst` bytes. A unary call over
budget is refused with RESOURCE_EXHAUSTED and a `retry-after-ms` hint (the
Python client waits that long and retries); a stream over budget is not
refused but read more slowly: the servicer waits before taking its next batch,
and HTTP/2 flow control passes the wait back to the sender.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

_MAX_PRINCIPALS = 10_000  # buckets kept; the least recently used goes (a full bucket: nothing lost)


@dataclass
class _Bucket:
    level: float  # bytes available now
    at: float  # monotonic time of `level`


class ByteBudget:
    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, name: str, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(self.burst, now)
            if len(self._buckets) > _MAX_PRINCIPALS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
            bucket.level = min(self.burst, bucket.level + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def take(self, name: str, nbytes: int) -> float:
        """Spend `nbytes` of `name`'s budget; 0.0 when there was enough, else the seconds to wait
        before the spend is covered (the bytes are spent anyway: the caller waits or refuses)."""
        now = self._clock()
        bucket = self._bucket(name, now)
        bucket.level -= nbytes
        if bucket.level >= 0:
            return 0.0
        return -bucket.level / self.rate

    def refund(self, name: str, nbytes: int) -> None:
        """Give back a spend that was refused (a unary call told to retry later)."""
        bucket = self._buckets.get(name)
        if bucket is not None:
            bucket.level = min(self.burst, bucket.level + nbytes)
