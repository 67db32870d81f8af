"""`dalle-jax serve`: a web page over a run — a caption in, reranked images out — built with Gradio.

The model is loaded once. Requests go through one `Batcher`: a worker thread owns the model and, each time it is
free, takes the oldest waiting request together with every other waiting request that has the same settings (and
no image prefix) and draws them in the same sampler calls (`rerank.sample_and_rerank_together`). Each request's
images are exactly the ones it would get alone, and the same as `dalle-jax sample` draws for that caption, seed and
settings, so batching changes throughput, never results.

Bad input (an empty caption, an unreadable image, settings out of range) is a message in the page's status line;
the server keeps running. The page binds to 127.0.0.1 unless told otherwise and is never shared publicly.
The same endpoint, `/generate`, is callable from a script with `gradio_client` (README "Serving").
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dalle_jax.errors import ConfigError, DalleJaxError
from dalle_jax.sampling.rerank import (
    LoadedRun,
    RankedSample,
    SampleInputError,
    check_counts,
    prefix_from_image,
    read_image,
    sample_and_rerank_together,
)
from dalle_jax.sampling.sampler import SampleConfig

log = logging.getLogger(__name__)
MAX_SAMPLES = 512  # the paper's candidates per caption
GATHER_S = 0.02  # how long the worker waits for requests arriving together before it starts a call


@dataclasses.dataclass(frozen=True)
class Settings:
    """What requests must agree on to share sampler calls."""

    num_samples: int
    top: int
    seed: int
    sample: SampleConfig


def parse_settings(num_samples: Any, top: Any, seed: Any, temperature: Any, top_k: Any, top_p: Any,
                   cfg_scale: Any) -> Settings:
    """The page's fields -> Settings; a value out of range is a SampleInputError naming the field and its range."""
    def number(name: str, value: Any, kind: type) -> Any:
        try:
            parsed = kind(value)
        except (TypeError, ValueError):
            raise SampleInputError(f"{name}: {value!r} is not a number") from None
        if kind is int and parsed != float(value):
            raise SampleInputError(f"{name}: {value!r} must be a whole number")
        return parsed

    num_samples, top = number("candidates", num_samples, int), number("shown", top, int)
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise SampleInputError(f"candidates: {num_samples} must be between 1 and {MAX_SAMPLES}")
    if not 1 <= top <= num_samples:
        raise SampleInputError(f"shown: {top} must be between 1 and the number of candidates ({num_samples})")
    seed = number("seed", seed, int)
    if not 0 <= seed < 2**32:
        raise SampleInputError(f"seed: {seed} must be in [0, 2^32)")
    try:
        sample = SampleConfig(temperature=number("temperature", temperature, float), top_k=number("top-k", top_k, int),
                              top_p=number("top-p", top_p, float), cfg_scale=number("guidance", cfg_scale, float))
    except ConfigError as error:  # SampleConfig's own range checks
        raise SampleInputError(str(error).replace("sample.", "")) from None
    if sample.cfg_scale < 0:
        raise SampleInputError(f"guidance: {sample.cfg_scale} must be >= 0 (1 = plain conditional sampling)")
    return Settings(num_samples, top, seed, sample)


@dataclasses.dataclass(eq=False)
class _Request:
    caption: str
    settings: Settings
    prefix: np.ndarray | None
    on_progress: Callable[[int, int], None] | None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: list[RankedSample] | None = None
    error: Exception | None = None


