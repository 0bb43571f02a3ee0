"""The shipped cases and the recipe (golden/recipe.json) that regenerates them byte-identically."""
from __future__ import annotations

import copy
import importlib
import re
from importlib.resources import files as resource_files
from pathlib import Path

from refmtp.backends import set_kernels_enabled
from refmtp.config import ConfigError, ModelConfig, preset
from refmtp.memory import check_memory, forward_bytes
from refmtp.verification.golden.acceptance import acceptance_record, export_acceptance_case
from refmtp.verification.golden.cases import (DEFAULT_BIAS_STD, DEFAULT_INIT_STD, export_decode_case,
                                              export_model_case, export_trajectory_case)
from refmtp.verification.golden.files import MANIFEST, RECIPE, GoldenError, read_json, sha256_file
from refmtp.verification.golden.manifest import KINDS, read_manifest
from refmtp.verification.golden.speculative import check_settings, export_speculative_case


def config_from_recipe(entry: dict):
    """A validated ModelConfig from a recipe entry: ``preset`` + ``overrides`` or ``config``."""
    if "config" in entry:
        data = copy.deepcopy(entry["config"])
    elif "preset" in entry:
        data = preset(entry["preset"]).to_dict()
    else:
        raise ConfigError("a recipe case needs 'preset' (with optional 'overrides') or 'config'")
    for key, value in (entry.get("overrides") or {}).items():
        if key == "refmtp" and isinstance(value, dict):
            data["refmtp"] = {**data.get("refmtp", {}), **value}
        else:
            data[key] = copy.deepcopy(value)
    return ModelConfig.from_dict(data)


def _perturbations(entry: dict) -> dict:
    """The optional parameter perturbations of a recipe entry (see golden_params)."""
    return {k: float(entry[k]) for k in ("norm_std", "bias_mean") if entry.get(k)}


def shipped_dir() -> Path:
    """The directory of the installed package ``refmtp.golden`` (the repository's golden/)."""
    root = resource_files("refmtp.golden")
    path = Path(str(root))
    if not path.is_dir():
        raise GoldenError(f"the shipped golden cases are not a directory on disk ({root!s}): "
                          "install refmtp unzipped")
    return path


def on_demand(entry: dict) -> bool:
    """True for a recipe case that is not shipped (too large): ``refmtp golden generate --case
    NAME --out DIR`` makes it, and the recipe's ``hashes`` pin its inputs and parameters."""
    return bool(entry.get("on_demand"))


def shipped_cases(recipe: dict) -> dict:
    """{name: entry} of the recipe's shipped cases (every case but the on-demand ones)."""
    return {n: e for n, e in recipe["cases"].items() if not on_demand(e)}


def case_dirs(root) -> list[Path]:
    """Every case directory under a golden root: the recipe's shipped cases (which must exist),
    its on-demand cases that were generated there, and any other sub-directory with a manifest."""
    root = Path(root)
    found = {p.parent for p in root.glob(f"*/{MANIFEST}")}
    recipe = root / RECIPE
    if recipe.is_file():
        complete = root.resolve() == shipped_dir().resolve()  # elsewhere: a generated subset
        for name, entry in load_recipe(recipe)["cases"].items():
            d = root / name
            if (on_demand(entry) or not complete) and not (d / MANIFEST).is_file():
                continue
            if not (d / MANIFEST).is_file():
                raise GoldenError(f"{recipe} lists case {name} but {d / MANIFEST} is not there "
                                  "(HINT: `refmtp golden generate`)")
            found.add(d)
    if not found:
        raise GoldenError(f"{root} holds no golden case (no */{MANIFEST})")
    return sorted(found)


