"""ONNX slice: export, post-training quantization and localisation for ONNX Runtime."""
