"""What the web app needs of the coordinator, and nothing more.

``broker.coordinator.runtime.Coordinator`` is the real one; tests build the
app around a small stand-in. Typing the seam keeps the app from reaching
into the coordinator's insides, and tells whoever changes the coordinator
which of its methods the app relies on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from broker.coordinator.contract import (
    ClusterSnapshot,
    LoadedModel,
    ManageEvent,
    ModelAvailability,
    PlanView,
    QueryEvent,
    QueryRequest,
)


class CoordinatorPort(Protocol):
    """The coordinator as the web app uses it (lifecycle, cluster views, placement, queries)."""

    async def start(self) -> None:
        """Connect to the broker and start scheduling (called in the web server's lifespan)."""

    async def stop(self) -> None:
        """Cancel running queries and disconnect."""

    def snapshot(self) -> ClusterSnapshot:
        """The cluster now; cheap enough to call on every refresh, and safe from a worker thread (``/status`` is
        built in one)."""

    def model_names(self) -> list[str]:
        """Every model some online agent can answer with now (ready, loaded or on disk), by display name."""

    def models(self) -> list[ModelAvailability]:
        """Every servable model with the agents that have it (their own spelling, ready / loaded / local)."""

    def loaded_models(self) -> list[LoadedModel]:
        """What is in which agent's runtime memory now (``/api/ps``)."""

    def plan(self) -> PlanView:
        """What a re-plan would do now, without doing it."""

    async def reassign(self) -> PlanView:
        """Re-plan now and apply it."""

    def query(self, request: QueryRequest) -> AsyncGenerator[QueryEvent, None]:
        """Events of one query, ending with QueryFinished or QueryFailed; ``aclose()`` before the end cancels it."""

    async def cancel(self, request_id: str) -> bool:
        """Ask a running query to stop; its stream then ends with QueryFailed(code="cancelled")."""

    def manage_targets(self, action: str, model: str, agents: list[str] | None = None) -> tuple[list[str], str]:
        """The agents a model operation would go to (explicit ``agents``, else the coordinator's choice), and why."""

    def manage(self, action: str, model: str, *, agents: list[str] | None = None, timeout_s: float | None = None,
               request_id: str | None = None) -> AsyncIterator[ManageEvent]:
        """Pull, delete, load or unload ``model`` on agents: ManageStarted, ManageProgress…, then ManageFinished."""
