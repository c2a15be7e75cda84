"""Offline evaluation of generated 28x28 Fashion-MNIST images: a small CNN classifier and image metrics."""
