"""How onnxruntime runs a served model: threads, execution providers, graph optimisation.

One home for the options ``outrider agent serve`` takes (``--intra-op-threads``,
``--inter-op-threads``, ``--providers``, ``--graph-optimization``) and hands to every
session it opens: the model it serves, each version a managed agent swaps to, and
a shadowed candidate.

The defaults suit a server that shares its cores with the summary helper:
requests run side by side on the server's worker threads, so each runs on one
intra-op thread, and pool threads never spin. onnxruntime's own default (a
spinning pool of one thread per core in every session) made a 50-tree forest at
batch 64 1.65x slower at p50 with 2.1x the CPU per request once the summary
helper shared the cores. Raise ``intra_op_threads`` for large batches at low
concurrency.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.errors import InvalidArgument

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Short names an operator may type; any full name onnxruntime knows is accepted too.
SHORT_PROVIDERS = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                   "openvino": "OpenVINOExecutionProvider", "dnnl": "DnnlExecutionProvider",
                   "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider",
                   "coreml": "CoreMLExecutionProvider", "directml": "DmlExecutionProvider",
                   "xnnpack": "XnnpackExecutionProvider"}
GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                      "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime settings for every session an agent opens (see the module's docstring)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = (CPU,)
    graph_optimization: str = "all"

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
                raise InvalidArgument(f"{name} must be a whole number from 0 (onnxruntime's choice: one per core) "
                                      f"to 1024, not {value!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise InvalidArgument(f"graph optimisation {self.graph_optimization!r} is not one of "
                                  f"{', '.join(GRAPH_OPTIMIZATION)}")
        object.__setattr__(self, "providers", tuple(parse_providers(self.providers)))

    def session_options(self) -> Any:
        """A new ``onnxruntime.SessionOptions`` with these settings."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[
            self.graph_optimization])
        # A spinning pool burns the core the summary helper (and the other requests) need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options

    def usable_providers(self) -> list[str]:
        """The providers asked for that this onnxruntime build has, in order, the CPU last: the
        fallback. Each one asked for but missing is said once in the log."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        usable = [p for p in self.providers if p in available]
        for missing in (p for p in self.providers if p not in available):
            log.warning("execution provider %s is not in this onnxruntime build (it has %s); falling back to "
                        "the next one", missing, ", ".join(sorted(available)))
        return usable if CPU in usable else [*usable, CPU]

    def session_kwargs(self) -> dict[str, Any]:
        """``sess_options`` and ``providers`` for ``MonitoredSession`` / ``InferenceSession``."""
        return {"sess_options": self.session_options(), "providers": self.usable_providers()}

    def describe(self) -> str:
        """One line for the serving log."""
        return (f"onnxruntime {', '.join(self.usable_providers())}; intra-op threads "
                f"{self.intra_op_threads or 'one per core'}, inter-op {self.inter_op_threads or 'one per core'}; "
                f"graph optimisation {self.graph_optimization}")


def parse_providers(names: Any) -> list[str]:
    """Provider names (a comma-separated string or a sequence; short forms like ``cuda`` allowed)
    as onnxruntime spells them. InvalidArgument, naming the known ones, for a name it does not know."""
    import onnxruntime as ort

    if isinstance(names, str):
        names = names.split(",")
    known = {p.lower(): p for p in (*ort.get_all_providers(), *SHORT_PROVIDERS.values())}
    out: list[str] = []
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue  # "cuda,,cpu" or a trailing comma
        full = SHORT_PROVIDERS.get(name.lower()) or known.get(name.lower())
        if full is None:
            raise InvalidArgument(f"unknown execution provider {name!r}: use one of "
                                  f"{', '.join(SHORT_PROVIDERS)} or a name onnxruntime knows "
                                  "(onnxruntime.get_all_providers())")
        if full not in out:
            out.append(full)
    if not out:
        raise InvalidArgument("no execution provider given: name at least one, e.g. cpu")
    return out


__all__ = ["RuntimeOptions", "parse_providers"]
