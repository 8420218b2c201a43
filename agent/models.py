"""Make the assigned model ready: check, pull with progress, warm, measure, report.

One assignment at a time: a new one cancels the old (a pull in progress is
closed cleanly); the same assignment id again is a no-op (the assignment is
retained, so it comes back on every reconnect). While the backend is down the
model state is ``failed`` with the URL tried, and the assignment is re-run as
soon as the backend answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from agent.backends.base import (
    Backend,
    BackendError,
    BackendUnreachable,
    ChatDelta,
    ChatDone,
    same_model,
)
from broker.protocol import Assign, Benchmark, ChatMessage, ModelState, RuntimeProfile
from broker.protocol.messages import MAX_MODELS, MAX_NAME_CHARS

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25
"""At most four pull progress messages per second."""

BENCHMARK_PROMPT = "Count from 1 to 100, separated by spaces."


def publishable(models: list[str]) -> list[str]:
    """Names the protocol carries (a runtime may list a 300-character path or thousands of files): the rest is
    logged and left out, so one odd model cannot make the whole model state unpublishable."""
    kept = [name for name in models if 0 < len(name) <= MAX_NAME_CHARS][:MAX_MODELS]
    if len(kept) < len(models):
        logger.warning("%d model name(s) left out of the model state (empty, over %d characters, or past %d)",
                       len(models) - len(kept), MAX_NAME_CHARS, MAX_MODELS)
    return kept


class EpochFence:
    """Remembers the highest leadership epoch seen; anything older comes from a deposed coordinator.

    Several coordinators may run on one broker, one of them leading placement (docs/protocol.md "Leadership").
    A leader that was cut off and comes back (or whose queued publishes arrive late) still carries its old epoch:
    its assignments and model operations are refused here, so agents never flap between two leaders' plans.
    Messages without an epoch (an older coordinator) count as epoch 0.
    """

    def __init__(self) -> None:
        self.highest = 0

    def admit(self, epoch: int, what: str) -> bool:
        """True when ``epoch`` is current (and remember it); False, logged, when it is stale."""
        if epoch < self.highest:
            logger.warning("ignored %s from a deposed coordinator: epoch %d < %d", what, epoch, self.highest)
            return False
        self.highest = epoch
        return True


class ModelManager:
    """Owns the assignment and the retained model state."""

    def __init__(
        self,
        backend: Backend,
        *,
        publish: Callable[[ModelState], None],
        wait_backend_up: Callable[[], Awaitable[None]],
        report_unreachable: Callable[[str], None],
        on_benchmark: Callable[[Benchmark], None] | None = None,
        keep_alive: str | None = None,
        benchmark_tokens: int = 32,
        exclusive: Callable[[], AbstractAsyncContextManager[None]] | None = None,
        measure_runtime: Callable[[str], Awaitable[RuntimeProfile]] | None = None,
        fragile: Callable[[], bool] | None = None,
    ) -> None:
        self.backend = backend
        self._publish = publish
        self._wait_backend_up = wait_backend_up
        self._report_unreachable = report_unreachable
        self._on_benchmark = on_benchmark
        self.keep_alive = keep_alive
        self.benchmark_tokens = benchmark_tokens
        self._exclusive = exclusive or contextlib.nullcontext
        self._measure_runtime = measure_runtime
        self.fragile: Callable[[], bool] = fragile or (lambda: False)
        self.benchmarks: dict[str, Benchmark | None] = {}
        self._extras: asyncio.Task[None] | None = None
        self.loaded_models: list[str] = []
        self.assignment: Assign | None = None
        self.state = ModelState(state="absent")
        self.local_models: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._lost_backend = False
        self.fence = EpochFence()

    # ------------------------------------------------------------------ state

    def _set(self, state: str, **fields: object) -> None:
        assignment = self.assignment
        self.state = ModelState(
            model=assignment.model if assignment else None,
            assignment_id=assignment.assignment_id if assignment else None,
            state=state,  # type: ignore[arg-type]
            local_models=list(self.local_models),
            loaded_models=list(self.loaded_models),
            **fields,  # type: ignore[arg-type]
        )
        self._publish(self.state)

    def has_local(self, model: str) -> bool:
        return any(same_model(model, present) for present in self.local_models)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def check_model(self, model: str, serve_local_models: bool) -> tuple[str, str] | None:
        """None when a job for ``model`` may run now, else ``(error_code, message)``."""
        assignment = self.assignment
        if assignment is not None and same_model(model, assignment.model):
            if self.state.state == "ready" or self.has_local(model):
                return None
            progress = f" ({self.state.progress:.0%})" if self.state.progress is not None else ""
            detail = f": {self.state.error}" if self.state.error else ""
            state = f"{self.state.state}{progress}{detail}"
            return "model_missing", f"model {model!r} is not ready on this agent yet: {state}"
        if serve_local_models and self.has_local(model):
            return None
        serving = f"{assignment.model!r} ({self.state.state})" if assignment else "no model"
        return "model_not_served", f"this agent serves {serving}, not {model!r}"

    # ------------------------------------------------------------------ assignment

    def handle_assign(self, assign: Assign | None) -> None:
        """A (retained) assignment arrived; ``None`` means it was cleared.

        One from a deposed leader (a lower epoch than seen) is ignored. A new leader re-publishes what agents
        already have with its own epoch: the same id (or the same ready model) again changes nothing here.
        """
        if assign is not None and not self.fence.admit(assign.epoch, f"assignment {assign.assignment_id}"):
            return
        current = self.assignment
        if assign is not None and current is not None and assign.assignment_id == current.assignment_id \
                and assign.model == current.model:
            logger.debug("assignment %s again (epoch %d): nothing to do", assign.assignment_id, assign.epoch)
            return
        if assign is not None and current is not None and same_model(assign.model, current.model) \
                and self.state.state == "ready" and not self.busy:
            # Only the extra models (or the id) changed: the main model stays as it is, nothing is re-warmed.
            self.assignment = assign
            self._set("ready", progress=1.0)
            self._start_extras(assign)
            return
        if assign is not None and current is not None and same_model(assign.model, current.model) and self.busy:
            # Already preparing this very model (a restarted agent gets its retained assignment, then the
            # coordinator's fresh one): carry on under the new id rather than pull and warm up all over again.
            self.assignment = assign
            self.state = self.state.model_copy(update={"model": assign.model, "assignment_id": assign.assignment_id,
                                                       "ts": time.time()})
            self._publish(self.state)
            logger.info("assigned %s again (%s) while preparing it: carrying on", assign.model, assign.assignment_id)
            return
        self.assignment = assign
        self._lost_backend = False
        if assign is None:
            self._restart(None)
            self._set("absent")
            return
        logger.info("assigned %s (%s): %s", assign.model, assign.assignment_id, assign.reason or "no reason given")
        self._restart(assign)

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Stop preparing (shutdown); returns the tasks to await."""
        tasks = [task for task in (self._task, self._extras) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        return tasks

    def _start_extras(self, assign: Assign) -> None:
        missing = [model for model in assign.also if not self.has_local(model)]
        if not missing:
            return
        if self._extras is not None and not self._extras.done():
            self._extras.cancel()
        self._extras = asyncio.get_running_loop().create_task(self._pull_extras(missing), name="extra-models")

    async def _pull_extras(self, models: list[str]) -> None:
        """Pull the assignment's extra models one by one; a failure is logged and the next one tried."""
        for model in models:
            try:
                logger.info("pulling extra model %s", model)
                async for _ in self.backend.pull(model):
                    pass
                self.update_local_models(publishable(await self.backend.list_models()))
            except BackendError as error:
                logger.warning("extra model %s not pulled: %s", model, error)

    def _restart(self, assign: Assign | None) -> None:
        old = self._task
        if old is not None and not old.done():
            old.cancel()
        self._task = asyncio.get_running_loop().create_task(self._run(assign, old), name="model-prepare") \
            if assign is not None else None

    def report_problem(self, error: str) -> None:
        """The runtime cannot serve anything (e.g. it lists no models): say so while nothing is assigned."""
        if self.assignment is None:
            self._set("failed", error=error)

    def backend_lost(self, error: str) -> None:
        """The backend went away: the model is not usable until it is back."""
        if self.assignment is None or self.busy:
            return  # a running preparation notices and waits by itself
        self._lost_backend = True
        self._set("failed", error=error)

    def backend_back(self) -> None:
        """The backend answers again: run the assignment again (a restarted Ollama has unloaded the model)."""
        if self.assignment is not None and self._lost_backend and not self.busy:
            self._lost_backend = False
            self._restart(self.assignment)

    def update_local_models(self, models: list[str], loaded: list[str] | None = None) -> None:
        """The backend's model list (or what it holds in memory) changed: the coordinator should know."""
        models = publishable(models)
        loaded = self.loaded_models if loaded is None else publishable(sorted(loaded))
        if models == self.local_models and loaded == self.loaded_models:
            return
        self.local_models = list(models)
        self.loaded_models = list(loaded)
        self.state = self.state.model_copy(update={"local_models": list(models), "loaded_models": list(loaded),
                                                   "ts": time.time()})
        self._publish(self.state)

    async def _run(self, assign: Assign, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # let the old pull close its stream first
        while True:
            try:
                await self._prepare(assign)
                return
            except BackendUnreachable as error:
                self._set("failed", error=str(error))
                self._report_unreachable(str(error))
                await self._wait_backend_up()
                logger.info("backend is back: preparing %s again", assign.model)
            except BackendError as error:
                logger.warning("assignment %s (%s) failed: %s", assign.model, assign.assignment_id, error)
                self._set("failed", error=str(error))
                return
            except asyncio.CancelledError:
                logger.info("assignment %s replaced", assign.assignment_id)
                raise
            except Exception as error:  # noqa: BLE001 - never kill the agent over one assignment
                logger.exception("assignment %s crashed", assign.assignment_id)
                self._set("failed", error=f"internal agent error: {type(error).__name__}: {error}")
                return

    async def _prepare(self, assign: Assign) -> None:
        model = assign.model
        if self.fragile() and self.has_local(model):
            # A runtime that interrupts answers (llama-cpp-python) holds what it serves and may be shared with
            # other users: it was listed and measured when the agent started; asking it again would cut their
            # answers short. Only a benchmark not taken yet is run.
            await self._finish_preparing(model, warm=False)
            return
        self.local_models = publishable(await self.backend.list_models())
        if not self.has_local(model):
            await self._pull(model)
            self.local_models = publishable(await self.backend.list_models())
        await self._finish_preparing(model, warm=True)

    async def _finish_preparing(self, model: str, *, warm: bool) -> None:
        self._set("loading")
        # The runtime is ours alone while we warm, measure and probe it: a job beside the probe would disturb both.
        async with self._exclusive():
            if warm:
                await self.backend.warm(model, self.keep_alive)
            benchmark = await self.benchmark_once(model, again=warm)
            if self._measure_runtime is not None:
                await self._measure_runtime(model)
            if warm:
                self.local_models = publishable(await self.backend.list_models())
        self._set("ready", progress=1.0)
        if benchmark is not None and self._on_benchmark is not None:
            self._on_benchmark(benchmark)
        if self.assignment is not None and self.assignment.also:
            self._start_extras(self.assignment)

    async def benchmark_once(self, model: str, *, again: bool = False) -> Benchmark | None:
        """The warm-up speed of ``model``; measured once unless ``again`` (the caller holds the runtime alone)."""
        if not self.benchmark_tokens:
            return None
        if again or model not in self.benchmarks:
            self.benchmarks[model] = await self._benchmark(model)
        return self.benchmarks[model]

    async def _pull(self, model: str) -> None:
        logger.info("pulling %s", model)
        self._set("pulling", progress=0.0)
        last_sent = time.monotonic()
        last_fraction: float | None = 0.0
        progress = None
        async for progress in self.backend.pull(model):
            fraction = progress.fraction
            if fraction is not None and last_fraction is not None:
                fraction = max(fraction, last_fraction)  # later layers must not move the bar backwards
            now = time.monotonic()
            if now - last_sent >= PROGRESS_INTERVAL_S:
                self._set("pulling", progress=fraction, completed_bytes=progress.completed_bytes,
                          total_bytes=progress.total_bytes)
                last_sent = now
            last_fraction = fraction if fraction is not None else last_fraction
        if progress is not None and progress.total_bytes:
            self._set("pulling", progress=1.0, completed_bytes=progress.total_bytes, total_bytes=progress.total_bytes)
        logger.info("pulled %s", model)

    async def _benchmark(self, model: str) -> Benchmark | None:
        """A short generation: the agent's measured speed for the coordinator's scoring."""
        started = time.monotonic()
        first: float | None = None
        last = started
        pieces = 0
        done: ChatDone | None = None
        messages = [ChatMessage(role="user", content=BENCHMARK_PROMPT)]
        options = {"num_predict": self.benchmark_tokens, "temperature": 0}
        try:
            async for event in self.backend.chat(model, messages, options, None, self.keep_alive):
                if isinstance(event, ChatDelta):
                    last = time.monotonic()
                    first = first or last
                    pieces += 1
                elif isinstance(event, ChatDone):
                    done = event
        except BackendUnreachable:
            raise
        except BackendError as error:
            logger.warning("warm-up benchmark of %s failed: %s", model, error)
            return None
        tokens = done.output_tokens if done and done.output_tokens else pieces
        if done and done.generation_s and tokens:
            speed = tokens / done.generation_s
        elif first is not None and pieces > 1 and last > first:
            speed = (pieces - 1) / (last - first)
        else:
            return None
        ttft = first - started if first is not None else None
        logger.info("%s: %.1f tokens/s, first token after %.3fs", model, speed, ttft or 0.0)
        return Benchmark(model=model, tokens_per_s=round(speed, 2), ttft_s=round(ttft, 4) if ttft else None)