class Batcher:
    """Queues requests and runs them on one worker thread, batching those whose settings agree."""

    def __init__(self, run: LoadedRun, batch_size: int = 64, max_prompts: int = 8):
        check_counts(1, 1, batch_size)
        self.run, self.batch_size, self.max_prompts = run, batch_size, max_prompts
        self._waiting: list[_Request] = []
        self._cond = threading.Condition()
        self.calls: list[int] = []  # prompts per sampler call, in order (for tests and logs)
        threading.Thread(target=self._work, name="dalle-jax-sampler", daemon=True).start()

    def submit(self, caption: str, settings: Settings, prefix: np.ndarray | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> list[RankedSample]:
        """Blocks until the request is drawn; returns its kept images (best first) or raises its error."""
        if not caption.strip():
            raise SampleInputError("the caption is empty: type what the image should show")
        request = _Request(caption, settings, prefix, on_progress)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _take(self) -> list[_Request]:
        with self._cond:
            while not self._waiting:
                self._cond.wait()
        time.sleep(GATHER_S)  # requests clicked together arrive within a few ms of each other
        with self._cond:
            first = self._waiting[0]
            group = [first] if first.prefix is not None else [
                r for r in self._waiting if r.prefix is None and r.settings == first.settings][:self.max_prompts]
            self._waiting = [r for r in self._waiting if r not in group]
        return group

    def _work(self) -> None:
        while True:
            self._run(self._take())

    def _run(self, group: list[_Request]) -> None:
        settings = group[0].settings

        def progress(done: int, total: int) -> None:
            for request in group:
                if request.on_progress is not None:
                    request.on_progress(done, total)

        try:
            self.calls.append(len(group))
            results = sample_and_rerank_together(
                self.run, [r.caption for r in group], num_samples=settings.num_samples, top=settings.top,
                seed=settings.seed, sample_config=settings.sample, batch_size=self.batch_size,
                prefix=group[0].prefix, on_progress=progress)
            for request, kept in zip(group, results, strict=True):
                request.result = kept
        except Exception as error:  # reported to every request of the call; the worker keeps serving
            log.exception("serve: sampling failed")
            for request in group:
                request.error = error
        for request in group:
            request.done.set()


# ------------------------------------------------------------------------------------------------ the page

def build_app(run: LoadedRun, batcher: Batcher, title: str = "dalle-jax") -> Any:
    """The Gradio Blocks page: caption, settings, optional image prefix; a gallery of reranked images."""
    import gradio as gr

    grid = run.grid

    def generate(caption, num_samples, top, seed, temperature, top_k, top_p, cfg_scale, image, prefix_rows,
                 progress=gr.Progress()):  # noqa: B008 (Gradio's idiom: the default marks the progress hook)
        try:
            settings = parse_settings(num_samples, top, seed, temperature, top_k, top_p, cfg_scale)
            prefix = None
            if image:
                prefix = prefix_from_image(run, read_image(image, "image"), int(prefix_rows))
            kept = batcher.submit(caption or "", settings, prefix,
                                  on_progress=lambda done, total: progress(done / total, desc="sampling"))
        except DalleJaxError as error:  # every input error of ours: a message in the page, the server goes on
            return [], f"**Error:** {error}"
        gallery = [(k.image, f"#{r + 1}" + ("" if k.clip_score is None else f" · CLIP {k.clip_score:.3f}"))
                   for r, k in enumerate(kept)]
        how = "by CLIP score" if run.clip is not None else "in draw order (no reranker)"
        return gallery, (f"{len(kept)} of {settings.num_samples} candidates for “{caption.strip()}”, {how}; "
                         f"seed {settings.seed}")

    # Nothing leaves the machine: no usage analytics, and system fonts instead of Google Fonts in the page.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=title, analytics_enabled=False, theme=theme) as app:
        gr.Markdown(f"# {title}\nType a caption; the prior draws candidates, the dVAE decodes them and the CLIP "
                    "reranker keeps the best. Optionally give an image: its top rows are kept and completed.")
        with gr.Row():
            with gr.Column(scale=1):
                caption = gr.Textbox(label="caption", placeholder="a red circle above a blue square",
                                     elem_id="caption")
                with gr.Row():
                    num_samples = gr.Number(16, label="candidates", precision=0, minimum=1, maximum=MAX_SAMPLES,
                                            elem_id="num_samples")
                    top = gr.Number(4, label="shown", precision=0, minimum=1, maximum=MAX_SAMPLES, elem_id="top")
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                with gr.Accordion("sampling", open=False):
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                    top_k = gr.Number(0, label="top-k (0 = off)", precision=0, minimum=0)
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1 = off)")
                    cfg_scale = gr.Slider(0.0, 8.0, value=1.0, step=0.5, label="guidance (1 = off)")
                with gr.Accordion("image prefix (image-to-image)", open=False):
                    image = gr.Image(type="filepath", label="image", elem_id="image")
                    prefix_rows = gr.Slider(1, grid - 1, value=max(1, grid // 2), step=1,
                                            label=f"token rows kept (of {grid})", elem_id="prefix_rows")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(label="reranked samples", columns=4, format="png", elem_id="gallery")
        inputs = [caption, num_samples, top, seed, temperature, top_k, top_p, cfg_scale, image, prefix_rows]
        button.click(generate, inputs, [gallery, status], api_name="generate")
        caption.submit(generate, inputs, [gallery, status], api_name=False)
    return app


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860, batch_size: int = 64,
          max_prompts: int = 8, rerank: bool = True, dtype: str = "float32", block: bool = True) -> Any:
    """Loads the run once and serves the page; returns the launched app (with block=False, for tests)."""
    import os

    from dalle_jax.sampling.rerank import load_run

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before Gradio is imported
    run = load_run(run_dir, rerank=rerank, dtype=dtype)
    batcher = Batcher(run, batch_size=batch_size, max_prompts=max_prompts)
    app = build_app(run, batcher, title=f"dalle-jax · {Path(run_dir).name}")
    # Concurrent requests each wait in a handler thread while the Batcher groups them into sampler calls.
    app.queue(default_concurrency_limit=max(2, max_prompts))
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
               show_error=True)
    return app
