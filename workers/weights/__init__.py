"""Weights in and out: Hugging Face checkpoints and their config, the weight pack loader and reader,
CUDA pinning of the pack, and random checkpoints for tests and demos."""
