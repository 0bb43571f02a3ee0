"""Numba kernels: accept (see numba_kernels.py for the contract)."""
KERNELS: dict = {}
