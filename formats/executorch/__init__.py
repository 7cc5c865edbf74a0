"""ExecuTorch slice: export (XNNPACK), post-training quantization (PT2E) and localisation."""
