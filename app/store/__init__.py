"""Chat sessions (SQLite; PostgreSQL when several app instances share them) and documents for retrieval-augmented
answers (LanceDB).

The web UI and the HTTP API call these synchronous, thread-safe classes from
worker threads. Heavy imports (LanceDB, sentence-transformers) happen when a
:class:`RagStore` is created or its model is first used, not on import.
"""

from app.store.errors import (
    BadInputError,
    EncryptedDocumentError,
    NotFoundError,
    StoreError,
    TooLargeError,
    UnsupportedFormatError,
)
from app.store.prompt import Citation, build_rag_prompt
from app.store.rag import Document, RagStore, SearchHit, SearchMode
from app.store.sessions import (
    SHARED_USER,
    ChatMessage,
    ChatSettings,
    MessageStatus,
    SessionInfo,
    SessionStore,
    SqlSessionStore,
    estimate_tokens,
    open_session_store,
)

__all__ = [
    "BadInputError",
    "SHARED_USER",
    "ChatMessage",
    "ChatSettings",
    "Citation",
    "Document",
    "EncryptedDocumentError",
    "MessageStatus",
    "NotFoundError",
    "RagStore",
    "SearchHit",
    "SearchMode",
    "SessionInfo",
    "SessionStore",
    "SqlSessionStore",
    "StoreError",
    "TooLargeError",
    "UnsupportedFormatError",
    "build_rag_prompt",
    "estimate_tokens",
    "open_session_store",
]
