"""What a person looks at after a run: the per-round table, the closing summary, PNG plots, and
``fedtune report``'s comparison of several runs (one table, one figure)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


DP_KEY = "epsilon"  # a private run's rows carry the epsilon spent so far


def table_header(dp: bool = False) -> str:
    """The header line of the per-round table (with an epsilon column for a private run)."""
    return (f"{'round':>5} {'train_loss':>10} {'eval_loss':>9} {'rougeL':>7} {'guard_loss':>10} "
            f"{'loops':>5} {'up/client':>10} {'down/client':>11} {'wall_s':>7} {'peak_MB':>8}"
            + (f" {'epsilon':>8}" if dp else ""))


def table_row(r: dict[str, Any], dp: bool = False) -> str:
    """One round's line of the per-round table: losses, Rouge-L, the damage guard's loss and
    share of looping answers, bytes per client, wall time, peak memory (and epsilon)."""
    return (f"{r['round']:>5} {_fmt(r.get('train_loss'), '.4f'):>10} "
            f"{_fmt(r.get('eval_loss'), '.4f'):>9} {_fmt(r.get('rougeL'), '.4f'):>7} "
            f"{_fmt(r.get('guard_eval_loss'), '.4f'):>10} "
            f"{_fmt(r.get('guard_repetition'), '.0%'):>5} "
            f"{human_bytes(r.get('bytes_up_per_client', 0)):>10} "
            f"{human_bytes(r.get('bytes_down_per_client', 0)):>11} "
            f"{_fmt(r.get('wall_s'), '.1f'):>7} {_fmt(r.get('peak_memory_mb'), '.0f'):>8}"
            + (f" {_fmt(r.get(DP_KEY), '.3g'):>8}" if dp else ""))


def rounds_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per round: losses, Rouge-L, bytes per client, wall time, peak memory."""
    dp = any(DP_KEY in r for r in rows)
    head = table_header(dp)
    return "\n".join([head, "-" * len(head), *(table_row(r, dp) for r in rows)])


def summary_text(summary: dict[str, Any]) -> str:
    """The closing lines of a run: before/after, cost, where things are."""
    b, f = summary["base"], summary["final"]
    by = summary["bytes"]
    out = [
        f"fedtune {summary['algorithm']}: {summary['rounds']} rounds, "
        f"{summary['clients_per_round']} of {summary['num_clients']} clients per round",
        f"  Rouge-L    before {_fmt(b.get('rougeL'), '.4f')}  after {_fmt(f.get('rougeL'), '.4f')}",
        f"  eval loss  before {_fmt(b.get('eval_loss'), '.4f')}  after "
        f"{_fmt(f.get('eval_loss'), '.4f')}",
        *_guard_lines(b.get("guard") or {}, f.get("guard") or {}),
        f"  bytes per client per round: up {human_bytes(by['up_per_client_round'])}, "
        f"down {human_bytes(by['down_per_client_round'])}; total {human_bytes(by['total'])}",
        f"  wall {summary['wall_s']:.1f} s, peak memory {summary['peak_memory_mb']:.0f} MB",
        f"  run directory: {summary['run_dir']}",
    ]
    if summary.get("privacy"):
        p = summary["privacy"]
        out.insert(-1, f"  privacy: ({_fmt(p['epsilon'], '.3g')}, {p['delta']:.3g})-DP at the "
                       f"client level (noise multiplier {p['noise_multiplier']:g}, clip "
                       f"{p['clip_norm']:g}) after {summary.get('rounds_run')} rounds")
    if summary.get("product"):  # FedPT: the proxy-tuned large model is the product
        out.append(f"  product: {summary['product']} (the proxy-tuned large model: `fedtune eval`"
                   " and `fedtune generate` on the run directory use it)")
        if summary.get("model_dir"):
            out.append(f"  tuned small model: {summary['model_dir']}")
    elif summary.get("model_dir"):
        out.append(f"  model: {summary['model_dir']}")
    if summary.get("plots"):
        out.append(f"  plots: {', '.join(summary['plots'])}")
    return "\n".join(out)


