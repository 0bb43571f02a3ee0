"""Inference: the latent KV cache, cached decoding, sampling, acceptance rules and the
speculative-decoding loop. Forward only; it composes the model's own wiring (refmtp.model)."""
