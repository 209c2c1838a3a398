"""echoc: a compiler for sync-free, load-balanced, CUDA-graph-captured MoE training."""
__version__ = "0.1.0"
