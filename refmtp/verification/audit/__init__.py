"""``refmtp audit``: the model's math, step by step, each step checked independently.

    from refmtp.verification.audit.run import run_audit

    report = run_audit(preset="tiny", component="all", backward=True)
    print(report.render("markdown")); report.passed

The audit runs ONE small input (B=2 sequences of T=8 tokens, drawn from ``seed``) through the
library's own functions (``model.forward``, ``mla_forward``, ``moe_forward``, the decoder, the
acceptance rule, ...) and prints, for every step in order: the DeepSeek-V3 report's equation
number (or the docs/deepseek-v3.md section where the paper is silent), the formula, the shapes, a few values
at the chosen position ``i`` and batch row ``b``, and one or more checks, each ``pass`` or
``FAIL``. Components: ``mla`` (layer 0), ``moe`` (the first MoE layer), ``mtp`` (every depth),
``loss``, ``speculative`` (one verification step) and, with ``backward=True``, ``backward``
(central differences per layer and parameter). docs/audit.md lists every step and check.

Independence (the rule every check follows). A check never re-runs the code it checks. It
either

* recomputes the step with a DIFFERENT formula on the host, in float64 numpy / ``math.fsum``
  (explicit row blocks instead of reshape/permute, ``logaddexp.reduce`` instead of
  max-subtracted exp, complex multiplication instead of the pair rotation, per-token loops
  instead of the dispatch permutation, ...), or
* verifies an identity the step must satisfy (RoPE preserves norms and only relative positions
  matter; absorbed and naive attention scores agree; softmax rows sum to 1; selected gate values
  sum to ``routed_scaling_factor``; the latent-cache decoder reproduces the full forward; the
  speculative output at temperature 0 equals greedy decoding).

The auditors therefore import numpy directly: every independent recomputation happens
explicitly on the host, after ``bk.to_numpy``, never on the library's code path.

Reference weights. Recomputations that read weights read them from a REFERENCE copy: the
checkpoint file itself (``--ckpt``: ``model.safetensors`` read with safetensors directly, not
through :func:`refmtp.checkpoint.load_checkpoint`, including each MTP module's own
``embed_tokens`` / ``shared_head.head`` copies), or, for a preset or config, a host snapshot of
the initialised parameters taken before anything else runs. A weight that differs between the
reference and the parameters the library runs on (a loader or conversion bug: RoPE rows
permuted, ``eh_proj`` halves swapped, latent and RoPE rows of ``kv_a_proj_with_mqa``
exchanged) makes the check of the step that reads it fail. ``corrupt=`` (CLI ``--corrupt``)
injects such faults on purpose (:data:`CORRUPTIONS`) to show the checks can fail; a fault
written INTO the checkpoint file is a different model and no identity can see it (docs/audit.md).

Modules: ``steps`` (Step, Check, the Recorder, check helpers), ``host`` (independent host
math), ``context`` (model, reference, input; size check), ``corruptions``, one auditor per
component (``mla``, ``moe``, ``mtp``, ``loss``, ``speculative``, ``backward``) and ``report``
(text / markdown / json, and the list of components); ``run`` holds the entry point,
:func:`refmtp.verification.audit.run.run_audit`.
"""
