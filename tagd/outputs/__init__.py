"""The index to other tools: effective tags, exports, sidecars, evaluation."""
