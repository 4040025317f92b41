"""The Open Inference Protocol (KServe V2) over HTTP/REST, on the same data plane as gRPC.

``serve_rest(backend, listen)`` starts it; ``SwitchBackend(switch)`` is the
backend of ``agent serve`` (the gRPC servicer's ``ModelSwitch``: one data
plane, one set of checks, the same capture and feedback). ``RestApp`` is the
ASGI app itself, for anything else that can answer OIP calls (``Backend``).
Modules: ``codec`` (bodies <-> tensors), ``app`` (routes, budgets, errors),
``backend``, ``server`` (uvicorn on a thread).
"""
from agent.rest.app import RestApp
from agent.rest.backend import Backend, SwitchBackend
from agent.rest.server import RestServer, serve_rest

__all__ = ["Backend", "RestApp", "RestServer", "SwitchBackend", "serve_rest"]
