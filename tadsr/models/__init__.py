"""Networks written from the spec: Swin-UNet denoiser and VQ-f4 autoencoder (upstream key names)."""
