"""Claiming due timers: one conditional write per batch, under a token no other claim has.

A claim that raised may have been applied in part, and one that came back too late to cover a
delivery must not be fired: both stay *unsettled* and are released by their token (back to
pending, their attempt not counted) before the next claim, so nothing waits for a sweep.
"""

from __future__ import annotations

import functools

import structlog

from timerd.clock import Clock
from timerd.models import Claim, Timer, new_claim_token
from timerd.offload import Offload
from timerd.settings import Settings
from timerd.store import Store

log = structlog.get_logger("timerd.daemon")


class Claimer:
    """Claims for one holder, and the claims of its not settled yet."""

    def __init__(
        self, settings: Settings, store: Store, clock: Clock, offload: Offload, holder: str
    ) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._offload = offload
        self._holder = holder
        self._unsettled: list[str] = []  # tokens of claims to give back before claiming more

    @property
    def unsettled(self) -> int:
        """Claims that failed or came back late and are not released yet."""
        return len(self._unsettled)

    async def claim(self, ids: list[str], now_ms: int) -> list[Timer]:
        """Claim the pending timers among `ids` that are due by `now_ms`; return those that
        came back in time to be delivered (none when the claim came back late)."""
        claim = Claim(
            owner=self._holder,
            now_ms=now_ms,
            until_ms=now_ms + self._settings.claim_ttl_ms,
            token=new_claim_token(),
        )
        self._unsettled.append(claim.token)  # until we know what the write did
        claimed = await self._offload(functools.partial(self._store.claim_due, ids, claim))
        if len(claimed) < len(ids):
            log.debug("claims_lost", wanted=len(ids), claimed=len(claimed))
        if claimed and not self.in_time(claim.until_ms):
            log.warning("claim_too_late", count=len(claimed), token=claim.token)
            return []  # stays unsettled: released before the next claim
        self._unsettled.remove(claim.token)
        return claimed

    def in_time(self, claimed_until_ms: int) -> bool:
        """Whether a delivery started now ends well inside its claim: a claim that comes back
        later (a stall, a queued thread) is released, not fired."""
        return self._settings.covers_delivery(claimed_until_ms, self._clock.now_ms())

    async def settle(self) -> bool:
        """Give back the claims that failed (they may have been applied in part) or came back
        too late; a store error leaves the rest for the next call. Says whether any timer
        went back to pending (the due index has news)."""
        released_any = False
        while self._unsettled:
            token = self._unsettled[0]
            released = await self._offload(functools.partial(self._store.release_claim, token))
            self._unsettled.pop(0)
            if released:
                log.info("claim_released", token=token, count=released)
                released_any = True
        return released_any
