"""The page in a real browser (chromium), in the visitor's light and dark themes, at a desktop's and a phone's
width: every figure has a transparent background and text that reads on the page behind it, and none runs off
a phone's screen. Screenshots of each view go to ``$IMSE_SCREENSHOTS`` (else the test's temporary folder);
``IMSE_SCREENSHOTS=docs/screenshots python -m pytest -m slow tests/test_browser_theme.py`` makes the README's.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
THEMES = {"light": "", "dark": "?__theme=dark"}
DESKTOP, PHONE = 1400, 390
PER_DOMAIN, SEVERITY = 256, 5  # the default run's four corruptions, shortened to 4 batches each and made harder

pytestmark = [
    pytest.mark.slow,  # a browser and a short Lab run per theme
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)"),
]

# Per visible figure: its title, the paper's background and the plot areas' opacity, the colour of the page behind
# it, an axis tick label's fill, the lowest contrast of any of its texts (titles, ticks of every axis, legend,
# notes, colour bars, bar labels) against that background (WCAG's ratio), and its right edge.
MEASURE = """() => {
  const rgba = c => { const v = (c.match(/[\\d.]+/g) || []).map(Number); return v.length === 3 ? [...v, 1] : v; };
  const linear = v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  const lum = ([r, g, b]) => 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
  const contrast = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const behind = el => {
    for (let e = el.parentElement; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0) return c;
    }
    return [255, 255, 255, 1];
  };
  // all text but what Plotly colours against a box of its own: hover labels, heatmap cells, text inside bars
  const labels = '.main-svg text:not(.hoverlayer text, .heatmap-label text, .bartext-inside)';
  return [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.getClientRects().length).map(p => {
    const bg = behind(p);
    const texts = [...p.querySelectorAll(labels)].filter(t => t.textContent.trim());
    const tick = p.querySelector('.xaxislayer-above text, .yaxislayer-above text');
    return {
      title: (p.querySelector('.gtitle') || {}).textContent || '',
      paper: rgba(getComputedStyle(p.querySelector('.main-svg')).backgroundColor),
      plot: [...p.querySelectorAll('.bglayer rect')].map(r => getComputedStyle(r))
              .map(style => rgba(style.fill)[3] * style.fillOpacity),
      background: bg,
      tick: tick ? rgba(getComputedStyle(tick).fill) : null,
      worst: Math.min(...texts.map(t => contrast(rgba(getComputedStyle(t).fill), bg))),
      labels: texts.length,
      right: p.getBoundingClientRect().right,
    };
  });
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    """``python app.py`` as a visitor meets it (offline, no analytics), on a free port."""
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 120 s")
    yield f"http://127.0.0.1:{port}/"
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _shoot(page, path: Path, limit: int = 400_000) -> None:
    """A full-page PNG, in 256 colours if it would be over ``limit`` bytes otherwise (the page is mostly flat
    colour and text; only the heatmaps' gradients lose a little)."""
    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > limit:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _settle(page) -> None:
    """Every output drawn and laid out: no event in progress, then a moment for Plotly's resize."""
    page.wait_for_function("!document.querySelector('.wrap.pending, .wrap.generating')", timeout=120_000)
    page.wait_for_timeout(1500)


def _wait_for_title(page, text: str, timeout: float = 300_000) -> None:
    page.wait_for_function(
        f"[...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes({text!r}))", timeout=timeout
    )


def _views(page, url: str, shots: Path, theme: str) -> dict[str, list[dict]]:
    """Run the default Lab run, shortened and made harder through the page, and open two Teach views: each
    measured and shot at the desktop's width and at the phone's (the same page, resized, as a narrowed window
    is)."""
    measured = {}
    page.set_viewport_size({"width": DESKTOP, "height": 1000})
    page.goto(url + THEMES[theme])
    page.get_by_role("button", name="Start").wait_for(state="visible")
    for label, value in (("Images per domain", PER_DOMAIN), ("number input for Severity", SEVERITY)):
        number = page.get_by_label(label, exact=True)
        number.fill(str(value))
        number.press("Tab")
    page.get_by_label("TENT", exact=True).check()  # two adapting methods: two gains over Source
    page.get_by_role("button", name="Start").click()
    batches = 4 * PER_DOMAIN // 64  # the default run: 4 corruptions, batches of 64
    _wait_for_title(page, f"batch {batches}/{batches}", timeout=600_000)
    views = [("lab", None), ("teach-experts", "experts kept"), ("teach-collapse", "Mean std while adapting"),
             ("teach-step", "The stream so far"), ("teach-domains", "Symmetric KL")]  # fmt: skip
    for view, title in views:
        if view == "teach-experts":
            page.get_by_role("tab", name="Teach: how IMSE works").click()
        if view == "teach-collapse":
            page.get_by_role("tab", name="2 · Collapse, measured").click()
            page.get_by_role("button", name="Measure").click()
            page.wait_for_function("document.querySelector('#teach-collapse-text').textContent.includes('(done)')",
                                   timeout=600_000)  # fmt: skip
        if view == "teach-step":
            page.get_by_role("tab", name="3 · IMSE, step by step").click()
            page.get_by_role("button", name="Step × 10").click()
            page.wait_for_function("document.querySelector('#teach-step-text').textContent.includes('Batch 10 ')",
                                   timeout=300_000)  # fmt: skip
        if view == "teach-domains":
            page.get_by_role("tab", name="4 · Domains and retrieval").click()
        if title:
            _wait_for_title(page, title)
        for width in (DESKTOP, PHONE):
            page.set_viewport_size({"width": width, "height": 1000 if width == DESKTOP else 844})
            _settle(page)
            measured[f"{view}-{width}"] = page.evaluate(MEASURE)
            _shoot(page, shots / f"{view}-{theme}-{width}.png")
        page.set_viewport_size({"width": DESKTOP, "height": 1000})
    return measured


def test_figures_follow_the_light_and_dark_themes_at_desktop_and_phone_widths(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("IMSE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    measured = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for theme in THEMES:
            page = browser.new_page()
            measured[theme] = _views(page, app_url, shots, theme)
            page.close()
        browser.close()
    for theme, views in measured.items():
        for view, figures in views.items():
            assert len(figures) >= (6 if view.startswith("lab") else 3), (theme, view)
            width = int(view.rsplit("-", 1)[1])
            for figure in figures:
                where = (theme, view, figure["title"])
                assert figure["paper"][3] == 0 and all(alpha == 0 for alpha in figure["plot"]), where
                assert figure["labels"] and figure["worst"] >= 4.5, where  # WCAG AA for text, on the page behind it
                assert figure["right"] <= width + 1, where  # nothing runs off the screen
    light, dark = measured["light"]["lab-1400"], measured["dark"]["lab-1400"]
    accuracy_light = next(f for f in light if f["title"].startswith("Online accuracy"))
    accuracy_dark = next(f for f in dark if f["title"].startswith("Online accuracy"))
    assert accuracy_light["tick"] != accuracy_dark["tick"]  # the labels changed colour with the page
    assert sum(accuracy_light["background"][:3]) > 600 > 150 > sum(accuracy_dark["background"][:3])