def _guard_lines(b: dict[str, Any], f: dict[str, Any]) -> list[str]:
    """The damage guard's lines of the summary (none when the run had no guard), with a warning
    when the tuned model got worse on it."""
    if not b and not f:
        return []
    from fedtune.eval.guard import guard_verdict

    out = [f"  guard (general instructions, not trained on): eval loss before "
           f"{_fmt(b.get('eval_loss'), '.4f')}  after {_fmt(f.get('eval_loss'), '.4f')}; "
           f"Rouge-L {_fmt(b.get('rougeL'), '.4f')} -> {_fmt(f.get('rougeL'), '.4f')}; "
           f"answers in a loop {_fmt(b.get('repetition_share'), '.0%')} -> "
           f"{_fmt(f.get('repetition_share'), '.0%')}"]
    warning = guard_verdict(b, f)
    if warning:
        out.append(f"  WARNING: {warning} (guard_answers.jsonl has the answers)")
    return out


def answer_rows(records: Sequence[Any], before: Sequence[str], after: Sequence[str],
                scorer: str = "rouge-score") -> list[dict[str, Any]]:
    """One row per eval record: prompt, reference, the base and final answers and their Rouge-L
    (by ``scorer``)."""
    from fedtune.eval.metrics import rouge_l_scores

    refs = [r.output for r in records]
    sb, sa = rouge_l_scores(before, refs, scorer), rouge_l_scores(after, refs, scorer)
    return [{"instruction": r.instruction, "input": r.input, "category": r.category,
             "reference": r.output, "before": b, "after": a, "rougeL_before": x, "rougeL_after": y}
            for r, b, a, x, y in zip(records, before, after, sb, sa, strict=True)]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def answers_text(rows: Sequence[dict[str, Any]], width: int = 96) -> str:
    """How the answers changed: counts by per-answer Rouge-L, then, in eval order, the first two
    answers whose Rouge-L rose and the first whose Rouge-L fell, before and after."""
    up = [r for r in rows if r["rougeL_after"] > r["rougeL_before"]]
    down = [r for r in rows if r["rougeL_after"] < r["rougeL_before"]]
    changed = [r for r in rows if r["before"] != r["after"]]
    out = [f"answers: {len(changed)} of {len(rows)} changed; per-answer Rouge-L up for "
           f"{len(up)}, down for {len(down)} (all in answers.jsonl); the first two up and the "
           "first down:"]
    for r in up[:2] + down[:1]:
        prompt = r["instruction"] + (f" | {r['input']}" if r["input"] else "")
        out += [f"  prompt    {_clip(prompt, width)}",
                f"  reference {_clip(r['reference'], width)}",
                f"  before    {_clip(r['before'], width)}   (Rouge-L {r['rougeL_before']:.2f})",
                f"  after     {_clip(r['after'], width)}   (Rouge-L {r['rougeL_after']:.2f})",
                ""]
    return "\n".join(out).rstrip()


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = base model)")


def _curve(ax: Any, pts: Sequence[tuple[float, float]], **style: Any) -> None:
    """A metric measured at ``pts``: a line through three or more, markers alone for fewer (two
    measurements, before and after, are no trend to draw a line through)."""
    if not pts:
        return
    if len(pts) < 3:
        style = {**style, "linestyle": "none"}
    ax.plot(*zip(*pts, strict=True), **style)


