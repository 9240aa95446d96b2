"""`batchgen report OUT --html FILE`: the page's content from a two-rank fake run (one rank
resumed, so two runs), then the page in a real headless browser (Debian's Chromium, which
`make test-tools` installs): every chart drawn with its data points, no console error, and a
screenshot that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import manifest_state, run_args, run_cli, save_manifest_state

from pipeline.checkpoint import Manifest
from pipeline.engines.fake import FakeEngine

CHROMIUM = Path("/usr/bin/chromium")
CHART_TITLES = [
    "Prompts committed",
    "Output throughput between commits",
    "Prompt length",
    "Completion length",
    "Finish reasons",
]
# Written into a copy of the page (whose policy then lets inline scripts run): records errors
# and policy violations from the first moment, and once loaded, what each chart drew.
PROBE = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (e) {
    problems.push('error: ' + (e.message || (e.target && (e.target.src || e.target.href))));
  }, true);
  document.addEventListener('securitypolicyviolation', function (e) {
    problems.push('policy: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  ['error', 'warn'].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      problems.push('console.' + level + ': ' + Array.prototype.join.call(arguments, ' '));
      original.apply(console, arguments);
    };
  });
  window.addEventListener('load', function () {
    var charts = Array.prototype.map.call(document.querySelectorAll('svg.chart'), function (svg) {
      var box = svg.getBoundingClientRect();
      var marks = Array.prototype.filter.call(svg.querySelectorAll('.mark'), function (m) {
        var b = m.getBoundingClientRect();
        return b.width > 0 && b.height > 0 && b.left >= box.left - 1 &&
          b.right <= box.right + 1 && b.top >= box.top - 1 && b.bottom <= box.bottom + 1;
      });
      return {title: svg.getAttribute('aria-label'), width: box.width, height: box.height,
              marks: marks.map(function (m) { return m.textContent; })};
    });
    var out = document.createElement('pre');
    out.id = 'probe';
    out.textContent = JSON.stringify({charts: charts, problems: problems});
    document.body.appendChild(out);
  });
})();
</script>"""


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ranks 0 and 1 of 120 prompts (6 null), fake steps of 20 ms; rank 1 loses its last two
    shards and is rerun, so its rows come from two runs."""
    base = tmp_path_factory.mktemp("report")
    prompts: list[str | None] = [
        f"Tell me about topic number {i}." * (1 + i % 5) for i in range(120)
    ]
    for i in range(0, 120, 20):
        prompts[i] = None
    src = base / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), src)
    out = base / "out"

    def run_rank(rank: int) -> None:
        args = run_args(src, out, "--engine", "fake", "--max-num-seqs", "4", max_tokens=8)
        args += ["--rows-per-shard", "8", "--max-error-rate", "0.2"]
        args += ["--num-shards", "2", "--shard-index", str(rank), "--keep-prompt"]
        run_cli(*args)

    # In this process (no interpreter and tokenizer start per run), each fake step slowed as
    # tests/hooks.py's BATCHGEN_FAKE_STEP_SECONDS=0.02 does, so the commits have times apart.
    with pytest.MonkeyPatch.context() as patch:
        step = FakeEngine._step

        def slow_step(self: FakeEngine):
            time.sleep(0.02)
            return step(self)

        patch.setattr(FakeEngine, "_step", slow_step)
        run_rank(0)
        run_rank(1)
        state = manifest_state(out, 1)
        for shard in state["shards"][-2:]:
            (out / "rank-00001" / shard["file"]).unlink()
        state["shards"] = state["shards"][:-2]
        state["status"] = "interrupted"
        save_manifest_state(out, state, 1)
        run_rank(1)
    return out


def report(out: Path, html: Path) -> str:
    result = run_cli("report", out, "--html", html)
    return result.output


def test_the_page_holds_what_is_committed(out, tmp_path):
    html = tmp_path / "report.html"
    said = report(out, html)
    page = html.read_text()
    assert said == (
        f"wrote {html} ({len(page.encode()) / 1024:,.0f} KB): 120 committed rows of {out} in "
        f"{len(list(out.glob('rank-*/part-*.parquet')))} shards, 2 rank(s)\n"
    )
    assert page.count('<svg class="chart"') == 5
    assert re.findall(r'aria-label="([^"]+)"', page) == CHART_TITLES
    # Self-contained: nothing is fetched (the only URL is the SVG namespace) and a policy
    # forbids scripts and requests.
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'; style-src 'unsafe-inline'; img-src data:" in page
    assert "<script" not in page
    # Error rows: six null prompts, their ids, the message.
    assert (
        "<tr><td>null</td><td class=n>6</td><td>in.parquet:0, in.parquet:20, in.parquet:40, "
        "in.parquet:60, in.parquet:80</td><td>column &#x27;prompt&#x27; is null</td></tr>"
    ) in page
    # Settings and versions.
    assert "<tr><th>sampling</th><td><code>{&quot;max_tokens&quot;: 8, " in page
    assert "<tr><th>ranks</th><td><code>2</code></td></tr>" in page
    assert "<tr><th>vLLM</th><td><code>(not recorded)</code></td></tr>" in page  # fake engine
    # Rank 1's two runs: two throughput segments, two "generation starts" markers.
    assert page.count('stroke-dasharray="4 3"') == 2 * 3  # 3 runs, drawn on two charts


def test_old_manifests_without_commit_times(out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for rank in (0, 1):
        state = manifest_state(copy, rank)
        for shard in state["shards"]:
            shard.pop("committed_at"), shard.pop("generate_seconds")
        save_manifest_state(copy, state, rank)
    assert Manifest.load(copy, 0) is not None
    html = tmp_path / "old.html"
    report(copy, html)
    page = html.read_text()
    assert "No commit times are recorded in these manifests" in page
    assert re.findall(r'aria-label="([^"]+)"', page) == CHART_TITLES[2:]


def test_not_a_run(tmp_path):
    result = run_cli("report", tmp_path, "--html", tmp_path / "r.html", expect=1)
    assert result.output == (
        f"Error: {tmp_path}: no batchgen run there (no .batchgen/rank-*/); give the "
        "--output folder of a run\n"
    )
    result = run_cli("report", tmp_path, expect=2)
    assert "Error: Missing option '--html'." in result.output


# --- in a real browser -------------------------------------------------------------------------


def chromium(*args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.skip(
            f"Chromium is not installed ({CHROMIUM}); `make test-tools` installs Debian's "
            "chromium package (as root, with apt-get)"
        )
    profile = tempfile.mkdtemp(prefix="batchgen-chromium-")
    try:
        return subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,2400",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def probe(html: Path, tmp_path: Path) -> dict:
    """What the browser drew: the page with PROBE run in it."""
    page = html.read_text().replace(
        "default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';"
    )
    probed = tmp_path / f"probed-{html.name}"
    probed.write_text(page.replace("<head>", "<head>\n" + PROBE, 1))
    proc = chromium("--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def counts(marks: list[str]) -> int:
    """The sum of the counts in bars' tooltips ("36-37 tokens: 12 prompts" -> 12)."""
    return sum(int(re.search(r": ([\d,]+)", m).group(1).replace(",", "")) for m in marks)


