"""The error that ends a query: raised anywhere in its execution, turned into one QueryFailed event."""

from __future__ import annotations


class QueryError(Exception):
    """Ends a query with :class:`QueryFailed`."""

    def __init__(self, code: str, message: str, partial_text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial_text = partial_text