def run_figures(rows: Sequence[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """The two figures of one run, by file name: ``eval_metric.png`` (Rouge-L; train and eval
    loss) and ``bytes.png`` (cumulative bytes up, down and in total)."""
    plt = _pyplot()
    figs: dict[str, Any] = {}
    fig, (rouge_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    _curve(rouge_ax, [(r["round"], r["rougeL"]) for r in rows if r.get("rougeL") is not None],
           marker="o", markersize=7, label="eval Rouge-L")
    rouge_ax.set_title("Rouge-L of greedy answers")
    rouge_ax.set_ylabel("Rouge-L F (0 to 1)")
    _curve(loss_ax, [(r["round"], r["train_loss"]) for r in rows
                     if r.get("train_loss") is not None],
           marker=".", linestyle="--", label="train loss (mean of clients)")
    _curve(loss_ax, [(r["round"], r["eval_loss"]) for r in rows
                     if r.get("eval_loss") is not None],
           marker="o", markersize=7, label="eval loss")
    loss_ax.set_title("loss")
    loss_ax.set_ylabel("cross-entropy (nats per answer token)")
    for ax in (rouge_ax, loss_ax):
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: evaluation by round" if title else "evaluation by round")
    fig.tight_layout()
    figs["eval_metric.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [r["round"] for r in rows]
    # up and down are often equal (FedIT sends the same adapter both ways): distinct markers,
    # line styles and a drawing order that keeps both visible where they coincide
    for key, label, style in (
            ("cum_bytes", "total", {"marker": "o", "linestyle": "-", "linewidth": 2.5,
                                    "zorder": 1}),
            ("cum_bytes_down", "down (server to clients)",
             {"marker": "s", "markersize": 8, "linestyle": "--", "zorder": 2}),
            ("cum_bytes_up", "up (clients to server)",
             {"marker": "^", "markersize": 5, "linestyle": ":", "zorder": 3})):
        ax.plot(xs, [r.get(key, 0) / 1e6 for r in rows], label=label, **style)
    _integer_rounds(ax)
    ax.set_ylabel("cumulative MB (10^6 bytes), all clients")
    ax.set_title(f"{title}: bytes on the wire" if title else "bytes on the wire")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["bytes.png"] = fig
    return figs


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Write :func:`run_figures` as PNGs into ``out_dir``; their paths. ``title`` names the run
    (algorithm and run directory)."""
    plt = _pyplot()
    paths = []
    for name, fig in run_figures(rows, title).items():
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# -- fedtune report: several runs side by side ---------------------------------------------------
COMPARE_COLUMNS = (  # (key, header, format)
    ("run", "run", "s"), ("method", "method", "s"), ("rounds", "rounds", "d"),
    ("eval_loss_before", "eval loss before", ".4f"), ("eval_loss_after", "after", ".4f"),
    ("rougeL_before", "Rouge-L before", ".4f"), ("rougeL_after", "after", ".4f"),
    ("guard_loss_before", "guard loss before", ".4f"), ("guard_loss_after", "after", ".4f"),
    ("guard_loops_before", "guard loops before", ".0%"), ("guard_loops_after", "after", ".0%"),
    ("up_per_client_round", "up/client/round", "bytes"),
    ("down_per_client_round", "down/client/round", "bytes"),
    ("total_bytes", "total bytes", "bytes"), ("wall_s", "wall s", ".1f"),
    ("peak_memory_mb", "peak MB", ".0f"), ("epsilon", "epsilon", ".3g"))


@dataclass
class RunRecord:
    """What ``fedtune report`` reads of one run directory."""

    label: str  # the directory as the user named it
    method: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def load_run(run_dir: Path, label: str | None = None) -> RunRecord:
    """A run directory's metrics rows, summary (empty for an unfinished run) and method."""
    from fedtune.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl rows: not a fedtune run "
                                "directory")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    method = summary.get("algorithm")
    if method is None and (run_dir / "config.toml").is_file():
        method = tomllib.loads((run_dir / "config.toml").read_text())["algorithm"]["name"]
    return RunRecord(label or str(run_dir), str(method or "?"), rows, summary)


def _last(rows: Sequence[dict[str, Any]], key: str) -> Any:
    """The latest measured value of ``key`` (evaluations are sparse)."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def compare_row(run: RunRecord) -> dict[str, Any]:
    """One run's line of the comparison: before (round 0) and after (the last measurement)
    metrics, mean bytes per client per round, totals, wall time, peak memory, epsilon."""
    rows = run.rows
    base = rows[0] if rows[0]["round"] == 0 else {}
    trained = [r for r in rows if r["round"] > 0] or [{}]
    wall = run.summary.get("wall_s")
    if wall is None:  # an unfinished run: the rounds' own times
        wall = sum(r.get("wall_s") or 0.0 for r in rows)
    return {
        "run": run.label, "method": run.method, "rounds": rows[-1]["round"],
        "eval_loss_before": base.get("eval_loss"), "eval_loss_after": _last(rows, "eval_loss"),
        "rougeL_before": base.get("rougeL"), "rougeL_after": _last(rows, "rougeL"),
        "guard_loss_before": base.get("guard_eval_loss"),
        "guard_loss_after": _last(rows, "guard_eval_loss") if len(rows) > 1 else None,
        "guard_loops_before": base.get("guard_repetition"),
        "guard_loops_after": _last(rows, "guard_repetition") if len(rows) > 1 else None,
        "up_per_client_round": sum(r.get("bytes_up_per_client", 0) for r in trained)
        / len(trained),
        "down_per_client_round": sum(r.get("bytes_down_per_client", 0) for r in trained)
        / len(trained),
        "total_bytes": rows[-1].get("cum_bytes", 0), "wall_s": wall,
        "peak_memory_mb": max(r.get("peak_memory_mb") or 0.0 for r in rows),
        "epsilon": _last(rows, DP_KEY),
    }


def compare_table(lines: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison as aligned text, or as a Markdown table (for BENCHMARKS.md-style notes).
    The epsilon column appears only when a run is private."""
    cols = [c for c in COMPARE_COLUMNS  # epsilon and the guard only where some run has them
            if not c[0].startswith(("epsilon", "guard_"))
            or any(x[c[0]] is not None for x in lines)]

    def cell(value: Any, spec: str) -> str:
        if value is None:
            return "-"
        return human_bytes(value) if spec == "bytes" else format(value, spec)

    table = [[h for _, h, _ in cols]] + [[cell(x[k], f) for k, _, f in cols] for x in lines]
    if markdown:
        out = ["| " + " | ".join(table[0]) + " |", "|" + " --- |" * len(cols)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in table[1:]])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in table]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def compare_figure(runs: Sequence[RunRecord]) -> Any:
    """Eval loss and Rouge-L of every run, by round and by cumulative bytes (up and down, all
    clients; log scale, so a 1,000x cheaper method sits visibly to the left)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, run in enumerate(runs):
        style = {"color": f"C{i % 10}", "marker": "os^vDP*Xph"[i % 10],
                 "label": f"{run.label} ({run.method})"}
        for row_axes, key in ((axes[0], "eval_loss"), (axes[1], "rougeL")):
            measured = [r for r in run.rows if r.get(key) is not None]
            _curve(row_axes[0], [(r["round"], r[key]) for r in measured], **style)
            # round 0 has moved no bytes: no place on a log axis
            _curve(row_axes[1], [(r["cum_bytes"], r[key]) for r in measured
                                 if r.get("cum_bytes", 0) > 0], **style)
    for row_axes, ylabel in ((axes[0], "eval loss (nats per answer token)"),
                             (axes[1], "Rouge-L F (0 to 1)")):
        _integer_rounds(row_axes[0])
        row_axes[1].set_xscale("log")
        row_axes[1].set_xlabel("cumulative bytes, up + down, all clients (log scale)")
        for ax in row_axes:
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].set_title("by round")
    axes[0][1].set_title("by bytes on the wire (round 0, at 0 bytes, not shown)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.suptitle(f"{len(runs)} runs compared")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def report(run_dirs: Sequence[str], out_dir: Path) -> tuple[str, list[Path]]:
    """``fedtune report``: the comparison table (returned, and as ``report.md`` in ``out_dir``)
    and ``report.png`` (:func:`compare_figure`); the text and the files written."""
    runs = [load_run(Path(d), d.rstrip("/") or d) for d in run_dirs]
    lines = [compare_row(r) for r in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "report.md", out_dir / "report.png"
    md.write_text(compare_table(lines, markdown=True) + "\n")
    plt = _pyplot()
    fig = compare_figure(runs)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return compare_table(lines), [md, png]
