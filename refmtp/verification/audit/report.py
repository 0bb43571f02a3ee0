"""The audit report (:class:`AuditReport`) and its text, markdown and json renderings."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from refmtp.verification.audit.steps import Step

COMPONENTS = ("mla", "moe", "mtp", "loss", "speculative")  # in audit order; --backward adds "backward"
FORMATS = ("text", "markdown", "json")
FORMAT_VERSION = 1

TITLES = {
    "mla": "Multi-head Latent Attention, layer 0 (V3 eqs. 1-11; docs/deepseek-v3.md §2)",
    "moe": "DeepSeekMoE routing and experts (V3 eqs. 12-20; docs/deepseek-v3.md §3)",
    "mtp": "causal multi-token prediction (V3 eqs. 21-25; docs/deepseek-v3.md §4)",
    "loss": "training loss: cross-entropy, MTP weights, balance loss (V3 eqs. 17, 24, 25)",
    "speculative": "one self-speculative decoding step (docs/speculative-decoding.md §1-3; docs/deepseek-v3.md §4.6)",
    "backward": "gradients vs central differences, per layer (float64)",
}


@dataclass
class AuditReport:
    """What :func:`refmtp.verification.audit.run.run_audit` returns: the run's meta and every step."""

    meta: dict
    steps: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps)

    @property
    def components(self) -> list:
        seen = []
        for s in self.steps:
            if s.component not in seen:
                seen.append(s.component)
        return seen

    def counts(self) -> dict:
        """component -> {"steps", "checks", "failed"} (failed counts checks)."""
        out = {}
        for comp in self.components:
            steps = [s for s in self.steps if s.component == comp]
            checks = [c for s in steps for c in s.checks]
            out[comp] = {"steps": len(steps), "checks": len(checks),
                         "failed": sum(1 for c in checks if not c.passed)}
        return out

    def failures(self) -> list:
        """(step, check) for every failed check."""
        return [(s, c) for s in self.steps for c in s.checks if not c.passed]

    # -- rendering ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON document (format version :data:`FORMAT_VERSION`)."""
        comps = []
        for comp in self.components:
            comps.append({"name": comp, "title": TITLES.get(comp, comp),
                          "steps": [_step_dict(s) for s in self.steps if s.component == comp]})
        return {"refmtp_audit": FORMAT_VERSION, "meta": self.meta, "components": comps,
                "summary": self.counts(), "passed": self.passed}

    def render(self, fmt: str = "text") -> str:
        """The report as text (terminal), markdown (a review) or json (tools)."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if fmt == "markdown":
            return _render_markdown(self)
        if fmt == "text":
            return _render_text(self)
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _step_dict(s: Step) -> dict:
    d = asdict(s)
    d["passed"] = s.passed
    return d


def _fmt_vals(values: dict) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
        parts.append(f"{k} = {v}")
    return "  ".join(parts)


def _fmt_shapes(shapes: dict) -> str:
    return "  ".join(f"{k} ({', '.join(str(s) for s in v)})" for k, v in shapes.items())


def _header_lines(r: AuditReport) -> list:
    m = r.meta
    c = m["config"]
    lines = [
        f"refmtp audit: {m['source']}, seed {m['seed']}, {m['backend']} {m['dtype']}, "
        f"B={m['B']} T={m['T']}, position i={m['position']}, batch row b={m['batch_row']}"
        + (f", CORRUPTED: {m['corrupt']}" if m["corrupt"] else ""),
        f"config: d={c['hidden_size']} L={c['num_hidden_layers']} D={c['num_nextn_predict_layers']} "
        f"H={c['num_attention_heads']} Rq={c['q_lora_rank']} Rkv={c['kv_lora_rank']} "
        f"Dn={c['qk_nope_head_dim']} Dr={c['qk_rope_head_dim']} Dv={c['v_head_dim']} "
        f"E={c['n_routed_experts']} K={c['num_experts_per_tok']} G={c['n_group']}/{c['topk_group']} "
        f"V={c['vocab_size']}",
        f"tokens[b] = {m['tokens[b]']}",
    ]
    return lines


def _render_text(r: AuditReport) -> str:
    """The terminal rendering: one block per step, then the summary."""
    lines = _header_lines(r)
    for comp in r.components:
        lines += ["", f"== {comp}: {TITLES.get(comp, comp)} =="]
        for s in (x for x in r.steps if x.component == comp):
            lines.append(f"[{comp} {s.index}] {s.title}   ({s.ref})")
            lines.append(f"  formula: {s.formula}")
            if s.shapes:
                lines.append(f"  shapes:  {_fmt_shapes(s.shapes)}")
            if s.values:
                lines.append(f"  values:  {_fmt_vals(s.values)}")
            for c in s.checks:
                lines.append(f"  {'pass' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    lines += ["", "summary:"]
    for comp, n in r.counts().items():
        lines.append(f"  {comp:<12} {n['steps']:>3} steps {n['checks']:>4} checks  "
                     + ("all pass" if not n["failed"] else f"{n['failed']} FAIL"))
    total_f = len(r.failures())
    lines.append(f"{'PASS' if r.passed else 'FAIL'}: {sum(n['checks'] for n in r.counts().values())} checks, "
                 f"{total_f} failed, {r.meta['seconds']:.1f} s")
    return "\n".join(lines)


def _md(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_markdown(r: AuditReport) -> str:
    """The review rendering: a summary table, then one table per component."""
    m = r.meta
    lines = ["# refmtp audit", ""]
    lines += [f"- {_md(x)}" for x in _header_lines(r)]
    lines += [f"- result: **{'PASS' if r.passed else 'FAIL'}** in {m['seconds']:.1f} s", "",
              "| component | steps | checks | failed |", "|---|---:|---:|---:|"]
    for comp, n in r.counts().items():
        lines.append(f"| {comp} | {n['steps']} | {n['checks']} | {n['failed']} |")
    for comp in r.components:
        lines += ["", f"## {comp}: {_md(TITLES.get(comp, comp))}", "",
                  "| # | step | ref | formula | shapes | values at (b, i) | checks | result |",
                  "|---:|---|---|---|---|---|---|---|"]
        for s in (x for x in r.steps if x.component == comp):
            checks = "<br>".join(f"{'✓' if c.passed else '✗ **FAIL**'} {_md(c.name)}: {_md(c.detail)}"
                                 for c in s.checks)
            lines.append(f"| {s.index} | {_md(s.title)} | {_md(s.ref)} | `{_md(s.formula)}` | "
                         f"{_md(_fmt_shapes(s.shapes))} | {_md(_fmt_vals(s.values))} | {checks} | "
                         f"{'pass' if s.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"
