"""HttpEmbedder: embeddings from an OpenAI-compatible ``POST /v1/embeddings`` endpoint.

Built on ``worker_core.http.ServiceClient``, so every request is rate limited
(``embedding.requests_per_second``), bounded by ``embedding.timeout`` inside the
circuit breaker, and mapped onto the error tree: an outage or a 5xx is transient
(the breaker counts it), a 429 defers the job, a 4xx is permanent. Texts are sent
in batches of ``embedding.batch_size``; each response must hold exactly one vector
of ``embedding.dimensions`` numbers per input, or the batch fails with a
``PermanentError`` that names the problem (a wrong model or dimension setting does
not heal by retrying). The API key travels only in the ``Authorization`` header.

``embedding.fallback_endpoints`` are other endpoints serving the same model
(another region, a replica), each with its own breaker (``embeddings-fallback-1``,
...). A batch goes to the first endpoint whose breaker admits it: while the
primary's breaker is open the first fallback serves, and so on; only when every
breaker is open does the batch fail with the ``CircuitOpenError`` that reopens
soonest. A response naming another model than ``embedding.model`` is refused
(a transient fault of that endpoint), so vectors of two models are never mixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from worker_core.errors import CircuitOpenError, PermanentError, TransientError
from worker_core.http import ServiceClient, ServiceResponse
from worker_core.ratelimit import RateLimiter, TokenBucket

if TYPE_CHECKING:
    import aiohttp

    from worker_core.breaker import CircuitBreaker
    from worker_core.config import EmbeddingSettings

__all__ = ["HttpEmbedder", "embeddings_url"]

#: The breaker and rate-limit name this embedder uses by default.
SERVICE = "embeddings"


def breaker_names(fallbacks: int) -> list[str]:
    """The breaker of the primary endpoint, then one per fallback endpoint."""
    return [SERVICE, *(f"{SERVICE}-fallback-{i}" for i in range(1, fallbacks + 1))]


def embeddings_url(endpoint: str) -> str:
    """The embeddings URL of an endpoint given as a host, a ``/v1`` base or the full URL."""
    base = endpoint.rstrip("/")
    if base.endswith("/embeddings"):
        return base
    if base.endswith("/v1"):
        return f"{base}/embeddings"
    return f"{base}/v1/embeddings"


class HttpEmbedder:
    """Embeds texts through an OpenAI-compatible HTTP API.

    Args:
        settings: ``WorkerConfig.embedding`` (endpoint, api_key, model, batch_size,
            timeout, requests_per_second, dimensions).
        breaker: guards the primary endpoint; pass the worker's
            ``worker.breaker("embeddings")`` so every job shares it (fleet-wide when
            the registry is attached).
        breakers: instead, a factory such as ``worker.breaker``: every endpoint gets
            the breaker ``breaker_names(...)`` assigns it.
        session: an ``aiohttp.ClientSession`` to share; by default one is opened.
        rate_limiter: replaces the bucket built from ``requests_per_second``.
        send_dimensions: ask the API for ``dimensions``-long vectors (OpenAI's
            text-embedding-3 models honour it); turn off for servers that reject it.
    """

    def __init__(
        self,
        settings: EmbeddingSettings,
        *,
        breaker: CircuitBreaker | None = None,
        breakers: Callable[[str], CircuitBreaker] | None = None,
        session: aiohttp.ClientSession | None = None,
        rate_limiter: RateLimiter | None = None,
        send_dimensions: bool = True,
    ) -> None:
        if not settings.endpoint:
            raise ValueError("embedding.endpoint is required for the http embedder")
        self.dimensions = settings.dimensions
        self.model = settings.model
        self.batch_size = settings.batch_size
        self.send_dimensions = send_dimensions
        headers = {"Accept": "application/json"}
        if settings.api_key is not None and settings.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        rps = settings.requests_per_second
        names = breaker_names(len(settings.fallback_endpoints))
        self.clients: list[ServiceClient] = []
        for i, (name, endpoint) in enumerate(
            zip(names, (settings.endpoint, *settings.fallback_endpoints), strict=True)
        ):
            limiter = rate_limiter if i == 0 else None
            if limiter is None and rps is not None:
                # Up to one second's worth of requests may go at once after a pause.
                limiter = TokenBucket(rps, max(1, math.floor(rps)), name=name)
            self.clients.append(
                ServiceClient(
                    name,
                    embeddings_url(endpoint),
                    breaker=breakers(name) if breakers is not None else None,
                    rate_limiter=limiter,
                    timeout=settings.timeout,
                    headers=headers,
                    session=session,
                )
            )
        #: The primary endpoint's client.
        self.client = self.clients[0]
        if breaker is not None:
            self.client.breaker = breaker

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings, **kwargs: Any) -> HttpEmbedder:
        """``HttpEmbedder(settings, **kwargs)``; the factory the DocumentWorker uses."""
        return cls(settings, **kwargs)

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The primary endpoint's breaker."""
        return self.client.breaker

    @breaker.setter
    def breaker(self, breaker: CircuitBreaker | None) -> None:
        self.client.breaker = breaker

    @property
    def breakers(self) -> list[CircuitBreaker]:
        """Every endpoint's breaker, primary first (those that have one)."""
        return [c.breaker for c in self.clients if c.breaker is not None]

    def __repr__(self) -> str:
        return f"HttpEmbedder({self.client!r}, model={self.model!r}, dimensions={self.dimensions})"

    async def aclose(self) -> None:
        """Close the HTTP sessions this embedder opened (they reopen on next use)."""
        for client in self.clients:
            await client.close()

    async def __aenter__(self) -> HttpEmbedder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order, ``batch_size`` texts per request.

        Raises:
            PermanentError: a text is not a string, or a response does not hold one
                ``dimensions``-long vector per input (the message says which).
            TransientError, RetryableError, CircuitOpenError: as ``ServiceClient.request``.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise PermanentError(f"embeddings: text {i} is {type(text).__name__}, not str")
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(await self._batch(texts[start : start + self.batch_size], start))
        return vectors

    async def _batch(self, batch: list[str], offset: int) -> list[list[float]]:
        payload: dict[str, Any] = {"model": self.model, "input": batch, "encoding_format": "float"}
        if self.send_dimensions:
            payload["dimensions"] = self.dimensions
        where = f"embeddings: batch of texts {offset}..{offset + len(batch) - 1}"
        refused: list[CircuitOpenError] = []
        parsed: list[Any] = []  # the body, parsed once by the check
        for client in self.clients:
            try:
                await client.request(
                    "POST", json=payload, validate=self._same_model(client.name, where, parsed)
                )
            except CircuitOpenError as exc:
                refused.append(exc)  # this endpoint is out: try the next
                continue
            break
        else:
            raise min(refused, key=lambda e: e.retry_after or 0.0)
        body = parsed[-1]
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise PermanentError(f"{where}: the response has no 'data' list")
        if len(data) != len(batch):
            raise PermanentError(f"{where}: expected {len(batch)} vectors, got {len(data)}")
        slots: list[list[float] | None] = [None] * len(batch)
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(batch):
                raise PermanentError(f"{where}: item {position} has no valid 'index'")
            if slots[index] is not None:
                raise PermanentError(f"{where}: index {index} appears twice")
            slots[index] = self._vector(item.get("embedding"), where, offset + index)
        return [v for v in slots if v is not None]

    def _same_model(
        self, service: str, where: str, parsed: list[Any]
    ) -> Callable[[ServiceResponse], None]:
        def check(response: ServiceResponse) -> None:
            try:
                body = response.json()
            except PermanentError as exc:
                raise PermanentError(f"{where}: {exc}") from None
            parsed.append(body)
            model = body.get("model") if isinstance(body, dict) else None
            if isinstance(model, str) and model and model != self.model:
                # Inside the breaker call: an endpoint serving another model counts as
                # failing, so its breaker opens and the next endpoint serves. Its
                # vectors would not be comparable with the others: none are taken.
                raise TransientError(
                    f"{where}: {service} answered with model {model!r}, expected "
                    f"{self.model!r}; its vectors are refused",
                    service=service,
                    model=model,
                )

        return check

    def _vector(self, raw: Any, where: str, text_index: int) -> list[float]:
        if not isinstance(raw, list):
            raise PermanentError(f"{where}: the vector of text {text_index} is not a list")
        if len(raw) != self.dimensions:
            raise PermanentError(
                f"{where}: the vector of text {text_index} has {len(raw)} values, expected "
                f"{self.dimensions} (embedding.dimensions must match the model {self.model!r})"
            )
        vector: list[float] = []
        for value in raw:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PermanentError(f"{where}: the vector of text {text_index} holds non-numbers")
            number = float(value)
            if not math.isfinite(number):
                raise PermanentError(f"{where}: the vector of text {text_index} is not finite")
            vector.append(number)
        return vector