def test_every_chart_renders_without_console_errors(out, tmp_path):
    html = tmp_path / "report.html"
    report(out, html)
    shot = tmp_path / "report.png"
    proc = chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}", html.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, axes and bars, not a blank page

    drawn = probe(html, tmp_path)
    assert drawn["problems"] == []
    charts = {c["title"]: c for c in drawn["charts"]}
    assert list(charts) == CHART_TITLES
    for chart in charts.values():
        assert chart["width"] > 300 and chart["height"] > 150, chart
        assert chart["marks"], chart["title"]
    table = pq.read_table(out).to_pylist()
    engine_rows = [r for r in table if r["error"] is None]
    shards = [manifest_state(out, r)["shards"] for r in (0, 1)]
    # One point per commit, plus each rank's start.
    assert len(charts["Prompts committed"]["marks"]) == sum(len(s) + 1 for s in shards)
    assert counts(charts["Prompt length"]["marks"]) == len(engine_rows)
    assert counts(charts["Completion length"]["marks"]) == len(engine_rows)
    assert sorted(charts["Finish reasons"]["marks"]) == ["error: 6", "length: 114"]


def test_the_probe_sees_a_broken_page(out, tmp_path):
    """The browser check can fail: a page that fetches something and throws is caught."""
    html = tmp_path / "report.html"
    report(out, html)
    broken = tmp_path / "broken.html"
    broken.write_text(
        html.read_text()
        .replace("<body>", '<body><img src="https://example.com/x.png">', 1)
        .replace('class="mark"', 'class="gone"')
    )
    drawn = probe(broken, tmp_path)
    assert any(p.startswith("policy: img-src https://example.com/x.png") for p in drawn["problems"])
    assert all(not c["marks"] for c in drawn["charts"])
    proc = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", broken.as_uri())
    assert any(":CONSOLE" in line and "example.com" in line for line in proc.stderr.splitlines())
