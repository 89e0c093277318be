"""Mod-Squad and M³ViT against shared-backbone baselines on Fashion-MNIST with three label sets."""
