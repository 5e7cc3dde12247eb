"""Load booked on request: what POST /v1/route books on the live load model, per API key.

The live load model (`RouterState.free_at` [K, C], core/latency.py) is booked by the calls that
happen: a chat call books its LLM's predicted service time when it is routed (the proxy makes the
call), and frees it at its predicted end. A /v1/route decision books nothing unless the request asks
(`"book_load": true`: the caller says it will make the call), and such a booking

* counts against the caller's API key: a key holds at most `per_key` route bookings not yet ended or
  expired (past it a route is answered, not booked: `"booked": false`);
* expires: at `ttl_s` after it was made, whatever of it is still ahead (its wait behind earlier
  bookings and its service) is taken off its serving slot, so a booking whose call never came
  cannot keep load on an LLM longer than `ttl_s`.

The slots a batch's bookings take are those `latency.assign_sequential` takes (the earliest-free
slot of the chosen LLM, in row order), replayed here on the host to know each booking's slot and
end. A booking on an LLM removed since (its slot's generation changed) is forgotten.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(eq=False)
class Booking:
    key: str  # the API key's account name
    arm: int
    slot: int  # the serving slot of free_at it took
    end: float  # its predicted end (load-model clock, s)
    duration: float  # its predicted service time (s)
    deadline: float  # when it expires (s)
    generation: int  # the arm's LLM generation when booked


class Bookings:
    """The /v1/route bookings of the live load model (see the module docstring). enabled: the
    service books load at all (--no-book-load: no); ttl_s: a booking's lifetime; per_key: route
    bookings a key may hold at once. Worker thread only."""

    def __init__(self, enabled: bool = True, ttl_s: float = 60.0, per_key: int = 32):
        if not 0 < ttl_s <= 86400:
            raise ValueError(f"booking_ttl_s must be in (0, 86400] seconds, got {ttl_s}")
        if not isinstance(per_key, int) or per_key < 0:
            raise ValueError(f"max_booked_per_key must be an integer >= 0, got {per_key!r}")
        self.enabled, self.ttl_s, self.per_key = enabled, float(ttl_s), per_key
        self.live: list[Booking] = []

    def held(self, key: str) -> int:
        """Route bookings `key` holds (not ended, not expired, as of the last `expire`)."""
        return sum(b.key == key for b in self.live)

    def admit(self, reqs) -> None:
        """Clear `book` on the route requests (RouteReq) whose key is at its cap, counting the
        batch's earlier ones; chat requests book as they ask."""
        held: dict[str, int] = {}
        for r in reqs:
            if r.kind != "route" or not r.book:
                continue
            n = held.setdefault(r.key, self.held(r.key))
            if n >= self.per_key:
                r.book = False
            else:
                held[r.key] = n + 1

    def record(self, reqs, book: np.ndarray, arms: np.ndarray, tokens: np.ndarray, state, free_at: np.ndarray,
               clock: float, generation: np.ndarray) -> None:
        """Replay a batch's bookings (book [B] bool, arms [B], predicted tokens [B, K]) on the load
        before it (free_at [K, C] at `clock`) and keep the route requests' ones."""
        fa = np.array(free_at, np.float32)
        ttft, tps = np.asarray(state.ttft, np.float32), np.asarray(state.tokens_per_s, np.float32)
        clock = np.float32(clock)
        for i, r in enumerate(reqs):
            if not book[i]:
                continue
            a = int(arms[i])
            dur = np.float32(ttft[a] + np.float32(tokens[i, a]) / tps[a])
            c = int(np.argmin(fa[a]))
            end = np.float32(max(fa[a, c], clock) + dur)
            fa[a, c] = end
            if r.kind == "route" and np.isfinite(end):
                self.live.append(Booking(r.key, a, c, float(end), float(dur), float(clock) + self.ttl_s,
                                         int(generation[a])))

    def expire(self, free_at, now: float, generation: np.ndarray):
        """Forget the bookings that ended; take the expired ones' remaining time off their slots.
        Returns the new free_at [K, C] (numpy), or None when it is unchanged."""
        if not self.live:
            return None
        fa = None
        for b in list(self.live):
            if b not in self.live or b.end <= now or int(generation[b.arm]) != b.generation or now < b.deadline:
                continue
            if fa is None:
                fa = np.array(free_at, np.float32)
            remaining = min(b.duration, b.end - now)  # what of it is still ahead: its wait, then its service
            fa[b.arm, b.slot] = max(np.float32(now), fa[b.arm, b.slot] - np.float32(remaining))
            self.live.remove(b)
            for o in self.live:  # the bookings queued behind it on its slot move up
                if (o.arm, o.slot) == (b.arm, b.slot) and o.end > b.end:
                    o.end = max(now, o.end - remaining)
        self.live = [b for b in self.live if b.end > now and int(generation[b.arm]) == b.generation]
        return fa
