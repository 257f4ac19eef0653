"""OpenVINO inference of a ``multichex export`` (optional: ``pip install multichex[openvino]``).

The same three ONNX graphs and sidecar as ONNX Runtime, compiled by OpenVINO for the CPU; the gate,
decoding and NMS are :class:`~multichex.inference.onnx_runtime.OnnxModel`'s, so both runtimes return
the same contract.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from multichex.inference.onnx_runtime import OnnxModel


class _CompiledGraph:
    """An OpenVINO compiled model behind ONNX Runtime's session calls (``run``, ``get_inputs``)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.inputs = [SimpleNamespace(name=port.get_any_name()) for port in compiled.inputs]

    def get_inputs(self) -> list[SimpleNamespace]:
        return self.inputs

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.array(results[port]) for port in self.compiled.outputs]


class OpenVinoModel(OnnxModel):
    """:class:`OnnxModel` with its graphs run by OpenVINO's CPU plugin."""

    runtime = "openvino"

    def _session(self, graph: Path, threads: int | None) -> _CompiledGraph:
        try:
            import openvino as ov
        except ImportError as error:
            raise ValueError("--runtime openvino needs the optional package: pip install 'multichex[openvino]'") from error
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        # Dynamic batch: the graphs were exported with a symbolic batch axis, which OpenVINO keeps.
        return _CompiledGraph(core.compile_model(core.read_model(str(graph)), "CPU", config))
