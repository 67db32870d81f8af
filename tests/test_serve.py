"""`dalle-jax serve` on a quick demo run: batched requests draw what they would draw alone, gradio_client gets the
images `dalle-jax sample` writes, and the page works in a real browser (Debian's Chromium driven by Playwright):
generate, image-to-image, an empty caption, two clients at once."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_jax.sampling.rerank import load_run, sample_and_rerank, sample_and_rerank_together
from dalle_jax.sampling.sampler import SampleConfig
from dalle_jax.serve import Batcher, SampleInputError, Settings, parse_settings

CHROMIUM = "/usr/bin/chromium"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def run(quick_demo):
    return load_run(quick_demo[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(quick_demo):
    from dalle_jax.serve import serve

    port = _free_port()
    app = serve(quick_demo[0], port=port, block=False)
    yield f"http://127.0.0.1:{port}/", app
    app.close()


# ------------------------------------------------------------------------------------------------ batching

def test_prompts_drawn_together_get_the_images_they_get_alone(run):
    prompts = ["a red circle", "a small blue square in the top left", "a green cross above a cyan circle"]
    seed = int(np.random.default_rng().integers(2**31))
    cfg = SampleConfig(temperature=0.9, top_k=40)
    together = sample_and_rerank_together(run, prompts, num_samples=6, top=3, seed=seed, sample_config=cfg,
                                          batch_size=8)  # 2 candidates per prompt and call: 3 calls
    for prompt, kept in zip(prompts, together, strict=True):
        alone = sample_and_rerank(run, [prompt], num_samples=6, top=3, seed=seed, sample_config=cfg, batch_size=4,
                                  progress=False)[0]
        assert [k.sample_index for k in kept] == [k.sample_index for k in alone]
        for a, b in zip(kept, alone, strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            assert abs(a.clip_score - b.clip_score) < 1e-5


def test_batcher_groups_waiting_requests_with_equal_settings(run):
    batcher = Batcher(run, batch_size=16)
    settings = Settings(4, 2, 3, SampleConfig())
    other = Settings(4, 2, 4, SampleConfig())  # another seed: never in the same call
    results = {}

    def ask(name, caption, s):
        results[name] = batcher.submit(caption, s)

    threads = [threading.Thread(target=ask, args=(f"r{i}", caption, s)) for i, (caption, s) in enumerate(
        [("a red circle", settings), ("a blue square", settings), ("a cyan cross", other),
         ("a black triangle", settings)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(batcher.calls) == [1, 3]  # the three with equal settings in one call, the other alone
    alone = sample_and_rerank(run, ["a blue square"], num_samples=4, top=2, seed=3, progress=False)[0]
    for a, b in zip(results["r1"], alone, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    with pytest.raises(SampleInputError, match="caption is empty"):
        batcher.submit("   ", settings)


@pytest.mark.parametrize("fields,message", [
    ((0, 1, 0, 1.0, 0, 1.0, 1.0), "candidates: 0 must be between 1 and 512"),
    ((4, 5, 0, 1.0, 0, 1.0, 1.0), "shown: 5 must be between 1"),
    ((4, 2, -1, 1.0, 0, 1.0, 1.0), "seed: -1"),
    ((4, 2, 0, 0.0, 0, 1.0, 1.0), "temperature=0.0"),
    ((4, 2, 0, 1.0, 0, 1.5, 1.0), "top_p"),
    ((4, 2, 0, 1.0, 0, 1.0, -2.0), "guidance: -2.0"),
    ((4.5, 2, 0, 1.0, 0, 1.0, 1.0), "whole number"),
])
def test_settings_out_of_range_are_named(fields, message):
    with pytest.raises(SampleInputError, match=message):
        parse_settings(*fields)


# ------------------------------------------------------------------------------------------------ the endpoint

def test_gradio_client_returns_what_dalle_jax_sample_writes(quick_demo, server, tmp_path):
    from gradio_client import Client

    url, _ = server
    seed = int(np.random.default_rng().integers(2**31))
    gallery, status = Client(url, verbose=False).predict("a purple cross", 8, 3, seed, 1.0, 0, 1.0, 1.0, None, 4,
                                                         api_name="/generate")
    assert "3 of 8 candidates" in status and len(gallery) == 3
    out = tmp_path / "cli"
    cli = subprocess.run([sys.executable, "-m", "dalle_jax.cli", "sample", "--run", str(quick_demo[0]), "--prompt",
                          "a purple cross", "--num-samples", "8", "--top", "3", "--seed", str(seed), "--out-dir",
                          str(out), "--quiet"], env=ENV, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    for rank, item in enumerate(gallery):
        served = np.asarray(Image.open(item["image"]).convert("RGB"))
        written = np.asarray(Image.open(out / f"0000_{rank:02d}.png").convert("RGB"))
        np.testing.assert_array_equal(served, written)
        assert item["caption"].startswith(f"#{rank + 1} · CLIP ")


# ------------------------------------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # the serve extra

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install chromium (README set-up)"
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def _generate(page, caption: str, expect: str | None = None, timeout_ms: int = 180_000) -> None:
    """Types the caption, clicks Generate and waits for the status line of this request (`expect`, by default the
    caption's own "... candidates for “CAPTION” ..."), not an earlier one's."""
    page.locator("#caption textarea").fill(caption)
    page.locator("#generate").click()
    page.locator("#status").filter(has_text=expect or f"for “{caption}”").wait_for(timeout=timeout_ms)


def _gallery_images(page) -> list[str]:
    return [img.get_attribute("src") for img in page.locator("#gallery img").all()]


def test_page_generates_the_requested_number_of_images(server, browser):
    page = browser.new_page()
    page.goto(server[0])
    page.locator("#top input").fill("3")
    _generate(page, "a yellow circle")
    status = page.locator("#status").inner_text()
    assert "3 of 16 candidates" in status and "by CLIP score" in status
    assert len(_gallery_images(page)) == 3
    assert "CLIP" in page.locator("#gallery").inner_text()  # the scores are shown with the images
    page.close()


def test_page_completes_an_uploaded_image(server, browser, tmp_path):
    source = tmp_path / "source.png"
    rng = np.random.default_rng()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(source)
    page = browser.new_page()
    page.goto(server[0])
    page.get_by_text("image prefix (image-to-image)").click()
    page.locator("#image input[type=file]").set_input_files(str(source))
    page.locator("#image img").first.wait_for(timeout=30_000)  # the upload shows before we generate
    _generate(page, "a red square above a blue circle")
    assert "candidates" in page.locator("#status").inner_text()
    assert len(_gallery_images(page)) == 4
    page.close()


def test_an_empty_caption_is_a_message_and_the_server_keeps_answering(server, browser):
    page = browser.new_page()
    page.goto(server[0])
    _generate(page, "   ", expect="Error")
    assert "the caption is empty" in page.locator("#status").inner_text()
    _generate(page, "a green square")
    assert "candidates" in page.locator("#status").inner_text() and len(_gallery_images(page)) == 4
    page.close()


def test_an_unreadable_upload_is_a_message_and_the_server_keeps_answering(server, browser, tmp_path):
    """A damaged image (a PNG cut in half: its header reads, its pixels do not) is named in the page; the next
    request, from another page, is served as usual."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng().integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buffer, "PNG")
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    page = browser.new_page()
    page.goto(server[0])
    page.get_by_text("image prefix (image-to-image)").click()
    page.locator("#image input[type=file]").set_input_files(str(damaged))
    _generate(page, "a red square above a blue circle", expect="Error")
    assert "not a readable image" in page.locator("#status").inner_text()
    assert not _gallery_images(page)
    page.close()
    other = browser.new_page()
    other.goto(server[0])
    _generate(other, "a green square")
    assert len(_gallery_images(other)) == 4
    other.close()


def test_two_clients_at_once_both_get_their_images(server, browser):
    pages = [browser.new_context().new_page() for _ in range(2)]
    for page, caption in zip(pages, ("a black cross", "an orange circle in the center"), strict=True):
        page.goto(server[0])
        page.locator("#caption textarea").fill(caption)
    for page in pages:  # both requests in flight together
        page.locator("#generate").click()
    for page, caption in zip(pages, ("a black cross", "an orange circle in the center"), strict=True):
        page.locator("#status").filter(has_text="candidates").wait_for(timeout=180_000)
        assert caption in page.locator("#status").inner_text() and len(_gallery_images(page)) == 4
        page.context.close()


def test_a_bad_port_is_one_line(quick_demo):
    result = subprocess.run([sys.executable, "-m", "dalle_jax.cli", "serve", "--run", str(quick_demo[0]), "--port",
                             "70000"], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port 70000" in result.stderr and "Traceback" not in result.stderr
