"""The engine interface the inference servicer uses; nothing behind it leaks out.

The servicer sees models (ModelInfo, EngineStats) and sessions (GenerationSession);
onnxruntime, KV caches and threads stay inside. Everything that can block runs on the
per-model scheduler threads, so all methods here are safe to call from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llmsuite.inference.engine.constraints import ConstraintCompiler
from llmsuite.inference.engine.delivery import mailbox_for
from llmsuite.inference.engine.device import gpu_free_bytes, intra_op_threads
from llmsuite.inference.engine.embedding import EmbeddingQueue, EmbeddingResult, load_embedding_model
from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.executor import KvExecutor
from llmsuite.inference.engine.kv_ops import KvOps
from llmsuite.inference.engine.layouts import DetectedModel, detect_model
from llmsuite.inference.engine.memory import (
    MemoryGuard,
    MemoryLimits,
    automatic_kv_budget,
    resolve_max_memory,
)
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.padded_executor import PaddedExecutor
from llmsuite.inference.engine.prefill_estimate import PrefillEstimate
from llmsuite.inference.engine.scheduler import Scheduler, StepObserver
from llmsuite.inference.engine.slot_executor import SlotExecutor
from llmsuite.inference.engine.slot_kv import SlotKvBuffer, serves_in_slots, slot_buffer_for
from llmsuite.inference.engine.turn import SessionState, Turn, TurnFailed
from llmsuite.inference.engine.types import (
    EngineSettings,
    EngineStats,
    GeneratedToken,
    ModelInfo,
    SamplingParams,
    TurnResult,
)
from llmsuite.inference.engine.warmup import served_forwards
from llmsuite.runtime.errors import InvalidArgument, NotFound
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LoadedModel:
    info: ModelInfo
    scheduler: Scheduler
    constraints: ConstraintCompiler
    slots: SlotExecutor[Turn] | None = None  # the slot layout's executor, None on the padded path


def _model_info(name: str, decoder: OnnxDecoder, buffer: SlotKvBuffer | None) -> ModelInfo:
    sig, config = decoder.signature, decoder.config
    return ModelInfo(
        name=name,
        architecture=config.architecture,
        execution_provider=decoder.placement.execution_provider,
        device=decoder.placement.description,
        context_length=decoder.context_length,
        vocab_size=sig.vocab_size,
        num_layers=sig.num_layers,
        num_attention_heads=config.num_attention_heads or sig.num_kv_heads,
        num_kv_heads=sig.num_kv_heads,
        head_dim=sig.head_dim,
        kv_dtype=np.dtype(sig.kv_dtype).name,
        uses_position_ids=sig.position_ids is not None,
        eos_token_ids=config.eos_token_ids,
        bos_token_id=config.bos_token_id,
        tokenizer_hash=tokenizer_content_hash(decoder.directory),
        directory=decoder.directory,
        layout=decoder.layout.name,
        precision=decoder.layout.precision,
        quantization=decoder.layout.quantization,
        attention=decoder.layout.attention,
        kv_slots=buffer.slots if buffer is not None else 0,
        kv_slot_tokens=buffer.max_length if buffer is not None else 0,
    )


class GenerationSession:
    """A conversation with one model: turns run one at a time, each continuing the history
    (or a rewound prefix of it). Reusing earlier turns' KV is the prefix cache's job, so a
    turn gives the same tokens whether its prefix was cached, evicted or never computed."""

    def __init__(self, model: str, scheduler: Scheduler, state: SessionState,
                 constraints: ConstraintCompiler) -> None:
        self.model = model
        self._scheduler = scheduler
        self._constraints = constraints
        self._state = state
        self._results: asyncio.Queue[GeneratedToken | TurnResult | TurnFailed] | None = None

    @property
    def history_length(self) -> int:
        """Tokens of context so far: every turn's prompt ids plus every generated id."""
        return len(self._state.history)

    @property
    def cached_tokens(self) -> int:
        """Tokens of the history whose KV the prefix cache holds right now (0 after eviction)."""
        return self._scheduler.cached_prefix(self._state)

    async def generate(
        self,
        new_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
        truncate_prompt: bool = False,
        keep_history: int | None = None,
    ) -> AsyncIterator[GeneratedToken | TurnResult]:
        """Runs one turn: yields each GeneratedToken as it is produced, then exactly one TurnResult.

        Errors (InvalidArgument, DeadlineExceeded, ResourceExhausted, FailedPrecondition
        TURN_IN_PROGRESS) are raised before the first item; a constraint's grammar that fails
        mid-generation (a per-step limit) raises InvalidArgument after its tokens so far. `deadline` is a
        time.monotonic() value. Leaving the loop early cancels the turn. `keep_history`
        rewinds first: only the first `keep_history` tokens of the history stay (regenerate a
        reply, edit the last message). `new_token_ids` may be empty only when history remains.
        """
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[GeneratedToken | TurnResult | TurnFailed] = asyncio.Queue()
        self._results = results

        mailbox = mailbox_for(loop)  # one wake-up of the loop per step, for all its rows' tokens

        def deliver(item: GeneratedToken | TurnResult | TurnFailed) -> None:
            mailbox.post(results, item)

        # Compiled here, off the scheduler thread, before the turn takes a place in the queue.
        grammar = await self._constraints.start_row(params.constraint) if params.constraint is not None else None
        turn = self._scheduler.submit(
            self._state, new_token_ids, params, deadline=deadline, truncate_prompt=truncate_prompt, deliver=deliver,
            keep_history=keep_history, grammar=grammar,
        )
        done = False
        try:
            while True:
                item = await results.get()
                if isinstance(item, TurnFailed):
                    done = True
                    raise item.error
                if isinstance(item, TurnResult):
                    done = True
                    yield item
                    return
                yield item
        finally:
            if not done:
                self._scheduler.cancel(turn)

    def buffered(self) -> int:
        """Items the current turn has produced that generate() has not yielded yet: a consumer
        that falls behind can send them together instead of one message each."""
        results = self._results
        return results.qsize() if results is not None else 0

    def cancel(self) -> None:
        """Ends the current turn (if any) with CANCELLED within one step; safe from any thread."""
        turn = self._state.active
        if turn is not None:
            self._scheduler.cancel(turn)

    def close(self) -> None:
        """Idempotent: cancels a running turn, frees the KV cache and the session slot."""
        self._scheduler.close_session(self._state)

    async def aclose(self) -> None:
        self.close()


