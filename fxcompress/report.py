"""The compression report: one record per pass and a per-layer table, as text, Markdown or JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PassRecord:
    index: int
    name: str
    exact: bool
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    max_deviation: float | None = None
    verified: bool | None = None
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


@dataclass
class Report:
    model: str = ""
    passes: list[PassRecord] = field(default_factory=list)
    layers_before: list[dict] = field(default_factory=list)
    layers_after: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        data = dict(data)
        data["passes"] = [PassRecord(**p) for p in data.get("passes", [])]
        return cls(**data)

    def totals(self) -> dict:
        def total(rows, key):
            return sum(r[key] for r in rows)
        return {"params_before": total(self.layers_before, "params"), "params_after": total(self.layers_after, "params"),
                "macs_before": total(self.layers_before, "macs"), "macs_after": total(self.layers_after, "macs")}

    def _pass_rows(self):
        return [[p.index, p.name, "exact" if p.exact else "approx", f"{p.seconds:.2f}",
                 f"{p.params_before:,} -> {p.params_after:,}", f"{p.macs_before:,} -> {p.macs_after:,}",
                 "-" if p.max_deviation is None else f"{p.max_deviation:.3g}",
                 {None: "-", True: "yes", False: "no"}[p.verified]] for p in self.passes]

    def _layer_rows(self):
        after = {r["name"]: r for r in self.layers_after}
        before = {r["name"]: r for r in self.layers_before}
        names = list(before) + [n for n in after if n not in before]
        rows = []
        for name in names:
            b, a = before.get(name), after.get(name)
            ref = a or b
            rows.append([name, ref["type"], "x".join(map(str, ref["output_shape"] or ())),
                         f"{b['params']:,}" if b else "-", f"{a['params']:,}" if a else "(removed)",
                         f"{b['macs']:,}" if b else "-", f"{a['macs']:,}" if a else "-"])
        return rows

    _PASS_HEAD = ["#", "pass", "kind", "seconds", "params", "MACs", "max |dev|", "verified"]
    _LAYER_HEAD = ["layer", "type", "output", "params before", "params after", "MACs before", "MACs after"]

    def summary(self) -> str:
        t = self.totals()
        lines = [f"fxcompress report for {self.model}", "", "passes:", _text_table(self._PASS_HEAD, self._pass_rows()),
                 "", "layers:", _text_table(self._LAYER_HEAD, self._layer_rows()), "",
                 _totals_line(t)]
        lines += [f"{key}: {value}" for key, value in self.metrics.items() if not _is_table(value)]
        for key, value in self.metrics.items():
            if _is_table(value):
                lines += ["", f"{key}:", _text_table(list(value[0]), [list(r.values()) for r in value])]
        notes = [f"  [{p.name}] {n}" for p in self.passes for n in p.notes]
        if notes:
            lines += ["", "notes:", *notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        t = self.totals()
        parts = [f"# fxcompress report: {self.model}", "", "## Passes", "", _md_table(self._PASS_HEAD, self._pass_rows()),
                 "", "## Layers", "", _md_table(self._LAYER_HEAD, self._layer_rows()), "", _totals_line(t)]
        parts += [f"- {key}: {value}" for key, value in self.metrics.items() if not _is_table(value)]
        for key, value in self.metrics.items():
            if _is_table(value):
                parts += ["", f"**{key}**", "", _md_table(list(value[0]), [list(r.values()) for r in value])]
        notes = [f"- **{p.name}**: {n}" for p in self.passes for n in p.notes]
        if notes:
            parts += ["", "## Notes", "", *notes]
        for p in self.passes:
            if p.layers:
                head = list(dict.fromkeys(key for row in p.layers for key in row))
                rows = [[_cell(row.get(key, "")) for key in head] for row in p.layers]
                parts += ["", f"## Pass {p.index}: {p.name}, per layer", "", _md_table(head, rows)]
        return "\n".join(parts) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


def _is_table(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _ratio(before: int, after: int) -> str:
    return f"{after / before:.3f}" if before else "-"


def _totals_line(t: dict) -> str:
    return (f"total params {t['params_before']:,} -> {t['params_after']:,} (x{_ratio(t['params_before'], t['params_after'])}), "
            f"MACs {t['macs_before']:,} -> {t['macs_after']:,} (x{_ratio(t['macs_before'], t['macs_after'])})")


def _text_table(head: list, rows: list) -> str:
    cells = [list(map(str, head))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _md_table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
