"""KernelStats: the per-node result of graphshape.analyze, as rows, JSON, a table and a plot."""

from __future__ import annotations

import json
import math
from typing import Any

#: Columns, in table order, with what each number means (docs/analysis.md says more).
COLUMNS = {
    "node": "IR node name",
    "op": "canonical op",
    "activation": "activation name (activation nodes; None elsewhere)",
    "q_pred": "predicted q: mean squared entry, mean over examples",
    "c_pred": "predicted c, mean over example pairs",
    "q_emp": "measured q (empirical=True)",
    "c_emp": "measured c, mean over example pairs (empirical=True)",
    "q_local": "q predicted by this node's rule from the measured kernels of its inputs",
    "c0": "C_f(0) of the network from the input to this node",
    "c_slope_1": "C_f'(1) of the network from the input to this node",
    "c_curv_1": "C_f''(1) of the network from the input to this node",
    "flags": "why a number is approximate or unknown",
}


class KernelStats:
    """Per-node kernel statistics. ``rows``: one dict per node (topological order) with the
    keys of :data:`COLUMNS` (``q_emp``, ``c_emp``, ``q_local`` only when measured) and
    ``notes`` (details behind the flags). Unknown numbers are None, never NaN.
    ``meta``: what the inputs were, batch size, whether measured."""

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                 kernels: dict[str, dict[str, Any]] | None = None):
        self.rows = rows
        self.meta = dict(meta or {})
        #: node -> {"q_pred": (B,) array, "c_pred": (B, B) array, and when measured
        #: "q_emp", "c_emp"}: the per-example q and per-pair c behind the rows' means
        self.kernels = kernels or {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, node: str) -> dict[str, Any]:
        for row in self.rows:
            if row["node"] == node:
                return row
        raise KeyError(node)

    @property
    def empirical(self) -> bool:
        return bool(self.rows) and "q_emp" in self.rows[0]

    def to_dict(self, kernels: bool = False) -> dict[str, Any]:
        """Plain data: meta, column meanings, rows; with ``kernels=True`` also the
        per-example q and per-pair c of every node (``self.kernels``, as nested lists)."""
        out = {"meta": self.meta, "columns": COLUMNS, "rows": [_clean(r) for r in self.rows]}
        if kernels:
            out["kernels"] = {node: {k: _clean_array(v) for k, v in d.items()}
                              for node, d in self.kernels.items()}
        return out

    def to_json(self, indent: int | None = 2, kernels: bool = False) -> str:
        """JSON text; infinite curvatures (ReLU kinks) are written as the string "inf"."""
        return json.dumps(self.to_dict(kernels), indent=indent, allow_nan=False)

    def table(self, max_rows: int | None = None) -> str:
        """A text table. With measurements it adds ``q_emp/q_pred`` (the drift of the global q,
        a random walk at finite width) and ``q_emp/q_local`` (the error of one rule step)."""
        cols = ["node", "op", "q_pred", "c_pred"]
        if self.empirical:
            cols += ["q_emp", "c_emp", "q_local", "q_emp/q_pred", "q_emp/q_local"]
        cols += ["c0", "c_slope_1", "c_curv_1", "flags"]
        lines = [[c for c in cols]]
        rows = self.rows
        skipped = 0
        if max_rows is not None and len(rows) > max_rows:
            skipped = len(rows) - max_rows
            rows = rows[:max_rows]
        for r in rows:
            cells = []
            for c in cols:
                if c == "q_emp/q_pred":
                    v = _ratio(r.get("q_emp"), r.get("q_pred"))
                elif c == "q_emp/q_local":
                    v = _ratio(r.get("q_emp"), r.get("q_local"))
                elif c == "op" and r.get("activation"):
                    v = f"{r['op']}:{r['activation']}"  # activation:relu
                else:
                    v = r.get(c)
                cells.append(_fmt(v))
            lines.append(cells)
        widths = [min(44, max(len(line[i]) for line in lines)) for i in range(len(cols) - 1)]
        out = []
        for i, line in enumerate(lines):
            cells = [(v if len(v) <= w else v[: w - 1] + "…").ljust(w)
                     for v, w in zip(line[:-1], widths)]
            out.append("  ".join(cells) + "  " + line[-1])
            if i == 0:
                out.append("  ".join("-" * w for w in widths) + "  -----")
        if skipped:
            out.append(f"... {skipped} more rows")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<KernelStats: {len(self.rows)} nodes, empirical={self.empirical}>"

    def plot(self, path) -> str:
        """Write a PNG in the spirit of signal propagation plots: q (log scale) and c along
        depth (node index), predicted lines against measured dots. Returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        depth = list(range(len(self.rows)))
        fig, (ax_q, ax_c) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
        for key, ax, label in (("q", ax_q, "q"), ("c", ax_c, "c")):
            pred = [_num(r.get(f"{key}_pred")) for r in self.rows]
            ax.plot(depth, pred, "-", color="tab:blue", label=f"{label} predicted")
            if self.empirical:
                emp = [_num(r.get(f"{key}_emp")) for r in self.rows]
                ax.plot(depth, emp, ".", color="tab:orange", label=f"{label} measured")
                if key == "q":
                    local = [_num(r.get("q_local")) for r in self.rows]
                    ax.plot(depth, local, "x", color="tab:green", markersize=3,
                            label="q from measured inputs (one step)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        ax_q.set_yscale("log")
        ax_c.set_ylim(-0.05, 1.05)
        ax_c.set_xlabel("node (topological order)")
        approx = [i for i, r in enumerate(self.rows) if r.get("flags")]
        for i in approx:
            ax_c.axvline(i, color="0.85", linewidth=0.5, zorder=0)
        fig.suptitle("graphshape kernel statistics at initialization")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return str(path)


def _num(v):
    return math.nan if v is None else v


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "; ".join(map(str, v))
    return str(v)


def _clean_array(a):
    import numpy as np

    return [None if not math.isfinite(v) else v for v in np.asarray(a, float).ravel()] \
        if np.ndim(a) == 1 else [_clean_array(r) for r in a]


def _clean(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = "inf" if v > 0 else ("-inf" if v < 0 else None)
        out[k] = v
    return out
