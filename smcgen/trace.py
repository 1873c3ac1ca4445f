"""A record of one SMC run, step by step, and its renderings: an HTML page and a PNG plot.

The step loop calls :meth:`TraceRecorder.record` once per step (when a recorder is passed to
``SMC.run``, or to ``NativeSMC.run``, whose step is a cycle; ``generate(..., trace=True)`` does it)
with the block each particle just gained, the log-weights before resampling, the ESS and, when the
step resampled, the ancestors. The recorder keeps CPU copies and builds a :class:`Trace` per group:
what ``SMCResult.trace`` holds.

``Trace.to_html()`` is one self-contained page (inline CSS and SVG, no script, no external
file): particles as rows, steps as columns, each cell the text that particle added at that step,
shaded by its normalized weight; a lineage diagram draws which particle each one descends from
at every resampling. ``Trace.plot()`` saves the ESS and the running log Z_hat per step as a PNG.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smcgen.core.resampling import log_mean_weight


@dataclass(frozen=True)
class TraceStep:
    """One step of one group: what each particle (row slot) added and how it was weighted.

    ``tokens[i]`` / ``texts[i]``: the ids and decoded text particle i gained this step (empty once
    it finished). ``log_weights[i]``: its unnormalized log-weight after the step, before resampling.
    ``ess``: the ESS of those weights. ``log_z``: the running log Z_hat (log of the mean weight).
    ``ancestors``: when the step resampled, slot i of the next step continues old particle
    ``ancestors[i]``; None when it did not.
    """

    tokens: list[list[int]]
    texts: list[str]
    log_weights: list[float]
    ess: float
    log_z: float
    ancestors: list[int] | None = None

    @property
    def weights(self) -> list[float]:
        """Normalized weights (sum to 1; all 0 when every particle has weight zero)."""
        top = max(self.log_weights)
        if top == -math.inf:
            return [0.0] * len(self.log_weights)
        w = [math.exp(x - top) for x in self.log_weights]
        s = sum(w)
        return [x / s for x in w]


@dataclass
class Trace:
    """Every step of one group's run (see :class:`TraceStep`), renderable as HTML and PNG."""

    n_particles: int
    steps: list[TraceStep] = field(default_factory=list)
    prompt: str = ""

    @property
    def n_resamples(self) -> int:
        return sum(s.ancestors is not None for s in self.steps)

    def particle_texts(self) -> list[str]:
        """The full text of each final particle, its lineage followed back through every resampling."""
        n = self.n_particles
        owner = list(range(n))  # owner[j]: the slot final particle j occupied at the step being read
        pieces: list[list[str]] = [[] for _ in range(n)]
        for s in reversed(self.steps):
            if s.ancestors is not None:
                owner = [s.ancestors[o] for o in owner]
            for j in range(n):
                pieces[j].append(s.texts[owner[j]])
        return ["".join(reversed(p)) for p in pieces]

    def to_dict(self) -> dict[str, Any]:
        return {"n_particles": self.n_particles, "prompt": self.prompt, "steps": [asdict(s) for s in self.steps]}

    def to_json(self) -> str:
        # -inf is not JSON: written as null
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x

        return json.dumps(clean(self.to_dict()))

    def to_html(self, title: str = "smcgen trace") -> str:
        """A self-contained HTML page of the run (see the module docstring)."""
        return render_html(self, title)

    def save_html(self, path: str | Path, title: str = "smcgen trace") -> Path:
        path = Path(path)
        path.write_text(self.to_html(title), encoding="utf-8")
        return path

    def plot(self, path: str | Path, title: str = "smcgen trace") -> Path:
        """Save a PNG of the ESS (resampling steps marked) and the running log Z_hat per step."""
        return plot_trace(self, path, title)


