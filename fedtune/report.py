"""What a person looks at after a run: PNG plots and a plain-text summary table."""

from __future__ import annotations

from collections.abc import Sequence
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


def rounds_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per round: losses, Rouge-L, bytes per client, wall time, peak memory."""
    dp = any("epsilon" in r for r in rows)  # a private run: epsilon spent so far
    head = (f"{'round':>5} {'train_loss':>10} {'eval_loss':>9} {'rougeL':>7} {'up/client':>10} "
            f"{'down/client':>11} {'wall_s':>7} {'peak_MB':>8}"
            + (f" {'epsilon':>8}" if dp else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {_fmt(r.get('train_loss'), '.4f'):>10} "
            f"{_fmt(r.get('eval_loss'), '.4f'):>9} {_fmt(r.get('rougeL'), '.4f'):>7} "
            f"{human_bytes(r.get('bytes_up_per_client', 0)):>10} "
            f"{human_bytes(r.get('bytes_down_per_client', 0)):>11} "
            f"{_fmt(r.get('wall_s'), '.1f'):>7} {_fmt(r.get('peak_memory_mb'), '.0f'):>8}"
            + (f" {_fmt(r.get('epsilon'), '.3g'):>8}" if dp else ""))
    return "\n".join(lines)


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
    if summary.get("model_dir"):
        out.append(f"  model: {summary['model_dir']}")
    if summary.get("plots"):
        out.append(f"  plots: {', '.join(summary['plots'])}")
    return "\n".join(out)


def answer_rows(records: Sequence[Any], before: Sequence[str], after: Sequence[str]
                ) -> list[dict[str, Any]]:
    """One row per eval record: prompt, reference, the base and final answers and their Rouge-L."""
    from fedtune.eval.metrics import rouge_l_scores

    refs = [r.output for r in records]
    sb, sa = rouge_l_scores(before, refs), rouge_l_scores(after, refs)
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


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``eval_metric.png`` (Rouge-L and eval loss by round) and ``bytes.png`` (cumulative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "rougeL", "Rouge-L F"), (axes[1], "eval_loss", "eval loss")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        axes[1].plot(*zip(*train, strict=True), marker=".", linestyle="--", label="train loss")
        axes[1].legend()
    fig.suptitle("evaluation by round (round 0 = base model)")
    fig.tight_layout()
    paths.append(out_dir / "eval_metric.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [r["round"] for r in rows]
    for key, label in (("cum_bytes_up", "up"), ("cum_bytes_down", "down"),
                       ("cum_bytes", "total")):
        ax.plot(xs, [r.get(key, 0) / 1e6 for r in rows], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative MB (all clients)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "bytes.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
