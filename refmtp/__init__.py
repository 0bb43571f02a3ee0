"""refmtp: a NumPy-first reference of DeepSeek-V3's MLA, DeepSeekMoE and causal multi-token
prediction, with hand-derived backward passes, running on NumPy or CuPy."""

__version__ = "0.1.0"
