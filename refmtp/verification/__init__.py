"""Verification: golden files, the bug catalog's conformance run, the audit, the gradient
checker and the FLOP count. Nothing here is needed to train or decode."""