def shipped_case(name: str) -> Path | None:
    """The shipped case directory called ``name``, or None when no shipped case has that name.
    An on-demand case raises GoldenError saying how to generate it."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
        return None
    d = shipped_dir() / str(name)
    if (d / MANIFEST).is_file():
        return d
    entry = load_recipe(shipped_dir() / RECIPE)["cases"].get(str(name))
    if entry is not None and on_demand(entry):
        raise GoldenError(f"{name} is an on-demand case (not shipped): make it with `refmtp golden "
                          f"generate --case {name} --out DIR`, then verify DIR/{name}")
    return None


def list_cases(root=None) -> list[dict]:
    """One entry per case under ``root`` (default: the shipped cases), from its manifest:
    ``{name, kind, dtype, count, unit, description, path}``; ``count`` is the number of expected
    tensors (model, trajectory) or records (acceptance)."""
    out = []
    root = shipped_dir() if root is None else Path(root)
    recipe = load_recipe(root / RECIPE) if (root / RECIPE).is_file() else {"cases": {}}
    for name, entry in recipe["cases"].items():
        if on_demand(entry) and not (root / name / MANIFEST).is_file():
            out.append({"name": name, "kind": entry.get("kind", "model"), "dtype": entry.get("dtype", ""),
                        "count": 0, "unit": "(on demand)",
                        "description": f"not shipped: `refmtp golden generate --case {name} --out DIR`; "
                                       + entry.get("description", ""), "path": ""})
    for d in case_dirs(root):
        m = read_manifest(d)
        acc = m["kind"] == "acceptance"
        count = m.get("records") if acc else len(m.get("tensors", {}))
        out.append({"name": d.name, "kind": m["kind"], "dtype": m["dtype"], "count": count,
                    "unit": "records" if acc else "tensors", "description": m.get("description", ""),
                    "path": str(d)})
    return sorted(out, key=lambda c: c["name"])


def load_recipe(path) -> dict:
    recipe = read_json(path, "recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("cases"), dict) or not recipe["cases"]:
        raise GoldenError(f"{path}: a recipe is an object with a non-empty 'cases' object")
    for name, entry in recipe["cases"].items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise GoldenError(f"{path}: case name {name!r} must be letters, digits, _ or -")
        if not isinstance(entry, dict) or entry.get("kind", "model") not in KINDS:
            raise GoldenError(f"{path}: case {name} must be an object with kind {' or '.join(KINDS)}")
        if entry.get("kind", "model") != "acceptance":
            need = ("seed", "batch", "dtype", "description", "reason")
            if entry.get("kind") == "speculative":
                need = ("seed", "dtype", "description", "reason", "speculative")
            elif entry.get("kind") == "decode":
                need += ("schedule",)
            else:
                need += ("seq_len",)
            if entry.get("kind") == "trajectory":
                need += ("steps", "train")
            for key in need:
                if key not in entry:
                    raise GoldenError(f"{path}: case {name} lacks {key!r}")
            if entry.get("kind") == "speculative":
                check_settings(entry["speculative"], f"{path}: case {name}")
        elif "builder" not in entry:
            raise GoldenError(f"{path}: acceptance case {name} lacks 'builder' (module:function)")
    return recipe


def builder(spec: str):
    """The function a recipe's ``builder`` names (``refmtp.<module>:<function>``)."""
    module, _, attr = spec.partition(":")
    if not module.startswith("refmtp.") or not attr:
        raise ValueError(f"builder {spec!r} must be 'refmtp.<module>:<function>'")
    return getattr(importlib.import_module(module), attr)


def case_tokens(entry: dict) -> tuple[int, int]:
    """(batch, tokens per sequence) a tensor case runs: T+1 columns, a decode schedule's appends,
    or a speculative generation's prompt + new tokens (+ K draft slots)."""
    kind = entry.get("kind", "model")
    if kind == "decode":
        return int(entry.get("batch", 1)), sum(int(op.get("n", 0)) for op in entry.get("schedule", []))
    if kind == "speculative":
        sp = entry.get("speculative", {})
        return 1, int(sp.get("prompt_len", 0)) + int(sp.get("max_new_tokens", 0)) + int(sp.get("k", 0)) + 1
    return int(entry.get("batch", 1)), int(entry.get("seq_len", 0)) + 1


def check_case_size(name: str, entry: dict, cfg) -> None:
    """Before any work: the case's sequences fit max_position_embeddings and its weights,
    gradients and activations fit the memory (refmtp.memory); one-line ValueError otherwise."""
    batch, T = case_tokens(entry)
    if T > cfg.max_position_embeddings:
        raise ValueError(f"case {name}: {T} positions exceed max_position_embeddings="
                         f"{cfg.max_position_embeddings}: shorten it in the recipe")
    check_memory(forward_bytes(cfg, batch, T, entry.get("dtype", "float64"), gradients=True),
                 f"case {name}", "golden cases are for small configs: shrink it in the recipe")


