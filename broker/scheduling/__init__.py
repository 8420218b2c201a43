"""Pure scheduling logic: catalog, scoring, estimates, registry, placement, routing, aggregation.

Functions of a registry snapshot and time, with no MQTT, no event loop and no clock of their own, so each is
tested with hardware fixtures alone. Nothing here imports from ``broker.coordinator``.
"""
