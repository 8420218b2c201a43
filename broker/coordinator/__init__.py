"""The running coordinator: lifecycle, inbound messages, re-plans, query execution, views, console.

Import the parts you need (``broker.coordinator.runtime.Coordinator``, ``broker.coordinator.contract``); this
package's ``__init__`` stays empty so the contract types load without APScheduler.
"""
