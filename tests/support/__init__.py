"""What tests, chaos runs (``tests/chaos``) and benchmarks (``bench/``) share to drive the real system.

* :mod:`tests.support.processes`: the environment of child processes, one wrapper for them, waiting, percentiles.
* :mod:`tests.support.loops`: an event loop in a background thread, for MQTT clients and in-process agents
  driven from synchronous code.
* :mod:`tests.support.rag_corpus`: the labelled retrieval corpus behind the default search mode.
"""
