"""What the REST endpoint serves: a ``Backend``, and the one every ``agent serve`` uses.

The REST app (``agent.rest.app``) knows only this interface, so anything that
can answer OIP calls can sit behind it: ``SwitchBackend`` serves the versions a
``ModelSwitch`` holds (the same switch, data plane and session the gRPC
servicer uses, so a REST request is checked, run, captured and kept for
feedback exactly as a gRPC one); ``agent proxy`` can pass the same calls to an
upstream server.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agent.dataplane import ModelMetadata
from agent.errors import NotFound, Unavailable
from agent.switch import ModelSwitch
from agent.tensors import WireTensor


class Backend(Protocol):
    """The calls of the Open Inference Protocol, transport-free; errors are ``agent.errors``'.

    ``ready``, ``model_ready``, ``metadata`` and ``served`` run on the event loop and must answer at once
    (from memory: a backend that asks an upstream server keeps a recent answer); ``infer`` runs on a
    worker thread and may block."""

    def ready(self) -> bool: ...
    def model_ready(self, name: str, version: str) -> bool: ...
    def metadata(self, name: str, version: str) -> ModelMetadata: ...

    def infer(self, name: str, version: str, inputs: Sequence[WireTensor], outputs: Sequence[str],
              request_id: str) -> tuple[str, str, list[tuple[str, np.ndarray]]]:
        """(model name, version that answered, [(output name, array)]) — blocking; run off the event loop."""
        ...

    def served(self) -> str:
        """The name of the model served (for the 'not found' messages)."""
        ...


class SwitchBackend:
    """The version a ``ModelSwitch`` holds, request by request, as ``agent.server.InferenceServicer`` serves it.

    ``shutting_down``: set when the server drains (ready calls answer False), shared with the gRPC servicer."""

    def __init__(self, switch: ModelSwitch, shutting_down: threading.Event | None = None) -> None:
        self.switch = switch
        self.shutting_down = shutting_down if shutting_down is not None else threading.Event()

    def served(self) -> str:
        return self.switch.model_name

    def ready(self) -> bool:
        return not self.shutting_down.is_set() and self.switch.current is not None

    def model_ready(self, name: str, version: str) -> bool:
        current = self.switch.current
        return not self.shutting_down.is_set() and current is not None and current.plane.ready(name, version)

    def metadata(self, name: str, version: str) -> ModelMetadata:
        if name != self.switch.model_name:
            raise NotFound(f"model '{name}' is not served here; this server serves '{self.switch.model_name}'")
        current = self.switch.current
        if current is None:
            raise Unavailable(self.switch.waiting_message())
        return current.plane.metadata(name, version)

    def infer(self, name: str, version: str, inputs: Sequence[WireTensor], outputs: Sequence[str],
              request_id: str) -> tuple[str, str, list[tuple[str, np.ndarray]]]:
        served = self.switch.acquire(name)
        try:  # the whole call on the version it started on, even if a swap happens meanwhile
            shadow = self.switch.shadow
            results = served.plane.infer(name, version, inputs, outputs, request_id,
                                         tap=shadow.offer if shadow is not None else None)
        finally:
            self.switch.release(served)
        return served.plane.model_name, served.version, results
