"""The page in a real browser: Debian's chromium driven by playwright against a live `rectiflow serve` on
127.0.0.1 (the bundled model). Types a prompt, generates, sees the image with its settings, opens compare and
sees a labelled 2 x 2 grid (1 and 8 steps, without and with a LoRA chosen by its server-side id). Saves the
screenshots that docs/serve.md shows."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make setup` installs it); playwright downloads nothing
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "a photo of a green circle and a pink square"  # a shapes-world prompt: the scorer judges it


def _save_screenshot(png: bytes, path: Path) -> None:
    """Write the screenshot only when the page looks different from the saved one (size, or a mean pixel
    difference above 1 of 255): chromium's anti-aliasing and the timing text change a few pixels on every run,
    and docs/ should change when the page does, not on every test run."""
    import io

    import numpy as np
    from PIL import Image

    new = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    if path.is_file():
        old = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        if old.shape == new.shape and np.abs(old - new).mean() < 1.0:
            return
    path.write_bytes(png)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lora_file(tmp_path):
    """A LoRA for the bundled model with random adapters: it changes the images, which is all we need."""
    import torch

    from rectiflow.convert.bundle import default_bundle_path
    from rectiflow.convert.lora import save_lora
    from rectiflow.convert.transformer import load_transformer
    from rectiflow.nn.lora import add_lora, lora_modules

    model = load_transformer(default_bundle_path() / "transformer.safetensors")
    add_lora(model, "x", rank=4, targets="attn")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in lora_modules(model, "x"):
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 0.3)
    return save_lora(model, tmp_path / "noise.safetensors")


@pytest.fixture
def live_server(cli_env, lora_file):
    port = _free_port()
    cmd = [sys.executable, "-m", "rectiflow", "serve", "--port", str(port), "--device", "cpu",
           "--lora", f"noise={lora_file}"]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/status", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rectiflow serve did not start:\n{proc.stdout.read()}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_page_generates_and_compares_in_chromium(live_server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs it (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live_server)
            expect(page.locator("body[data-ready=true]")).to_have_count(1)
            expect(page.locator("#model option")).to_have_count(1)

            page.fill("#prompt", PROMPT)
            page.fill("#seed", "0")
            page.fill("#n", "2")
            page.click("#generate")
            cards = page.locator("#gallery .card:not(.pending)")
            expect(cards).to_have_count(2, timeout=60_000)
            for i in range(2):
                card = cards.nth(i)
                expect(card.locator(".prompt")).to_have_text(PROMPT)
                expect(card.locator(".settings-line")).to_contain_text(f"seed {i}")
                expect(card.locator("a.download")).to_have_attribute("download", f"rectiflow-{i}.png")
                expect(card.locator(".verdict")).to_have_count(1)  # the shapes-world scorer's
                assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 64
            _save_screenshot(page.screenshot(full_page=True), DOCS / "serve-generate.png")

            page.click("#tab-compare")
            expect(page.locator("#compare-prompts")).to_have_value(PROMPT)
            expect(page.locator("input[name=compare-lora]")).to_have_count(2)  # none, noise
            page.check("input[name=compare-lora][value=noise]")
            page.fill("#compare-steps", "1,8")
            page.fill("#compare-seeds", "0")
            page.click("#compare")
            grid = page.locator("table.grid")
            expect(grid).to_have_count(1)
            expect(grid.locator("thead th")).to_have_text(["", "1 step", "8 steps"])
            rows = ["default \u00b7 seed 0", "default + noise \u00b7 seed 0"]
            expect(grid.locator("tbody th")).to_have_text(rows)
            expect(grid.locator("tbody td img")).to_have_count(4, timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('table.grid img')]"
                                   ".every(img => img.complete && img.naturalWidth === 64)")
            expect(grid.locator("tbody td .verdict")).to_have_count(4)
            last = grid.locator("tbody td .settings-line").nth(3)
            expect(last).to_contain_text("8 steps \u00b7 euler \u00b7 seed 0")
            expect(last).to_contain_text("LoRA noise 1")
            _save_screenshot(page.screenshot(full_page=True), DOCS / "serve-compare.png")
            assert errors == []
        finally:
            browser.close()
