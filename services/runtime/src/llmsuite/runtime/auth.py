"""API-key authentication: `authorization: Bearer <key>` on every RPC.

Keys are compared in constant time against every configured key (so timing
reveals neither a key nor which key matched) and are never logged; a key is
identified in logs and rate limits by its name or a short hash.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from llmsuite.runtime.errors import Unauthenticated
from llmsuite.runtime.status import abort, stream_items, wrap_handler

log = logging.getLogger("llmsuite.auth")

_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmsuite_principal", default=None)


def current_principal() -> str | None:
    """Name of the API key that authenticated the current RPC (None when auth is off)."""
    return _principal.get()


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: bytes


def parse_keys(entries: Sequence[str]) -> list[ApiKey]:
    """'NAME KEY' or 'KEY' entries; unnamed keys get 'key-<sha256 prefix>'."""
    keys = []
    for entry in entries:
        parts = entry.split()
        if len(parts) == 2:
            name, secret = parts
        elif len(parts) == 1:
            secret = parts[0]
            name = "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        else:
            raise ValueError("an API key entry is 'KEY' or 'NAME KEY'")
        keys.append(ApiKey(name, secret.encode()))
    return keys


class ApiKeyAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without a valid bearer key with UNAUTHENTICATED; methods
    whose full name starts with an exempt prefix (health, reflection) pass."""

    def __init__(self, keys: Sequence[ApiKey], exempt_prefixes: Sequence[str]) -> None:
        if not keys:
            raise ValueError("ApiKeyAuthInterceptor needs at least one key")
        self._keys = list(keys)
        self._exempt = tuple(exempt_prefixes)

    def _authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata", reason="MISSING_API_KEY")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>'", reason="MALFORMED_AUTHORIZATION")
        presented = token.strip().encode()
        matched = None
        for key in self._keys:  # no early exit: constant work whichever key matches
            if hmac.compare_digest(presented, key.secret):
                matched = key.name
        if matched is None:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        return matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        try:
            principal: str | None = self._authenticate(handler_call_details.invocation_metadata)
            failure: Unauthenticated | None = None
        except Unauthenticated as exc:
            principal, failure = None, exc
            log.info("rejected unauthenticated call", extra={"method": method, "reason": exc.reason})

        def around(behaviour: Callable[..., Any], _req: bool, resp: bool) -> Callable[..., Any]:
            if resp:
                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if failure is not None:
                        await abort(context, failure)
                    _principal.set(principal)
                    async for item in stream_items(behaviour, request, context):
                        yield item
                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if failure is not None:
                    await abort(context, failure)
                _principal.set(principal)
                return await behaviour(request, context)
            return unary

        return wrap_handler(handler, method, around)
