"""Outrider agent: monitored ONNX serving and the summaries it sends.

``MonitoredSession`` is imported lazily so that the collector can use the
shared summary math (``agent.sketches``) without loading onnxruntime.
"""
from typing import Any

__all__ = ["MonitoredSession"]


def __getattr__(name: str) -> Any:
    if name == "MonitoredSession":
        from agent.session import MonitoredSession

        return MonitoredSession
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