def generate_case(out_root, name: str, entry: dict) -> dict:
    """(Re)make one recipe case under ``out_root/name``; returns its manifest."""
    command = f"refmtp golden generate --case {name}"
    common = {"reason": entry.get("reason", ""), "recipe": entry}
    if entry.get("kind", "model") == "acceptance":
        records = [acceptance_record(c) for c in builder(entry["builder"])()]
        return export_acceptance_case(Path(out_root) / name, records, name=name,
                                      description=entry.get("description", ""), command=command,
                                      extra=common)
    cfg = config_from_recipe(entry)
    check_case_size(name, entry, cfg)
    out_dir = Path(out_root) / name
    # what every tensor case takes from its recipe entry
    kw = dict(seed=entry["seed"], dtype=entry["dtype"], name=name, description=entry["description"],
              command=command, init_std=entry.get("init_std", DEFAULT_INIT_STD),
              bias_std=entry.get("bias_std", DEFAULT_BIAS_STD), extra=common)
    kind = entry.get("kind", "model")
    if kind == "trajectory":
        return export_trajectory_case(out_dir, cfg, steps=entry["steps"], train=entry["train"],
                                      batch=entry["batch"], seq_len=entry["seq_len"], **kw)
    if kind == "speculative":
        return export_speculative_case(out_dir, cfg, spec=entry["speculative"],
                                       lm_head_rank1=float(entry.get("lm_head_rank1", 0.0)), **kw)
    if kind == "decode":
        return export_decode_case(out_dir, cfg, schedule=entry["schedule"], batch=entry["batch"],
                                  perturb=_perturbations(entry), **kw)
    return export_model_case(out_dir, cfg, batch=entry["batch"], seq_len=entry["seq_len"],
                             perturb=_perturbations(entry), **kw)


def check_hashes(case_dir: Path, entry: dict) -> None:
    """The recipe's ``hashes`` {file: sha256} (on-demand cases: inputs and parameters) hold for
    the generated files; GoldenError otherwise (not bit-reproducible here)."""
    for name, want in sorted((entry.get("hashes") or {}).items()):
        got = sha256_file(case_dir / name)
        if got != want:
            raise GoldenError(f"{case_dir / name} sha256 {got[:16]}... differs from the recipe's "
                              f"{want[:16]}...: the case's inputs or parameters are not bit-reproducible "
                              "on this machine (report it)")


def generate(out_root=None, recipe_path=None, only=None, log=None) -> list[str]:
    """Regenerate the recipe's cases (all, or the names in ``only``) under ``out_root``.

    Defaults: the shipped recipe and the shipped directory. A recipe copy is written next to
    the cases when ``out_root`` is elsewhere, so the tree is self-describing.
    """
    recipe_path = Path(recipe_path) if recipe_path else shipped_dir() / RECIPE
    out_root = Path(out_root) if out_root else recipe_path.parent
    recipe = load_recipe(recipe_path)
    cases = recipe["cases"]
    names = [n for n in cases if not on_demand(cases[n])] if not only else list(only)
    for name in names:
        if name not in cases:
            raise ValueError(f"case {name!r} is not in {recipe_path} (known: {', '.join(cases)})")
        if on_demand(cases[name]) and out_root.resolve() == shipped_dir().resolve():
            raise ValueError(f"case {name} is generated on demand, not shipped: give --out DIR")
    out_root.mkdir(parents=True, exist_ok=True)
    if (out_root / RECIPE).resolve() != recipe_path.resolve():
        (out_root / RECIPE).write_bytes(recipe_path.read_bytes())
    # golden values are the plain array path's: kernels that round differently (the fused
    # softmax / SwiGLU / RMSNorm of issue 17) would change the pinned hashes
    previous = set_kernels_enabled(False)
    try:
        for name in names:
            generate_case(out_root, name, cases[name])
            check_hashes(out_root / name, cases[name])
            if log:
                log(f"  generated {name}")
    finally:
        set_kernels_enabled(previous)
    stale = sorted(p.parent.name for p in out_root.glob(f"*/{MANIFEST}") if p.parent.name not in recipe["cases"])
    if stale and log:
        log(f"  warning: {', '.join(stale)} not in the recipe (left as they are; delete them if obsolete)")
    return names
