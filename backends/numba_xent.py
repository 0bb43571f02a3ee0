"""Numba kernels: xent (see numba_kernels.py for the contract)."""
KERNELS: dict = {}
