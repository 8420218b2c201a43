"""The MQTT layer agent and coordinator share: one paho client, its settings and CLI, local broker launchers.

Light on purpose (paho-mqtt, pydantic): an agent machine imports it without the coordinator's dependencies.
"""
