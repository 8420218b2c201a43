"""Fault injection: the harness and scenarios behind the fault tests and the long runs.

The in-suite tests (``tests/test_faults_*.py``) run each scenario briefly; the
long runs repeat them with the same code::

    python -m tests.chaos --trials 100          # every scenario, figures printed and saved as JSON
    python -m tests.chaos --only agent-kill --trials 100

See docs/reliability.md for what each scenario checks and the last figures.
"""
