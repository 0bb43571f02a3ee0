"""One module per math object. Each has ``<op>_forward(...) -> (out, <Op>Cache)`` and
``<op>_backward(dout, cache) -> <Op>Grads`` side by side; backward is pure (fresh arrays, the
cache is never mutated)."""
