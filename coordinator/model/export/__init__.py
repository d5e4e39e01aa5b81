"""Helpers shared by the ONNX exporters of ``coordinator.model`` (``common``)."""
