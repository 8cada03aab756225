"""What the gateway can serve right now, kept fresh in the background.

Every `refresh_interval_s` (and at once when a request saw something change)
the catalogue asks the tokenizer and every inference replica for their
models, concurrently. A model is served when the tokenizer has it, at least
one usable replica has it with the same tokenizer content hash, and the
gateway holds that tokenizer's files (fetched once per hash, checked against
it). Replicas may differ: each model is routed only to the replicas whose
hash matches. A replica that was down, restarted or newly reachable is picked
up on the next refresh, and so is a reloaded tokenizer; each request also
checks the hash on its tokenizer answer, so a pairing that broke between two
refreshes is never served (see `check_pairing`).

"Usable" is the upstream's channel being able to connect and its circuit
breaker being closed. Probes and requests feed the same breaker, so one failed
call does not flip it, while `failure_threshold` consecutive failures do. The
channel's connectivity state is followed as it changes: an upstream that stops
accepting connections (its process died) is unusable as soon as a connect
attempt fails, and usable again once one succeeds; either change, and a request
that fails UNAVAILABLE, triggers a refresh at once (at most every 0.2 s) rather
than at the next interval. Health follows: the gateway is SERVING while any model is
served, and `model:NAME` while that model is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.affinity import rank
from llmsuite.gateway.local_tokenizers import LocalTokenizer, LocalTokenizers, TokenizerFilesRejected
from llmsuite.gateway.upstreams import Replica, Upstreams
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.errors import InvalidArgument, LlmsuiteError, NotFound, Unavailable
from llmsuite.tokenizer.v1 import tokenizer_pb2

log = logging.getLogger("llmsuite.gateway.catalogue")

HealthStatuses = Mapping[str, bool]  # health service name -> SERVING?
RETRY_AFTER_S = 1.0
MIN_REFRESH_GAP_S = 0.2  # between refreshes, however often something wakes the catalogue
GENERATION, EMBEDDING = "generation", "embedding"  # what a model is served for (ModelInfo.kind)


@dataclass(frozen=True)
class ServedModel:
    """A model the gateway serves: tokenizer and replicas proven to match."""

    name: str
    architecture: str
    context_length: int
    has_chat_template: bool
    execution_provider: str
    content_hash: str
    tokenizer: LocalTokenizer
    replicas: tuple[Replica, ...]  # those serving it with this content hash
    layout: str = ""  # as the first matching replica reports them
    precision: str = ""
    quantization: str = ""
    kind: str = GENERATION
    embedding_dimensions: int = 0  # embedding models: the vector length
    kv_slots: int = 0  # the first matching replica's KV slots (0: it serves the model without slots)
    kv_slot_tokens: int = 0  # tokens one of those slots holds


def require_kind(model: ServedModel, kind: str) -> None:
    """Generate and Chat need a generation model, Embed an embedding model."""
    if model.kind != kind:
        call = "Embed" if model.kind == EMBEDDING else "Generate or Chat"
        raise InvalidArgument.for_field("model", f"model {model.name!r} is a {model.kind} model: call {call}",
                                        reason="WRONG_MODEL_KIND", model=model.name)


def health_name(model: str) -> str:
    return f"model:{model}"


class Catalogue:
    def __init__(self, upstreams: Upstreams, *, refresh_interval_s: float, probe_timeout_s: float = 5.0,
                 service_names: Sequence[str] = (),
                 on_health: Callable[[HealthStatuses], Awaitable[None]] | None = None) -> None:
        self._up = upstreams
        self._interval = refresh_interval_s
        self._probe_timeout = probe_timeout_s
        self._service_names = tuple(service_names)
        self._on_health = on_health
        self._tokenizers = LocalTokenizers()
        self._tokenizer_models: dict[str, tokenizer_pb2.TokenizerInfo] = {}
        self._replica_models: dict[int, dict[str, inference_pb2.ModelInfo]] = {}
        self._served: dict[str, ServedModel] = {}
        self._unservable: dict[str, Unavailable] = {}
        self._answered = False  # some upstream has answered at least once
        self._last_problem: LlmsuiteError | None = None  # why the last failed probe failed
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()  # set once any model is served

    # -- lookups (request path: no upstream calls) ---------------------------------------------------------

    @property
    def served(self) -> list[ServedModel]:
        return sorted(self._served.values(), key=lambda m: m.name)

    def lookup(self, name: str) -> ServedModel:
        served = self._served.get(name)
        if served is not None:
            return served
        if name in self._unservable:
            raise self._unservable[name]
        if not self._answered:
            problem = self._last_problem
            raise Unavailable("the gateway is still discovering its upstreams' models"
                              + (f" (last attempt: {problem.message})" if problem else ""),
                              reason=problem.reason if problem else "LOADING", retry_after_s=RETRY_AFTER_S)
        available = ", ".join(sorted(self._served)) or "none"
        raise NotFound(f"model {name!r} is not served (available: {available})", reason="MODEL_NOT_FOUND",
                       metadata={"model": name})

    def check_pairing(self, model: ServedModel, content_hash: str) -> None:
        """Refuses ids from a tokenizer other than the one `model` was paired
        with (a Reload since the last refresh), and refreshes at once."""
        if content_hash == model.content_hash:
            return
        self._wake.set()
        raise _mismatch(model.name)

    def replicas_for(self, model: ServedModel, affinity_key: str | None = None) -> list[Replica]:
        """Replicas to try for `model`, usable ones first: ranked for `affinity_key` (see
        affinity.py), or rotated per call when there is none."""
        usable = [r for r in model.replicas if r.usable]
        if affinity_key is not None and len(usable) > 1:
            return rank(affinity_key, usable)
        return self._up.round_robin(usable) or list(model.replicas)

    # -- refreshing ----------------------------------------------------------------------------------------

    def refresh_soon(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Refreshes forever (cancel to stop): every interval, and at once when an upstream's
        channel changes state or one of its calls fails (see Upstreams.watch_connectivity)."""
        watcher = asyncio.ensure_future(self._up.watch_connectivity(self.refresh_soon))
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()  # before the refresh: a change seen during it refreshes again
                started = loop.time()
                try:
                    await self.refresh()
                except Exception:  # a refresh must never end the loop; the next one retries
                    log.exception("catalogue refresh failed")
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    pass
                # Failing requests may wake it continually while an upstream is down: pace them.
                await asyncio.sleep(max(0.0, started + MIN_REFRESH_GAP_S - loop.time()))
        finally:  # done with the channels before anyone closes them
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def refresh(self) -> None:
        tokenizer_task = asyncio.ensure_future(self._probe_tokenizer())
        await asyncio.gather(*(self._probe_replica(i, r) for i, r in enumerate(self._up.replicas)),
                             tokenizer_task)
        served, unservable = await self._pair()
        newly, gone = set(served) - set(self._served), set(self._served) - set(served)
        changed = {n for n in set(served) & set(self._served)
                   if served[n].content_hash != self._served[n].content_hash}
        self._served, self._unservable = served, unservable
        self._tokenizers.keep_only({m.content_hash for m in served.values()})
        if newly or gone or changed:
            log.info("catalogue changed", extra={"serving": ",".join(sorted(served)),
                                                 "added": ",".join(sorted(newly)),
                                                 "removed": ",".join(sorted(gone)),
                                                 "tokenizer_changed": ",".join(sorted(changed))})
        for name in gone:
            log.warning("model no longer served", extra={"model": name, "why": unservable[name].message
                                                         if name in unservable else "no upstream lists it"})
        if served:
            self.ready.set()
        if self._on_health is not None:
            await self._on_health(self.health())

    def health(self) -> dict[str, bool]:
        serving = bool(self._served)
        statuses = {name: serving for name in ("", *self._service_names)}
        for name in (*self._served, *self._unservable):
            statuses[health_name(name)] = name in self._served
        return statuses

    async def _probe_tokenizer(self) -> None:
        try:
            listing = await self._up.tokenizer_models(time_limit_s=self._probe_timeout)
        except LlmsuiteError as exc:
            log.debug("tokenizer probe failed", extra={"reason": exc.reason})
            self._last_problem = exc
            return
        self._answered = True
        self._tokenizer_models = {m.name: m for m in listing.models}

    async def _probe_replica(self, index: int, replica: Replica) -> None:
        try:
            listing = await self._up.replica_models(replica, time_limit_s=self._probe_timeout)
        except LlmsuiteError as exc:
            log.debug("replica probe failed", extra={"replica": replica.target, "reason": exc.reason})
            self._last_problem = exc
            return
        self._answered = True
        self._replica_models[index] = {m.name: m for m in listing.models}

    async def _pair(self) -> tuple[dict[str, ServedModel], dict[str, Unavailable]]:
        tokenizer_up = self._up.tokenizer.usable
        live = [(i, r) for i, r in enumerate(self._up.replicas) if r.usable and i in self._replica_models]
        names = {n for models in self._replica_models.values() for n in models} | set(self._tokenizer_models)
        served: dict[str, ServedModel] = {}
        unservable: dict[str, Unavailable] = {}
        for name in sorted(names):
            tok = self._tokenizer_models.get(name)
            if not tokenizer_up:
                unservable[name] = _unavailable(name, "the tokenizer service is unavailable", "UPSTREAM_UNAVAILABLE")
                continue
            if tok is None:
                unservable[name] = _unavailable(name, "the tokenizer service has no tokenizer for it",
                                                "NO_TOKENIZER")
                continue
            offering = [(r, self._replica_models[i][name]) for i, r in live if name in self._replica_models[i]]
            matching = [(r, info) for r, info in offering if info.tokenizer_content_hash == tok.content_hash]
            if not matching:
                if offering:
                    log.error("tokenizer does not belong to model; not serving it",
                              extra={"model": name, "tokenizer_hash": tok.content_hash,
                                     "model_tokenizer_hashes": ",".join(sorted(
                                         {info.tokenizer_content_hash for _, info in offering}))})
                    unservable[name] = _mismatch(name)
                else:
                    unservable[name] = _unavailable(name, "no inference replica serving it is available",
                                                    "NO_UPSTREAM")
                continue
            local = await self._local_tokenizer(name, tok.content_hash)
            if local is None:
                unservable[name] = _unavailable(name, "its tokenizer files could not be fetched yet",
                                                "TOKENIZER_FILES_UNAVAILABLE")
                continue
            info = matching[0][1]
            served[name] = ServedModel(name, info.architecture, info.context_length, tok.has_chat_template,
                                       info.execution_provider, tok.content_hash, local,
                                       tuple(r for r, _ in matching), info.layout, info.precision,
                                       info.quantization,
                                       kind=EMBEDDING if info.kind == common_pb2.MODEL_KIND_EMBEDDING else GENERATION,
                                       embedding_dimensions=info.embedding_dimensions,
                                       kv_slots=info.kv_cache_slots, kv_slot_tokens=info.kv_cache_slot_tokens)
        return served, unservable

    async def _local_tokenizer(self, model: str, content_hash: str) -> LocalTokenizer | None:
        local = self._tokenizers.get(content_hash)
        if local is not None:
            return local
        try:
            answer = await self._up.tokenizer_files(model, time_limit_s=max(self._probe_timeout, 30.0))
            if answer.content_hash != content_hash:  # reloaded in between: the next refresh pairs again
                return None
            return await self._tokenizers.load({f.name: f.content for f in answer.files}, content_hash)
        except (LlmsuiteError, TokenizerFilesRejected) as exc:
            log.error("cannot use the tokenizer files for model", extra={"model": model, "error": str(exc)})
            return None


def _unavailable(model: str, why: str, reason: str) -> Unavailable:
    return Unavailable(f"model {model!r} cannot be served right now: {why}", reason=reason,
                       retry_after_s=RETRY_AFTER_S, metadata={"model": model})


def _mismatch(model: str) -> Unavailable:
    return _unavailable(model, "its tokenizer and its model do not match (different tokenizer content hashes; "
                        "an update is probably in progress)", "TOKENIZER_MISMATCH")
