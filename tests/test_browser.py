"""JupyterLab in a real browser: the widgets of notebooks 01 and 05 respond to their controls.

A `jupyter lab` server from this environment listens on 127.0.0.1 (a free port, a token) and serves copies of the
notebooks from a temp folder (so nothing it saves can touch notebooks/); Debian's Chromium, driven by Playwright,
runs every cell under the smoke profile, changes a control and checks that the image the widget shows changed
(the image bytes, not just its blob address). Screenshots are written into the test's temp folder.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import dsvae_lib as dsae

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_ALL_TIMEOUT_MS = 240_000  # both notebooks take well under a minute on 2 idle cores; CI may be busier

# Hash of what an <img> shows: its bytes, fetched from its (blob or data) address inside the page.
IMAGE_DIGEST = """async (img) => {
    const bytes = await (await fetch(img.src)).arrayBuffer();
    const digest = await crypto.subtle.digest("SHA-256", bytes);
    return Array.from(new Uint8Array(digest)).map(b => b.toString(16).padStart(2, "0")).join("");
}"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, screenshot folder) of a running JupyterLab; the server is stopped afterwards."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install Debian's browser with `apt-get install chromium` (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    root.mkdir()
    for name in ("01_data.ipynb", "05_disentanglement_figures.ipynb"):
        shutil.copyfile(dsae.NOTEBOOKS / name, root / name)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "DSVAE_PROFILE": "smoke", "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate", *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"jupyter lab did not start; its log:\n{(home / 'server.log').read_text()}")
                time.sleep(0.5)
        yield url, token, home
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _open_and_run_all(browser, lab, name):
    url, token, home = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(RUN_ALL_TIMEOUT_MS)
    # A workspace of its own per notebook, reset: the notebook opened before is not restored beside it.
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")
    page.wait_for_function("(name) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " return w && w.sessionContext && w.context.path === name; }", arg=name)
    page.evaluate("""async () => {
        const panel = window.jupyterapp.shell.currentWidget;
        await panel.context.ready;
        await panel.sessionContext.ready;
        window.jupyterapp.commands.execute("notebook:run-all-cells");  // resolves when all ran; not awaited
    }""")
    return page


def _image_state(page, view):
    img = view.locator("img.widget-image").first
    img.wait_for(state="visible")
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    return img.get_attribute("src"), page.evaluate(IMAGE_DIGEST, img.element_handle())


def _wait_for_new_image(page, view, old_src):
    img = view.locator("img.widget-image").first
    page.wait_for_function("([img, old]) => img.src !== old", arg=[img.element_handle(), old_src])
    return _image_state(page, view)


def _view(page, marker):
    """The output area of the widget whose controls include `marker` (a locator inside it); a cell that failed
    on the way is reported with its traceback."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    view = page.locator(".jp-OutputArea-output", has=page.locator(marker)).last
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    deadline = time.time() + RUN_ALL_TIMEOUT_MS / 1000
    while True:
        try:
            view.wait_for(state="visible", timeout=2000)
            return view
        except PlaywrightTimeout:
            tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
            if tracebacks or time.time() > deadline:
                pytest.fail(f"the widget ({marker}) did not appear; errors shown in the notebook: {tracebacks}")


def test_sprite_browser_pickers_change_the_sprite(lab, browser):
    page = _open_and_run_all(browser, lab, "01_data.ipynb")
    view = _view(page, ".widget-dropdown select")
    src, digest = _image_state(page, view)
    caption = view.locator(".widget-html").first.inner_text()
    assert "character 0 (train split), walk-front" in caption  # the initial pickers: all 0, walk, front
    selects = view.locator(".widget-dropdown select")
    assert selects.count() == 6
    selects.nth(0).select_option(label="3")  # skin 3
    src2, digest2 = _wait_for_new_image(page, view, src)
    selects.nth(4).select_option(label="slash")
    src3, digest3 = _wait_for_new_image(page, view, src2)
    assert len({digest, digest2, digest3}) == 3, "the sprite image did not change with the pickers"
    assert "character 648" in view.locator(".widget-html").first.inner_text()
    assert "slash-front" in view.locator(".widget-html").first.inner_text()
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(lab[2] / "01_sprite_browser.png"))
    page.close()


def test_explorer_follows_its_sequence_index(lab, browser, smoke_metrics):
    page = _open_and_run_all(browser, lab, "05_disentanglement_figures.ipynb")
    view = _view(page, "button:has-text('find sequence')")
    src, digest = _image_state(page, view)
    assert "#0:" in view.locator(".widget-html").first.inner_text()
    index_a = view.locator(".widget-text input").first
    index_a.fill("5")
    index_a.press("Enter")
    src2, digest2 = _wait_for_new_image(page, view, src)
    assert digest2 != digest, "the explorer image did not change with sequence a"
    assert "#5:" in view.locator(".widget-html").first.inner_text()
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(lab[2] / "05_explorer.png"))
    page.close()
