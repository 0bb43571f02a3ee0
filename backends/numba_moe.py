"""Numba kernels: moe (see numba_kernels.py for the contract)."""
KERNELS: dict = {}
