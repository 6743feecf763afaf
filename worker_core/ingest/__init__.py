"""The reference ingestion pipeline: storage, chunking, embedding and DocumentWorker.

``from worker_core.ingest import DocumentWorker, LocalStorage, S3Storage, Chunker``.
Names are imported on first use (PEP 562), so importing the package pulls in
neither aiobotocore nor aiohttp until a backend that needs them is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import DocumentCatalog, Outcome
    from .chunker import ChunkCursor, Chunker, TextChunk
    from .document_worker import DocumentWorker
    from .embedders import Embedder, HashingEmbedder
    from .http_embedder import HttpEmbedder
    from .s3 import S3Storage
    from .storage import (
        LocalStorage,
        ObjectInfo,
        Storage,
        VersionChangedError,
        VersionedStorage,
        storage_from_config,
    )
    from .sync import SyncResult, sync_prefix

_EXPORTS: dict[str, str] = {
    "ChunkCursor": "chunker",
    "Chunker": "chunker",
    "DocumentCatalog": "catalog",
    "DocumentWorker": "document_worker",
    "Embedder": "embedders",
    "HashingEmbedder": "embedders",
    "HttpEmbedder": "http_embedder",
    "LocalStorage": "storage",
    "ObjectInfo": "storage",
    "Outcome": "catalog",
    "S3Storage": "s3",
    "Storage": "storage",
    "SyncResult": "sync",
    "TextChunk": "chunker",
    "VersionChangedError": "storage",
    "VersionedStorage": "storage",
    "storage_from_config": "storage",
    "sync_prefix": "sync",
}

__all__ = [
    "ChunkCursor",
    "Chunker",
    "DocumentCatalog",
    "DocumentWorker",
    "Embedder",
    "HashingEmbedder",
    "HttpEmbedder",
    "LocalStorage",
    "ObjectInfo",
    "Outcome",
    "S3Storage",
    "Storage",
    "SyncResult",
    "TextChunk",
    "VersionChangedError",
    "VersionedStorage",
    "storage_from_config",
    "sync_prefix",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker_core.ingest' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
