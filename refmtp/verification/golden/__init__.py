"""Golden files: a framework-neutral record of what refmtp computes, and its verifier.

Specification: ``docs/golden-format.md``. A *model case* is one directory::

    config.json            the model config, exactly as save_checkpoint writes it
    model.safetensors      the parameters under the checkpoint names (save_checkpoint's writer)
    inputs.safetensors     tokens int64 (B, T+1)
    expected.safetensors   logits, mtp_logits.{k}, loss.*, grad.{name}, routing.{layer}.*,
                           bias_after_update.{layer}
    manifest.json          format, case, description, versions, command, tolerances, sha256s

A *trajectory case* holds S training steps (``trajectory.*``, ``final.*``), a *decode case*
a schedule of appends and rollbacks through the absorbed latent cache, the main model's and
every causal MTP module's (``decode.*``, ``decode.*.mtp.*``), a *speculative case* one seeded
self-speculative generation step by step (``spec.*``). An
*acceptance case* is a directory with ``records.json`` (speculative-decoding acceptance
records, dyadic numbers written as exact decimal strings, RNG-v1 rules of
docs/speculative-decoding.md §2.2) and ``manifest.json``.

    export_model_case(out_dir, cfg, seed=0, batch=2, seq_len=8, dtype="float64")
    export_acceptance_case(out_dir, records)
    generate(out_dir, recipe)                 # every case of golden/recipe.json
    report = verify_case(case_dir, backend="numpy", against=None)
    print(format_report(report)); report.status   # "pass" | "mismatch"

One module per concern:

    files       bytes on disk: file names, canonical JSON, sha256, safetensors, GoldenError
    compare     tolerances, Row, Report, compare_tensor(s), strict JSON equality
    manifest    read_manifest, check_files, the files' entries, decode schedules
    cases       model, trajectory and decode cases: golden params, compute_*, export_*
    speculative speculative cases: compute, export, recompute, the first diverging step
    acceptance  acceptance records: dyadic strings, replay, export, read, verify
    verify      verify_case, recompute, the --against handling, dtype hints
    report      format_report
    recipe      the shipped cases and the recipe: list, load, generate

File I/O and comparison use numpy directly (host-side bookkeeping); the model math runs on
the chosen backend through ``refmtp.model`` and comes back through ``bk.to_numpy``.
Unreadable, tampered or foreign files raise :class:`GoldenError` with one line (the CLI
exits 2 on it); numerical disagreement is a report with status "mismatch" (exit 1).
"""
from refmtp.verification.golden.acceptance import (acceptance_record, export_acceptance_case,
                                                   read_records)
from refmtp.verification.golden.cases import (compute_case, compute_decode, compute_trajectory,
                                              export_decode_case, export_model_case,
                                              export_trajectory_case)
from refmtp.verification.golden.compare import NOT_CHECKED, Report, Row, compare_tensors
from refmtp.verification.golden.files import MANIFEST, RECIPE, GoldenError, read_tensors
from refmtp.verification.golden.manifest import check_files, read_manifest
from refmtp.verification.golden.recipe import (case_dirs, generate, list_cases, load_recipe,
                                               shipped_case, shipped_dir)
from refmtp.verification.golden.report import format_report
from refmtp.verification.golden.speculative import (compute_speculative, export_speculative_case,
                                                    first_divergence)
from refmtp.verification.golden.verify import recompute, verify_case

__all__ = ["MANIFEST", "NOT_CHECKED", "RECIPE", "GoldenError", "Report", "Row", "acceptance_record",
           "case_dirs", "check_files", "compare_tensors", "compute_case", "compute_decode",
           "compute_speculative", "compute_trajectory", "export_acceptance_case", "export_decode_case",
           "export_model_case", "export_speculative_case", "export_trajectory_case", "first_divergence", "format_report", "generate", "list_cases", "load_recipe",
           "read_manifest", "read_records", "read_tensors", "recompute", "shipped_case", "shipped_dir",
           "verify_case"]
