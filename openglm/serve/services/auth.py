"""Who is calling: the request's API key, checked against the store (briefly cached), and admin access."""

from __future__ import annotations

import hmac
import time

from anyio import to_thread
from fastapi import Request

from ..errors import APIError, store_error
from ..store import StoreError

KEY_CACHE_SECONDS = 5.0
MAX_CACHED_KEYS = 10_000


class Auth:
    """Bearer keys of ``store``; ``admin_key``: a secret for the admin routes besides keys marked admin."""

    def __init__(self, store, admin_key: str | None):
        self.store, self.admin_key = store, admin_key
        self._cache: dict[str, tuple] = {}  # secret -> (KeyInfo, monotonic expiry)

    async def key(self, request: Request):
        """The request's key, checked now; 401 if it has none that is valid."""
        return await self._key(request, cached=False)

    async def billed_key(self, request: Request):
        """The request's key, from a check up to ``KEY_CACHE_SECONDS`` old: for routes where
        ``Store.reserve`` checks the key again (revoked, expired, model) in its transaction."""
        return await self._key(request, cached=True)

    async def admin(self, request: Request):
        """The admin secret (None) or an admin key; 401 without a valid key, 403 for a key that is not admin."""
        secret = request.headers.get("authorization", "").partition(" ")[2].strip()
        if self.admin_key and secret and hmac.compare_digest(secret.encode(), self.admin_key.encode()):
            return None
        key = await self.key(request)
        if not key.admin:
            raise APIError(403, "this endpoint needs an admin key", "permission_error", "admin_required")
        return key

    def forget(self) -> None:
        """Drop cached checks: a revoked key must fail at once everywhere in this process."""
        self._cache.clear()

    async def _key(self, request: Request, cached: bool):
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip() if scheme.lower() == "bearer" else header.strip()
        now = time.monotonic()
        if cached and (hit := self._cache.get(secret)) and hit[1] > now:
            return hit[0]
        try:
            key = await to_thread.run_sync(self.store.authenticate, secret)
        except StoreError as e:
            raise store_error(e) from None
        if len(self._cache) > MAX_CACHED_KEYS:  # bounded: drop the lot rather than track ages
            self._cache.clear()
        self._cache[secret] = (key, now + KEY_CACHE_SECONDS)
        return key
