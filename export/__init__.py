"""Export of the served networks to ONNX (and from there to TensorRT): contracts, export, validation."""