class TraceRecorder:
    """Collects what the step loop passes to :meth:`record`; :meth:`trace` builds a group's Trace.

    ``decoder`` (a tokenizer with ``decode``) turns each step's tokens into text; without one the
    cells show token ids.
    """

    def __init__(self, decoder: Any | None = None, prompt: str = ""):
        self.decoder = decoder
        self.prompt = prompt
        self._steps: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]] = []

    def record(self, block: Tensor, valid: Tensor, log_weights: Tensor, ess: Tensor, ancestors: Tensor | None) -> None:
        """One step: ``block [R, k]`` tokens added per row, ``valid [R, k]`` which of them count,
        ``log_weights [B, N]`` before resampling, ``ess [B]``, ``ancestors [B, N]`` (None: no resampling).
        Groups that did not resample this step have identity ancestors."""
        self._steps.append(
            (
                block.detach().cpu(),
                valid.detach().cpu(),
                log_weights.detach().double().cpu().clone(),
                ess.detach().double().cpu(),
                None if ancestors is None else ancestors.detach().cpu().clone(),
            )
        )

    def _text(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.decoder is None:
            return " ".join(str(t) for t in ids) + " "
        return self.decoder.decode(ids, skip_special_tokens=False)

    def trace(self, group: int = 0) -> Trace:
        """The trace of group ``group`` (0 for ``generate``)."""
        if not self._steps:
            return Trace(n_particles=0, prompt=self.prompt)
        n = self._steps[0][2].shape[1]
        out = Trace(n_particles=n, prompt=self.prompt)
        rows = slice(group * n, (group + 1) * n)
        for block, valid, lw, ess, anc in self._steps:
            toks = [[int(t) for t, v in zip(b, m) if v] for b, m in zip(block[rows].tolist(), valid[rows].tolist())]
            g_lw = lw[group]
            log_z = float(log_mean_weight(g_lw))
            g_anc = None
            if anc is not None and not torch.equal(anc[group], torch.arange(n)):
                g_anc = [int(a) for a in anc[group]]
            out.steps.append(
                TraceStep(
                    tokens=toks,
                    texts=[self._text(t) for t in toks],
                    log_weights=[float(x) for x in g_lw],
                    ess=float(ess[group]),
                    log_z=log_z,
                    ancestors=g_anc,
                )
            )
        return out


# ---------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}
.summary{margin-bottom:1em}
table.trace{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px}
table.trace td,table.trace th{border:1px solid #ccc;padding:2px 4px;white-space:pre;vertical-align:top}
table.trace th{background:#f4f4f4;font-weight:normal}
td.resampled{border-right:3px solid #c0392b}
td.dead{color:#aaa;text-decoration:line-through}
span.from{color:#c0392b;font-size:10px}
.lineage{margin:1em 0}
table.final td{font-family:ui-monospace,monospace;font-size:12px;padding:2px 6px;border-bottom:1px solid #eee;white-space:pre-wrap}
"""


def _shade(w: float) -> str:
    """Background for a normalized weight: white at 0, saturated blue at 1."""
    a = 0.08 + 0.72 * min(max(w, 0.0), 1.0) if w > 0 else 0.0
    return f"background:rgba(41,128,185,{a:.3f})"


def _lineage_svg(trace: Trace) -> str:
    """Particles as dots per step (shaded by weight) and an edge from each to its ancestor."""
    n, steps = trace.n_particles, trace.steps
    dx, dy, pad = 22, 16, 12
    width, height = pad * 2 + dx * max(len(steps) - 1, 1), pad * 2 + dy * max(n - 1, 1)
    svg_open = (
        f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="resampling lineage">'
    )
    parts = [svg_open]
    for s in range(1, len(steps)):
        anc = steps[s - 1].ancestors
        for i in range(n):
            a = anc[i] if anc is not None else i
            color = "#c0392b" if anc is not None else "#bbb"
            parts.append(
                f'<line class="edge" x1="{pad + dx * (s - 1)}" y1="{pad + dy * a}" x2="{pad + dx * s}" '
                f'y2="{pad + dy * i}" stroke="{color}" stroke-width="1"/>'
            )
    for s, st in enumerate(steps):
        for i, w in enumerate(st.weights):
            fill = f"rgba(41,128,185,{0.15 + 0.85 * w:.3f})" if w > 0 else "#fff"
            parts.append(
                f'<circle class="node" cx="{pad + dx * s}" cy="{pad + dy * i}" r="4" fill="{fill}" '
                f'stroke="#2c3e50" stroke-width="0.5"><title>step {s + 1}, particle {i}: '
                f"w={w:.3f}</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def render_html(trace: Trace, title: str = "smcgen trace") -> str:
    """The page described in the module docstring, as a string."""
    esc = html.escape
    n, steps = trace.n_particles, trace.steps
    head = "".join(
        f'<th title="ESS {s.ess:.2f}, log Z_hat {s.log_z:.3f}">{k + 1}'
        f"{'<br>&#x21bb;' if s.ancestors is not None else ''}</th>"
        for k, s in enumerate(steps)
    )
    ess_row = "".join(f"<td>{s.ess:.1f}</td>" for s in steps)
    body = []
    for i in range(n):
        cells = []
        for k, s in enumerate(steps):
            w = s.weights[i]
            cls = ["resampled"] if s.ancestors is not None else []
            if s.log_weights[i] == -math.inf:
                cls.append("dead")
            # where this slot's particle came from at the previous step's resampling
            prev = steps[k - 1].ancestors if k > 0 else None
            origin = f'<span class="from">&#x2190;{prev[i]} </span>' if prev is not None and prev[i] != i else ""
            cells.append(
                f'<td class="{" ".join(cls)}" style="{_shade(w)}" title="w={w:.4f} log w={s.log_weights[i]:.3f}">'
                f"{origin}{esc(s.texts[i])}</td>"
            )
        body.append(f"<tr><th>{i}</th>{''.join(cells)}</tr>")
    final = steps[-1].weights if steps else []
    finals = "".join(
        f"<tr><td>{i}</td><td>{w:.3f}</td><td>{esc(t)}</td></tr>"
        for i, (w, t) in enumerate(zip(final, trace.particle_texts()))
    )
    log_z = steps[-1].log_z if steps else float("nan")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"
        f'<div class="summary">{n} particles, {len(steps)} steps, {trace.n_resamples} resampling steps, '
        f"final log Z_hat {log_z:.3f}. Rows are particle slots, columns steps; a cell holds the text the "
        f"particle added, shaded by its normalized weight before resampling. A red right border marks a "
        f"resampling step; &#x2190;k means the slot continues particle k of the step before.</div>"
        + (f"<p>Prompt: <code>{esc(trace.prompt)}</code></p>" if trace.prompt else "")
        + f"<h2>Lineage</h2>{_lineage_svg(trace)}"
        f'<h2>Particles</h2><table class="trace"><tr><th>particle \\ step</th>{head}</tr>'
        f"{''.join(body)}<tr><th>ESS</th>{ess_row}</tr></table>"
        f'<h2>Final particles</h2><table class="final"><tr><th>particle</th><th>weight</th><th>text</th></tr>'
        f"{finals}</table></body></html>"
    )


# ----------------------------------------------------------------------------------------- PNG


def plot_trace(trace: Trace, path: str | Path, title: str = "smcgen trace") -> Path:
    """ESS per step (resampling steps marked) and the running log Z_hat, as a two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(trace.steps) + 1))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax1.plot(steps, [s.ess for s in trace.steps], marker=".", label="ESS (before resampling)")
    res = [k + 1 for k, s in enumerate(trace.steps) if s.ancestors is not None]
    if res:
        ax1.scatter(res, [trace.steps[k - 1].ess for k in res], color="#c0392b", zorder=3, label="resampled")
    ax1.axhline(trace.n_particles, color="#999", lw=0.8, ls="--")
    ax1.set_ylabel("ESS")
    ax1.set_ylim(0, trace.n_particles * 1.05 + 0.1)
    ax1.legend(loc="lower left", fontsize=8)
    ax2.plot(steps, [s.log_z if math.isfinite(s.log_z) else float("nan") for s in trace.steps], marker=".")
    ax2.set_ylabel("running log Z_hat")
    ax2.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
