"""Awaitable access to the synchronous stores: ``await service.sessions.list_sessions()``.

SQLite, LanceDB and the embedding model block; the event loop they would
block is shared by uvicorn, Gradio and the coordinator's MQTT handling. So
every store call runs in a worker thread, through this one small proxy
instead of a wrapper method per store method.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio

StoreT = TypeVar("StoreT")


class AsyncStore(Generic[StoreT]):
    """``await proxy.method(*args, **kwargs)`` runs ``store.method(*args, **kwargs)`` in a worker thread.

    ``open_store`` gives the store; it may open it on first use (the document
    store loads LanceDB and the embedding model, which takes seconds).
    """

    def __init__(self, open_store: Callable[[], Awaitable[StoreT]]) -> None:
        self._open_store = open_store

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):  # only the store's public methods; keeps copy/pickle probes away
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            store = await self._open_store()
            return await anyio.to_thread.run_sync(functools.partial(getattr(store, name), *args, **kwargs))

        call.__name__ = name
        return call
