"""Core ML slice: export (.mlpackage), post-training quantization and localisation (through the simulator)."""
