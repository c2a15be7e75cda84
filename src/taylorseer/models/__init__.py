"""The embedded reference model: a small class-conditional DiT on Fashion-MNIST (no cache code here)."""
