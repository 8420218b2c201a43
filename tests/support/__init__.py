"""What tests, chaos runs (``tests/chaos``) and benchmarks (``bench/``) share to drive the real system.

* :mod:`tests.support.processes`: the environment of child processes, one wrapper for them, waiting, percentiles.
* :mod:`tests.support.loops`: an event loop in a background thread, for MQTT clients and in-process agents
  driven from synchronous code.
* :mod:`tests.support.rag_corpus`: the labelled retrieval corpus behind the default search mode.
* :mod:`tests.support.llama_runtime`: a real LLM runtime (llama-cpp-python's server with SmolLM2-135M).
* :mod:`tests.support.openai_chat`: one chat question to any OpenAI-compatible server (the runtime or the
  cluster), with its text, finish reason, token counts, restarts and timing.
"""
