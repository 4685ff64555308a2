"""tagd: a daemon that auto-tags image galleries with ONNX tagger models."""

__version__ = "0.1.0"
