"""What the web app needs of the coordinator, and nothing more.

``broker.coordinator.runtime.Coordinator`` is the real one; tests build the
app around a small stand-in. Typing the seam keeps the app from reaching
into the coordinator's insides, and tells whoever changes the coordinator
which of its methods the app relies on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from broker.coordinator.contract import ClusterSnapshot, PlanView, QueryEvent, QueryRequest


class CoordinatorPort(Protocol):
    """The coordinator as the web app uses it (lifecycle, cluster views, placement, queries)."""

    async def start(self) -> None:
        """Connect to the broker and start scheduling (called in the web server's lifespan)."""

    async def stop(self) -> None:
        """Cancel running queries and disconnect."""

    def snapshot(self) -> ClusterSnapshot:
        """The cluster now; cheap enough to call on every refresh."""

    def model_names(self) -> list[str]:
        """Models ready somewhere in the cluster."""

    def plan(self) -> PlanView:
        """What a re-plan would do now, without doing it."""

    async def reassign(self) -> PlanView:
        """Re-plan now and apply it."""

    def query(self, request: QueryRequest) -> AsyncGenerator[QueryEvent, None]:
        """Events of one query, ending with QueryFinished or QueryFailed; ``aclose()`` before the end cancels it."""

    async def cancel(self, request_id: str) -> bool:
        """Ask a running query to stop; its stream then ends with QueryFailed(code="cancelled")."""
