"""The Ollama test double as a process, with Nagle's algorithm off as on a real Ollama server.

Real Ollama is written in Go, whose sockets have TCP_NODELAY on by default.
``tests/ollama_double.py`` uses ``http.server``, whose handlers leave Nagle on:
on a kept-alive connection the first token then waits for the client's delayed
ACK of the response headers (~40 ms), a delay real Ollama never adds. A
benchmark of the overhead must not measure that artefact, so this entry point
turns Nagle off and otherwise runs the double unchanged.

    python -m bench.double --port 0 --models llama3.2:1b --tokens-per-s 400 --ttft-ms 20
"""

from __future__ import annotations

from tests import ollama_double


def main() -> None:
    ollama_double._Handler.disable_nagle_algorithm = True  # noqa: SLF001 - the double has no setting for it
    ollama_double.main()


if __name__ == "__main__":
    main()
