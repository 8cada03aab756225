"""API-key authentication: `authorization: Bearer <key>` on every RPC.

Keys are compared in constant time against every configured key (so timing
reveals neither a key nor which key matched) and are never logged; a key is
identified in logs and rate limits by its name or a short hash.

Each key has scopes: `user` (every ordinary RPC; the default) and `admin`
(the administrative RPCs a service declares, such as the tokenizer's Reload).
A key file entry is `KEY`, `NAME KEY` or `NAME KEY SCOPES`, SCOPES being a
comma-separated list (`admin`, `user,admin`), so files written before scopes
existed keep working and grant exactly what they did, minus administration.
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

from llmsuite.runtime.errors import PermissionDenied, Unauthenticated
from llmsuite.runtime.status import abort, stream_items, wrap_handler

log = logging.getLogger("llmsuite.auth")

_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmsuite_principal", default=None)


def current_principal() -> str | None:
    """Name of the API key that authenticated the current RPC (None when auth is off)."""
    return _principal.get()


USER_SCOPE = "user"
ADMIN_SCOPE = "admin"
SCOPES = frozenset({USER_SCOPE, ADMIN_SCOPE})


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: bytes
    scopes: frozenset[str] = frozenset({USER_SCOPE})


def parse_keys(entries: Sequence[str]) -> list[ApiKey]:
    """'KEY', 'NAME KEY' or 'NAME KEY SCOPES' entries; unnamed keys get
    'key-<sha256 prefix>'. Errors name the entry by position, never the key."""
    keys = []
    for position, entry in enumerate(entries, start=1):
        parts = entry.split()
        scopes = frozenset({USER_SCOPE})
        if len(parts) == 3:
            name, secret, scope_list = parts
            scopes = frozenset(s.strip() for s in scope_list.split(",") if s.strip())
            unknown = sorted(scopes - SCOPES)
            if unknown or not scopes:
                raise ValueError(f"API key entry {position} ({name}): scopes must be a comma-separated list of "
                                 f"{', '.join(sorted(SCOPES))}; got {', '.join(unknown) or 'none'}")
        elif len(parts) == 2:
            name, secret = parts
        elif len(parts) == 1:
            secret = parts[0]
            name = "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        else:
            raise ValueError(f"API key entry {position}: expected 'KEY', 'NAME KEY' or 'NAME KEY SCOPES'")
        keys.append(ApiKey(name, secret.encode(), scopes))
    return keys


class ApiKeyAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without a valid bearer key with UNAUTHENTICATED, and those
    whose key lacks the method's scope with PERMISSION_DENIED: `admin_methods`
    (full method names) need `admin`, every other method `user`. Methods whose
    full name starts with an exempt prefix (health, reflection) pass."""

    def __init__(self, keys: Sequence[ApiKey], exempt_prefixes: Sequence[str],
                 admin_methods: Sequence[str] = ()) -> None:
        if not keys:
            raise ValueError("ApiKeyAuthInterceptor needs at least one key")
        self._keys = list(keys)
        self._exempt = tuple(exempt_prefixes)
        self._admin_methods = frozenset(admin_methods)

    def _authorize(self, key: ApiKey, method: str) -> None:
        needed = ADMIN_SCOPE if method in self._admin_methods else USER_SCOPE
        if needed not in key.scopes:
            raise PermissionDenied(f"this API key lacks the {needed!r} scope this method needs",
                                   reason="MISSING_SCOPE", metadata={"scope": needed})

    def _authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> ApiKey:
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
                matched = key
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
        principal: str | None = None
        failure: Unauthenticated | PermissionDenied | None = None
        try:
            key = self._authenticate(handler_call_details.invocation_metadata)
            principal = key.name
            self._authorize(key, method)
        except Unauthenticated as exc:
            failure = exc
            log.info("rejected unauthenticated call", extra={"method": method, "reason": exc.reason})
        except PermissionDenied as exc:
            failure = exc
            log.info("rejected call outside the key's scopes", extra={"method": method, "key": principal})

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
