"""Triton kernels for the sparse draft passes (installed as ``specgate.kernels``).

Triton is imported lazily, inside the launchers, so the CPU path never needs it.
"""