def _memory_guard(settings: EngineSettings, limits: MemoryLimits) -> MemoryGuard | None:
    limit, basis = resolve_max_memory(settings.max_memory_bytes, limits)
    if limit is None:
        logger.info("max memory: %s", basis)
        return None
    logger.info("max memory: %.0f MiB (%s); new requests are refused with MEMORY_PRESSURE before it",
                limit / 2**20, basis)
    return MemoryGuard(limit)


def _automatic_budget(name: str, decoder: OnnxDecoder, settings: EngineSettings, limits: MemoryLimits,
                      weights: int, models: int) -> int:
    on_gpu = decoder.placement.device_type == "cuda"
    try:
        choice = automatic_kv_budget(
            on_gpu=on_gpu, limits=limits, max_memory_bytes=settings.max_memory_bytes or None, weights=weights,
            gpu_free_bytes=gpu_free_bytes(decoder.placement.device_id) if on_gpu else None)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    budget = choice.budget_bytes // models
    logger.info("model %s: automatic KV budget %.0f MiB = %s%s", name, budget / 2**20, choice.describe(),
                f", split between {models} models" if models > 1 else "")
    return budget


def _detect(name: str, path: Path) -> DetectedModel:
    """What `path` holds (layouts.detect_model, the one classification of a model path)."""
    try:
        return detect_model(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from exc


class InferenceEngine:
    """Serves a fixed set of models loaded at start; one scheduler (queue + worker thread) each."""

    def __init__(self, models: Mapping[str, _LoadedModel],
                 embedders: Mapping[str, EmbeddingQueue] | None = None) -> None:
        self._models = dict(models)
        self._embedders = dict(embedders or {})

    @classmethod
    def load(cls, models: Mapping[str, Path], settings: EngineSettings, *,
             step_observer: StepObserver | None = None,
             on_model_failed: Callable[[str, str], None] | None = None,
             prepare_decoder: Callable[[OnnxDecoder], None] | None = None) -> InferenceEngine:
        """Blocking: loads and warms up every model. Raises ModelLoadError naming the model
        and what is wrong (missing files, unsupported layout, requested device unavailable).
        `step_observer` is called on the scheduler thread after every step (metrics); it must be quick.
        `on_model_failed(model, cause)` is called once, on that model's scheduler thread, when
        its engine gives up (see EngineSettings.max_step_failures). `prepare_decoder` runs on
        each decoder after warm-up, before serving (tests inject faults with it).

        Each model gets the whole kv_cache_bytes budget, or an even share of the automatic one
        (memory.py: from the process's limits, less every model's weights and a working reserve).
        One MemoryGuard keeps the whole process under max_memory_bytes (explicit or derived)."""
        loaded: dict[str, _LoadedModel] = {}
        embedders: dict[str, EmbeddingQueue] = {}
        found = {name: _detect(name, Path(directory)) for name, directory in models.items()}
        weights = sum(detected.graph.weights_bytes for detected in found.values())
        decoders = sum(detected.kind != "encoder" for detected in found.values())
        guard: MemoryGuard | None = None
        try:
            for name, directory in models.items():
                detected = found[name]
                if detected.kind == "encoder":  # no KV: served by Embed
                    queue = load_embedding_model(name, Path(directory), settings, step_observer=step_observer)
                    queue.info = replace(queue.info, layout=detected.files.layout, precision=detected.graph.precision,
                                         quantization=detected.graph.quantization)
                    embedders[name] = queue
                    continue
                try:
                    decoder = OnnxDecoder.load(Path(directory), settings, detected=detected)
                    in_slots = serves_in_slots(decoder, settings)
                    estimate = PrefillEstimate()
                    if settings.warmup and not in_slots:
                        # The padded path warms up before the limits are read, so its arenas are mapped then.
                        estimate = PrefillEstimate.measure(served_forwards(decoder, None))
                    kv_ops = KvOps(decoder.placement, decoder.placement.providers(), decoder.signature.num_layers,
                                   decoder.signature.kv_dtype, intra_op_threads(settings))
                    limits = MemoryLimits.detect()  # after loading: RLIMIT_AS headroom depends on what is mapped
                    if guard is None:
                        guard = _memory_guard(settings, limits)
                    budget = settings.kv_cache_bytes or _automatic_budget(name, decoder, settings, limits, weights,
                                                                          decoders)
                    buffer = (slot_buffer_for(decoder, settings, budget, intra_op_threads(settings)) if in_slots
                              else None)
                    if settings.warmup and buffer is not None:
                        # The slot path can only warm up in the buffer the budget sizes, so after the limits
                        # are read: what its first runs add to the arena is the working reserve's to cover
                        # (memory.WORKING_MEMORY_RESERVE_BYTES). Every slot is free again afterwards.
                        estimate = PrefillEstimate.measure(served_forwards(decoder, buffer))
                except ModelLoadError as exc:
                    raise ModelLoadError(f"model {name!r}: {exc}") from exc
                if prepare_decoder is not None:
                    prepare_decoder(decoder)
                on_failed = (None if on_model_failed is None
                             else lambda cause, model=name: on_model_failed(model, cause))
                executor: KvExecutor[Turn]
                slots: SlotExecutor[Turn] | None = None
                model_settings = settings
                if buffer is not None:
                    executor = slots = SlotExecutor(decoder, buffer)
                    # A row needs a free slot: no more rows run than there are slots.
                    model_settings = replace(settings, max_running=buffer.slots)
                    logger.info("model %s: KV in %d slots of %d tokens (%.1f MiB preallocated on %s)", name,
                                buffer.slots, buffer.max_length, buffer.nbytes / 2**20, decoder.placement.description)
                else:
                    executor = PaddedExecutor(decoder, kv_ops)
                scheduler = Scheduler(name, decoder, model_settings, executor=executor, kv_budget_bytes=budget,
                                      prefill_estimate=estimate, step_observer=step_observer,
                                      sampling_threads=intra_op_threads(settings), on_failed=on_failed,
                                      memory_guard=guard)
                scheduler.start()
                constraints = ConstraintCompiler(decoder.directory, decoder.signature.vocab_size,
                                                 decoder.config.eos_token_ids,
                                                 mask_threads=intra_op_threads(settings))
                loaded[name] = _LoadedModel(_model_info(name, decoder, buffer), scheduler, constraints, slots)
                layout = decoder.layout
                logger.info(
                    "loaded model %s from %s (%s layout, %s attention, %s weights, quantization %s) on %s "
                    "(prefill ~%.2f ms/token, KV budget %.1f MiB = %d tokens)",
                    name, layout.model_file, layout.name, layout.attention, layout.precision, layout.quantization,
                    decoder.placement.execution_provider, estimate.per_token_s * 1e3,
                    budget / 2**20, budget // decoder.kv_bytes_per_token,
                )
        except BaseException:
            for model in loaded.values():
                model.scheduler.stop()
                model.constraints.close()
            for queue in embedders.values():
                queue.stop()
            raise
        return cls(loaded, embedders)

    def _model(self, name: str) -> _LoadedModel:
        try:
            return self._models[name]
        except KeyError:
            if name in self._embedders:
                raise _wrong_kind(name, "an embedding model: call Embed") from None
            raise self._not_found(name) from None

    def _embedder(self, name: str) -> EmbeddingQueue:
        try:
            return self._embedders[name]
        except KeyError:
            if name in self._models:
                raise _wrong_kind(name, "a generation model (a decoder export with KV cache: its output is logits, "
                                  "not hidden states to pool); for Embed serve an Optimum --task "
                                  "feature-extraction export (a decoder exported so is pooled on its last token)"
                                  ) from None
            raise self._not_found(name) from None

    def _not_found(self, name: str) -> NotFound:
        available = sorted([*self._models, *self._embedders])
        return NotFound(
                f"model {name!r} is not served here (available: {', '.join(available)})",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )

    def list_models(self) -> list[ModelInfo]:
        return [model.info for model in self._models.values()] + [q.info for q in self._embedders.values()]

    def model_info(self, name: str) -> ModelInfo:
        """Raises NotFound (MODEL_NOT_FOUND) for a name that is not loaded."""
        if name in self._embedders:
            return self._embedders[name].info
        return self._model(name).info

    def stats(self, name: str) -> EngineStats:
        if name in self._embedders:
            return self._embedders[name].stats()
        model = self._model(name)
        stats = model.scheduler.stats()
        if model.slots is None:
            return stats
        return replace(stats, free_kv_slots=model.slots.free_slots())

    async def embed(self, model: str, inputs: Sequence[Sequence[int]], *, dimensions: int = 0,
                    truncate: bool = False, deadline: float | None = None) -> EmbeddingResult:
        """One vector per input from an embedding model; inputs of concurrent calls share forwards.

        Raises InvalidArgument (empty or over-long input, dimensions out of range, WRONG_MODEL_KIND),
        ResourceExhausted (queue full), DeadlineExceeded. Cancelling the caller drops its queued inputs.
        """
        queue = self._embedder(model)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[EmbeddingResult | BaseException] = loop.create_future()

        def settle(result: EmbeddingResult | BaseException) -> None:
            if not answer.done():
                answer.set_result(result)

        def deliver(result: EmbeddingResult | BaseException) -> None:
            loop.call_soon_threadsafe(settle, result)

        job = queue.submit(inputs, dimensions=dimensions, truncate=truncate, deadline=deadline, deliver=deliver)
        try:
            result = await answer
        except asyncio.CancelledError:
            queue.cancel(job)
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    def open_session(self, model: str, *, multi_turn: bool) -> GenerationSession:
        """multi_turn=True: a session that takes further turns (counts against max_sessions);
        False: a single request. Either way ended turns leave their KV in the prefix cache."""
        loaded = self._model(model)
        return GenerationSession(model, loaded.scheduler, loaded.scheduler.open_session(multi_turn=multi_turn),
                                 loaded.constraints)

    async def close(self) -> None:
        """Stops every scheduler (running turns end CANCELLED) and frees all sessions and KV."""
        for model in self._models.values():
            await asyncio.to_thread(model.scheduler.stop)
            model.constraints.close()
        for queue in self._embedders.values():
            await asyncio.to_thread(queue.stop)


def _wrong_kind(name: str, what: str) -> InvalidArgument:
    return InvalidArgument.for_field("model", f"model {name!r} is {what}", reason="WRONG_MODEL_KIND",
                                     model=name)
