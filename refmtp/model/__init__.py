"""The math of DeepSeek-V3: ops, MLA, the router, balance losses, MoE, the decoder block, MTP,
the loss, and the whole model (``refmtp.model.model``), each forward next to its backward.

The whole model's API is importable from here::

    from refmtp.model import init_params, forward, backward, update_expert_bias
"""
from refmtp.model.model import (EMBED, LM_HEAD, NORM, ModelCache, ModelOutput, backward, check_params,
                                forward, init_params, routing_margin, routing_selection,
                                update_expert_bias)

__all__ = ["EMBED", "LM_HEAD", "NORM", "ModelCache", "ModelOutput", "backward", "check_params", "forward",
           "init_params", "routing_margin", "routing_selection", "update_expert_bias"]
