"""Prometheus metrics of the tokenizer service (listed in docs/metrics.md).

Counters are bumped by the servicer after the work succeeded, under the name of
a loaded tokenizer (never a name a caller made up); what is loaded, and since
when, is read from the registry at scrape time, and the backlog from the work
queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmsuite.tokenizer.engine import TokenizerRegistry
from llmsuite.tokenizer.work_queue import BoundedWorkQueue


class TokenizerMetrics:
    """The tokenizer service's metric objects; `collectors()` goes to the server's registry."""

    def __init__(self, registry: TokenizerRegistry, work: BoundedWorkQueue) -> None:
        model = ("model",)
        self.encoded_texts = Counter(
            "llmsuite_tokenizer_encoded_texts", "Texts encoded (Encode, CountTokens, tokenized chat templates).",
            model, registry=None)
        self.encoded_tokens = Counter(
            "llmsuite_tokenizer_encoded_tokens", "Tokens produced by encoding.", model, registry=None)
        self.decoded_tokens = Counter(
            "llmsuite_tokenizer_decoded_tokens", "Token ids decoded to text (Decode and DecodeStream).",
            model, registry=None)
        self.reloads = Counter(
            "llmsuite_tokenizer_reloads", "Reload requests by outcome (success, failure: the old tokenizer "
            "keeps serving).", ("model", "outcome"), registry=None)
        self._loaded = _TokenizerState(registry, work)

    def collectors(self) -> Sequence[Collector]:
        return (self.encoded_texts, self.encoded_tokens, self.decoded_tokens, self.reloads, self._loaded)

    def encoded(self, model: str, token_counts: Iterable[int]) -> None:
        counts = list(token_counts)
        self.encoded_texts.labels(model).inc(len(counts))
        self.encoded_tokens.labels(model).inc(sum(counts))

    def decoded(self, model: str, tokens: int) -> None:
        self.decoded_tokens.labels(model).inc(tokens)

    @contextlib.contextmanager
    def reload(self, model: str) -> Iterator[None]:
        """Counts the reload of a loaded `model` inside the block by how it ends."""
        try:
            yield
        except Exception:
            self.reloads.labels(model, "failure").inc()
            raise
        self.reloads.labels(model, "success").inc()


class _TokenizerState(Collector):
    def __init__(self, registry: TokenizerRegistry, work: BoundedWorkQueue) -> None:
        self._registry = registry
        self._work = work

    def describe(self) -> Iterable[Any]:
        return ()  # families depend on what is loaded; collected only at scrape time

    def collect(self) -> Iterable[Any]:
        loaded = GaugeMetricFamily("llmsuite_tokenizer_loaded_timestamp_seconds",
                                   "When each tokenizer now serving was (re)loaded, Unix time.", labels=("model",))
        vocab = GaugeMetricFamily("llmsuite_tokenizer_vocab_size", "Vocabulary size of each loaded tokenizer.",
                                  labels=("model",))
        for tok in self._registry.all():
            loaded.add_metric((tok.name,), tok.loaded_at)
            vocab.add_metric((tok.name,), tok.vocab_size)
        yield loaded
        yield vocab
        yield GaugeMetricFamily("llmsuite_tokenizer_queued_requests",
                                "Requests waiting for a tokenizer worker (beyond --max-queued-requests: refused).",
                                value=self._work.queued)
        yield GaugeMetricFamily("llmsuite_tokenizer_oldest_wait_seconds",
                                "How long the request waiting longest for a worker has waited (0 when none waits).",
                                value=self._work.oldest_wait_s())
