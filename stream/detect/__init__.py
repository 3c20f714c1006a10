"""Detectors: model manifest, ONNX Runtime sessions, per-model decoding, and the ensemble."""
