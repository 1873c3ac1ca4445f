"""generate(trace=True): the recorded trace agrees with the result, and its HTML / PNG renderings hold it."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest

import smcgen


class _Page(HTMLParser):
    """Collects the trace table's rows and cells, the SVG's edges and nodes, and all text."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[tuple[str, dict]]]] = []
        self.edges: list[dict] = []
        self.nodes = 0
        self.text: list[str] = []
        self._cell: tuple[str, dict] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = (tag, a)
            self.tables[-1][-1].append((tag, {**a, "text": ""}))
        elif tag == "line":
            self.edges.append(a)
        elif tag == "circle":
            self.nodes += 1

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None and self.tables and self.tables[-1] and self.tables[-1][-1]:
            _tag, a = self.tables[-1][-1][-1]
            a["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None


_REWARD = smcgen.RewardPotential(lambda text: text.count("a") / 2, prefix=True)


def _run(target, draft, tok, **kw):
    # a draft and a reward twist make the weights uneven; ess_threshold 0.9 resamples on some steps, not all
    return smcgen.generate(
        target,
        "ab",
        tokenizer=tok,
        draft=draft,
        block_size=2,
        potentials=_REWARD,
        n_particles=6,
        max_new_tokens=12,
        seed=5,
        ess_threshold=0.9,
        engine="generic",  # the native engine's traces: tests/test_native_trace.py
        **kw,
    )


@pytest.fixture(scope="module")
def traced(target, draft, tok):
    return _run(target, draft, tok, trace=True)


def test_trace_matches_the_result(traced, tok):
    tr = traced.trace
    assert traced.engine == "generic" and tr is not None and tr.n_particles == 6
    assert len(tr.steps) == traced.n_steps
    assert [s.ess for s in tr.steps] == pytest.approx(traced.ess_history)
    assert tr.n_resamples == traced.n_resamples >= 1
    assert tr.steps[-1].log_z == pytest.approx(traced.log_z)
    assert tr.steps[-1].weights == pytest.approx([math.exp(w) for w in traced.log_weights])
    # following the ancestry back through every resampling rebuilds each final particle's text
    assert tr.particle_texts() == [tok.decode(s, skip_special_tokens=False) for s in traced.sequences]
    for s in tr.steps:
        assert sum(s.weights) == pytest.approx(1.0)
        if s.ancestors is not None:
            assert len(s.ancestors) == 6 and all(0 <= a < 6 for a in s.ancestors)


def test_untraced_run_has_no_trace_and_same_output(target, draft, tok, traced):
    plain = _run(target, draft, tok)
    assert plain.trace is None
    assert plain.sequences == traced.sequences and plain.log_weights == traced.log_weights


def test_html_holds_particles_steps_lineage_and_weights(traced):
    tr = traced.trace
    page = _Page()
    page.feed(tr.to_html(title="tiny trace"))
    text = "".join(page.text)
    assert "tiny trace" in text and "6 particles" in text and f"{len(tr.steps)} steps" in text
    trace_table = page.tables[0]
    particle_rows = trace_table[1:-1]  # header row first, ESS row last
    assert len(particle_rows) == 6
    for i, row in enumerate(particle_rows):
        cells = [a for tag, a in row if tag == "td"]
        assert len(cells) == len(tr.steps)
        for k, cell in enumerate(cells):
            w = tr.steps[k].weights[i]
            assert cell["title"].startswith(f"w={w:.4f}")  # the weight it is shaded by
            assert tr.steps[k].texts[i] in cell["text"]
            assert ("resampled" in cell["class"]) == (tr.steps[k].ancestors is not None)
            prev = tr.steps[k - 1].ancestors if k else None
            if prev is not None and prev[i] != i:
                assert cell["text"].startswith(f"\u2190{prev[i]}")  # the slot's lineage after resampling
    # one lineage edge per particle between consecutive steps, red exactly where resampling happened
    assert len(page.edges) == 6 * (len(tr.steps) - 1) and page.nodes == 6 * len(tr.steps)
    red = [e for e in page.edges if e["stroke"] == "#c0392b"]
    assert len(red) == 6 * sum(s.ancestors is not None for s in tr.steps[:-1]) > 0
    assert sum(s.ancestors is None for s in tr.steps) >= 1
    for t in tr.particle_texts():
        assert t.replace("</s>", "") in text.replace("</s>", "")
    assert "<script" not in tr.to_html() and "http" not in tr.to_html().replace("http://www.w3.org/2000/svg", "")


def test_png_plot_and_json(traced, tmp_path):
    path = traced.trace.plot(tmp_path / "trace.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import json

    d = json.loads(traced.trace.to_json())
    assert len(d["steps"]) == traced.n_steps and d["n_particles"] == 6
