"""The agent: runs on every machine of the cluster, reports its hardware and load, serves one model.

Only needs ``agent/requirements.txt`` (no gradio, torch or lancedb).
"""

__version__ = "0.1.0"
