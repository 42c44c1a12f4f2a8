"""Side-by-side comparison of several `booth eval dreambench` results files: HTML report + markdown table.

`booth eval compare a/results.json b/results.json ... --out DIR` writes ``DIR/comparison.md`` and
``DIR/index.html`` (table, bar chart, fidelity-vs-prompt-fidelity scatter). Rows are files (default) or groups
of files (``--group method``: same model and adapter kinds, e.g. one method over many subjects).

A group's scores come in two averaging orders, both reported (evaluation.md §2.3): ``mean`` = mean of the
per-file (per-subject) scores, each subject weighing the same; ``global`` = mean over all pairs, i.e. DINO /
CLIP-I weighted by each file's number of (generated, real) pairs and CLIP-T by its number of generated images.
DIV, PRES, drift and KID have only the per-subject mean. Settings that make files incomparable (protocol,
backbones, CLIP-T text, images per prompt, prompt list, KID features) are listed at the top.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from booth.errors import BoothError

METRICS = ("dino", "clip_i", "clip_t", "div", "pres", "kid_x1000", "drift")
LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "div": "DIV",
    "pres": "PRES",
    "kid_x1000": "KID x10^3",
    "drift": "drift sim.",
}


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise BoothError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BoothError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not str(data.get("protocol", "")).startswith("booth dreambench"):
        raise BoothError(
            f"{path} is not a booth eval dreambench results file (no dreambench 'protocol' field)"
        )
    data["_path"] = str(path)
    return data


def flat_scores(r: dict[str, Any]) -> dict[str, float | None]:
    """The comparable scalar scores of one results file."""
    s = r["scores"]
    kid = s.get("kid") or {}
    drift = s.get("drift") or {}
    return {
        "dino": s.get("dino"),
        "clip_i": s.get("clip_i"),
        "clip_t": s.get("clip_t"),
        "div": s.get("div"),
        "pres": s.get("pres"),
        "kid_x1000": kid.get("kid_x1000"),
        "drift": drift.get("dino") if drift.get("dino") is not None else drift.get("clip"),
    }


def describe_adapter(r: dict[str, Any]) -> str:
    adapters = r.get("adapters") or []
    return ", ".join(f"{a['kind']} {Path(a['path']).name}" for a in adapters) or "none"


def file_label(r: dict[str, Any]) -> str:
    subject = Path(r["subject"]["images_dir"]).name
    return f"{describe_adapter(r)} ({subject})"


def method_key(r: dict[str, Any]) -> str:
    kinds = "+".join(a["kind"] for a in r.get("adapters") or []) or "base"
    return f"{r['model']['name']} {kinds}"


def incomparable(results: Sequence[dict[str, Any]]) -> list[str]:
    """Settings that differ between the files (each line: what, and its values)."""
    checks = {
        "protocol": lambda r: r["protocol"],
        "DINO backbone": lambda r: (r["backbones"]["dino"] or {}).get("name"),
        "CLIP backbone": lambda r: r["backbones"]["clip"]["name"],
        "CLIP-T text": lambda r: r["generation"]["clip_t_text"],
        "images per prompt": lambda r: r["generation"]["images_per_prompt"],
        "prompt count": lambda r: r["prompts"]["count"],
        "KID features": lambda r: r["backbones"].get("kid"),
        "sampling steps": lambda r: r["generation"]["steps"],
    }
    notes = []
    for what, get in checks.items():
        values = [str(get(r)) for r in results]
        if len(set(values)) > 1:
            notes.append(f"{what} differs: {', '.join(dict.fromkeys(values))}")
    return notes


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over files (per-subject first) and the pair-weighted global mean (see the module docstring)."""
    flats = [flat_scores(r) for r in results]
    mean: dict[str, float | None] = {}
    for m in METRICS:
        values = [f[m] for f in flats if f[m] is not None]
        mean[m] = statistics.fmean(values) if values else None
    spread = {
        m: statistics.pstdev([f[m] for f in flats if f[m] is not None])
        if sum(f[m] is not None for f in flats) > 1
        else None
        for m in METRICS
    }

    def weighted(metric: str, weight: str) -> float | None:
        pairs = [(f[metric], r["scores"][weight]) for f, r in zip(flats, results) if f[metric] is not None]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if pairs and total else None

    return {
        "files": len(results),
        "mean": mean,
        "std": spread,
        "global": {
            "dino": weighted("dino", "n_pairs"),
            "clip_i": weighted("clip_i", "n_pairs"),
            "clip_t": weighted("clip_t", "n_generated"),
        },
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare(
    paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None, group: str = "file"
) -> tuple[Path, Path]:
    """Write comparison.md, comparison.json and index.html in `out`; returns (markdown, html) paths."""
    from booth.generate.output import ensure_writable_dir

    if not paths:
        raise BoothError("no results files to compare")
    if group not in ("file", "method"):
        raise BoothError(f"--group must be file or method, got {group!r}")
    results = [load_results(p) for p in paths]
    if labels and len(labels) != (len(results) if group == "file" else len({method_key(r) for r in results})):
        raise BoothError(f"--labels gives {len(labels)} labels for {len(results)} rows")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        key = file_label(r) if group == "file" else method_key(r)
        while group == "file" and key in groups:
            key += "'"
        groups.setdefault(key, []).append(r)
    if labels:
        groups = dict(zip(labels, groups.values()))
    rows = [{"label": k, **aggregate(v), "members": [r["_path"] for r in v]} for k, v in groups.items()]
    overall = aggregate(results) if len(rows) > 1 else None
    notes = incomparable(results)

    out = ensure_writable_dir(out)
    md = markdown(rows, overall, notes)
    (out / "comparison.md").write_text(md, encoding="utf-8")
    (out / "comparison.json").write_text(
        json.dumps({"rows": rows, "overall": overall, "notes": notes}, indent=2) + "\n", encoding="utf-8"
    )
    html_path = write_html(out, rows, overall, notes, results)
    return out / "comparison.md", html_path


def markdown(rows: list[dict[str, Any]], overall: dict[str, Any] | None, notes: list[str]) -> str:
    head = ["label", "files", *(LABELS[m] for m in METRICS), "DINO global", "CLIP-I global", "CLIP-T global"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*rows, *([{"label": "all files", **overall}] if overall else [])]:
        cells = [r["label"].replace("|", "\\|"), str(r["files"])]
        cells += [_cell(r["mean"][m], 2 if m == "kid_x1000" else 3) for m in METRICS]
        cells += [_cell(r["global"][m]) for m in ("dino", "clip_i", "clip_t")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (
        "\nScores are raw cosines (DreamBench scale); columns are means over files (per subject first); "
        "'global' columns weight each file by its (generated, real) pairs (CLIP-T: by its generated images).\n"
    )
    if notes:
        text += "\nNot directly comparable:\n" + "".join(f"- {n}\n" for n in notes)
    return text


def write_html(
    out: Path,
    rows: list[dict[str, Any]],
    overall: dict[str, Any] | None,
    notes: list[str],
    results: list[dict[str, Any]],
) -> Path:
    from booth.evaluate.report import Report, bar_chart

    report = Report(f"DreamBench comparison: {len(results)} results files")
    for note in notes:
        report.text(f"Not directly comparable: {note}")
    report.text(
        "Raw cosine similarities (DreamBench scale). Means over files (per subject first); 'global' weights each "
        "file by its (generated, real) pairs (CLIP-T: generated images).",
        note=True,
    )
    table_rows = []
    for r in [*rows, *([{"label": "all files", **overall}] if overall else [])]:
        table_rows.append(
            [
                r["label"],
                r["files"],
                *(_num(r["mean"][m]) for m in METRICS),
                *(_num(r["global"][m]) for m in ("dino", "clip_i", "clip_t")),
            ]
        )
    report.table(
        ["label", "files", *(LABELS[m] for m in METRICS), "DINO global", "CLIP-I global", "CLIP-T global"],
        table_rows,
    )
    shown = [m for m in ("dino", "clip_i", "clip_t") if any(r["mean"][m] is not None for r in rows)]
    series = {r["label"]: [r["mean"][m] if r["mean"][m] is not None else 0.0 for m in shown] for r in rows}
    chart = bar_chart(
        out / "scores.png",
        [LABELS[m] for m in shown],
        series,
        "mean over subjects",
        ylim=(-0.1, 1.05),
    )
    report.image(chart.name, "DINO, CLIP-I, CLIP-T per row")
    scatter = comparison_scatter(out / "scatter.png", rows)
    report.image(scatter.name, "each point one row: subject fidelity vs prompt fidelity")
    report.heading("Files")
    report.table(
        ["file", "model", "adapter", "subject", "prompts", "images/prompt", "CLIP-T text"],
        [
            [
                r["_path"],
                r["model"]["name"],
                describe_adapter(r),
                Path(r["subject"]["images_dir"]).name,
                f"{r['prompts']['list']} ({r['prompts']['count']})",
                r["generation"]["images_per_prompt"],
                r["generation"]["clip_t_text"],
            ]
            for r in results
        ],
    )
    return report.save(out)


def _num(value):
    return "n/a" if value is None else float(value)


def comparison_scatter(path: Path, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "dino" if all(r["mean"]["dino"] is not None for r in rows) else "clip_i"
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    for r in rows:
        x, y = r["mean"][key], r["mean"]["clip_t"]
        if x is not None and y is not None:
            ax.scatter([x], [y], s=40, label=r["label"])
    ax.set_xlabel(f"subject fidelity ({LABELS[key]})")
    ax.set_ylabel("prompt fidelity (CLIP-T)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from booth.evaluate.report import save_figure

    return save_figure(fig, path)


def add_compare_command(eval_sub) -> None:
    p = eval_sub.add_parser(
        "compare",
        help="side-by-side of several `booth eval dreambench` results (HTML + markdown)",
    )
    p.add_argument("results", nargs="+", help="results.json files (or their run folders)")
    p.add_argument("--out", "-o", default="runs/dreambench-compare", help="output folder")
    p.add_argument("--labels", default=None, help="comma-separated row labels")
    p.add_argument(
        "--group",
        choices=["file", "method"],
        default="file",
        help="one row per file, or per model + adapter kinds",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    md, html = compare(args.results, args.out, labels, args.group)
    print(md.read_text(encoding="utf-8"))
    print(f"report: {html}")
    return 0


__all__ = ["add_compare_command", "aggregate", "compare", "flat_scores", "incomparable", "load_results"]
