"""Quality-vs-cost scatter plots (matplotlib, PNG) with the Pareto front marked.

Written deterministically (no timestamps in the PNG metadata), so a report rebuilt from results.json is
byte-identical."""
from __future__ import annotations

from pathlib import Path

# task -> (quality key, label, higher is better)
QUALITY_AXIS = {
    "causal-lm": ("perplexity", "perplexity (lower is better)", False),
    "sequence-classification": ("accuracy", "accuracy", True),
    "feature-extraction": ("cosine", "cosine similarity to the source", True),
}
# task -> (label, function record -> latency)
LATENCY_AXIS = {
    "causal-lm": ("decode ms per token (median)", lambda r: r["latency"]["decode_ms_per_token"]),
    "sequence-classification": ("batch-1 latency ms (median)", lambda r: r["latency"]["batch1"]["median_ms"]),
    "feature-extraction": ("batch-1 latency ms (median)", lambda r: r["latency"]["batch1"]["median_ms"]),
}


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (x, lower is better) and quality (y)."""
    def better_or_equal(a, b):  # a at least as good as b on both axes
        qa, qb = (a[1], b[1]) if higher_is_better else (-a[1], -b[1])
        return a[0] <= b[0] and qa >= qb

    front = []
    for i, p in enumerate(points):
        if not any(j != i and better_or_equal(q, p) and q != p for j, q in enumerate(points)):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _value(record: dict, getter):
    try:
        v = getter(record)
    except (KeyError, TypeError):
        return None
    return v if isinstance(v, (int, float)) else None


def scatter(records: list[dict], task: str, cost: str, path: Path) -> Path | None:
    """Plot quality against `cost` ("latency" or "size") for the records of `task`; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qkey, qlabel, higher = QUALITY_AXIS[task]
    if cost == "latency":
        xlabel, xget = LATENCY_AXIS[task]
    else:
        xlabel, xget = "weights on disk (MB)", lambda r: r["size_bytes"] / 1e6
    pts, names = [], []
    for r in records:
        x, y = _value(r, xget), _value(r, lambda r: r["quality"][qkey])
        if x is not None and y is not None:
            pts.append((float(x), float(y)))
            names.append(f"{r['label']} [{r['backend']}]")
    if not pts:
        return None
    front = pareto_front(pts, higher)
    fig, ax = plt.subplots(figsize=(9.6, 4.4), dpi=100)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", marker="o",
            fillstyle="none", markersize=13, linestyle="--", label="Pareto front", zorder=1)
    # Each point is named in the legend beside the plot (distinct colour and marker), never by text on the
    # plot: nearby points' labels used to print on top of each other.
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xhp<>"
    for i, ((x, y), name) in enumerate(zip(pts, names)):
        ax.scatter([x], [y], color=colors[i % len(colors)], marker=markers[i % len(markers)], s=42, zorder=2,
                   label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(qlabel)
    ax.set_title(f"{task}: quality vs {cost}")
    ax.ticklabel_format(useOffset=False, axis="both")
    ax.margins(x=0.08, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return path
