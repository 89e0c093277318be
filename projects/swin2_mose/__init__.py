"""Swin2-MoSE (Rossi et al. 2024) on real Sentinel-2 images: ×2 super-resolution at this machine's scale."""
