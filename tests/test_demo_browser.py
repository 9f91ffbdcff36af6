"""The web demo in a real headless browser (Debian's chromium driven by Playwright, no browser download).

The app runs on a free localhost port in a thread, with the tiny random checkpoint of test_demo (spoken answers:
12 codes of speech, then the word "five"). The browser shows the error of an empty question, uploads an espeak-ng
question wav, asks, and waits for the streamed spoken answer (the live player's <audio> element holds decoded
audio), the answer's audio player in the chat (its wav is fetched and checked) and the text "five"; then it asks in
writing for a text answer. A screenshot is saved to $PYTEST_ARTIFACTS (default: the test's tmp_path).

Needs: `apt-get install chromium ffmpeg` (ffmpeg: Gradio encodes the audio stream) and the [dev] extra (gradio,
playwright). Run alone with `.venv/bin/python -m pytest -q tests/test_demo_browser.py`.

The same browser session makes docs/demo.md's screenshot of any checkpoint (default: the shipped nano one):

    .venv/bin/python tests/test_demo_browser.py --question examples/question.wav --out docs/demo.png [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ANSWER_BYTES = 44 + 12 * 1920 * 2  # a 16-bit wav of the tiny model's 12 speech codes
TIMEOUT_MS = 60_000


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module, hint in (("gradio", "pip install -e '.[dev]'"), ("playwright", "pip install -e '.[dev]'")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint})"
    if CHROMIUM is None:
        return "no chromium executable on the PATH (apt-get install chromium)"
    if shutil.which("ffmpeg") is None:
        return "no ffmpeg on the PATH (apt-get install ffmpeg): Gradio needs it to stream audio"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(model_dir: Path, title: str) -> tuple[object, str]:
    """Build the demo of a checkpoint directory and serve it on a free localhost port (in a thread)."""
    from modeling_moss_speech.apps.demo import build_demo, launch_demo, load_checkpoint
    from modeling_moss_speech.pretrained import shipped_voices

    model, processor = load_checkpoint(model_dir, device="cpu")
    demo = build_demo(model, processor, voices=shipped_voices(model_dir), title=title)
    port = free_port()
    launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def browse(url: str, question: Path, screenshot: Path, expected_text: str | None = None,
           min_live_seconds: float = 0.01) -> dict:
    """Ask `question` (an audio file) in the page at `url`, wait for the spoken answer, save a screenshot.

    The live player must reach `min_live_seconds` of streamed audio.
    Returns what the page showed: the error toast of an empty question, the live player's audio (source,
    duration), the chat's audio files (url, size, first bytes) and the assistant's texts.
    """
    from playwright.sync_api import sync_playwright

    seen: dict = {}
    with sync_playwright() as playwright:
        # As root, chromium needs --no-sandbox; autoplay lets the streamed answer start without a click.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(url)
            page.wait_for_selector("#moss-ask")

            page.click("#moss-ask")  # nothing asked yet: a one-line error in the page
            toast = page.wait_for_selector("[data-testid=toast-body]")
            seen["error"] = toast.inner_text()
            page.click("[data-testid=toast-close]")

            page.click("#moss-question-audio button[aria-label='Upload file']")
            page.set_input_files("#moss-question-audio input[type=file]", str(question))
            page.wait_for_selector("#moss-question-audio [data-testid=download-link]")  # uploaded
            page.click("#moss-ask")
            # The answer is done when the chat holds two players (question, answer) and no live progress.
            page.wait_for_function(
                "document.querySelectorAll('#moss-chat [data-testid=download-link]').length >= 2 && "
                "!document.querySelector('#moss-chat').innerText.includes('…')")
            if expected_text is not None:
                page.wait_for_function(
                    "text => Array.from(document.querySelectorAll('#moss-chat [data-testid=bot]'))"
                    ".some(e => e.innerText.includes(text))", arg=expected_text)
            # The streamed answer reached the live player: all of it, once its playlist is complete.
            page.wait_for_function(
                "seconds => Array.from(document.querySelectorAll('#moss-answer-audio audio'))"
                ".some(a => a.src && a.duration >= seconds)", arg=min_live_seconds)
            seen["live"] = page.eval_on_selector_all(
                "#moss-answer-audio audio", "els => els.map(a => ({src: a.src, duration: a.duration}))")
            seen["files"] = page.evaluate(
                """async () => Promise.all(Array.from(document.querySelectorAll(
                       '#moss-chat [data-testid=download-link]')).map(async link => {
                       const bytes = new Uint8Array(await (await fetch(link.href)).arrayBuffer());
                       return {url: link.href, size: bytes.length, head: String.fromCharCode(...bytes.slice(0, 4))};
                   }))""")
            seen["answers"] = page.eval_on_selector_all("#moss-chat [data-testid=bot]",
                                                        "els => els.map(e => e.innerText.trim())")

            if expected_text is not None:  # a written question answered in writing, as a second turn
                page.fill("#moss-question-text textarea", "what is two plus three")
                page.click("#moss-output-modality label:has-text('Text')")
                page.click("#moss-ask")
                page.wait_for_function(
                    "text => Array.from(document.querySelectorAll('#moss-chat [data-testid=user]'))"
                    ".some(e => e.innerText.includes(text))", arg="what is two plus three")
                page.wait_for_function(
                    "() => { const bots = document.querySelectorAll('#moss-chat [data-testid=bot]');"
                    " return bots.length >= 3 && !document.querySelector('#moss-chat').innerText.includes('…'); }")
                seen["answers"] = page.eval_on_selector_all("#moss-chat [data-testid=bot]",
                                                            "els => els.map(e => e.innerText.trim())")
            page.mouse.move(0, 0)
            page.screenshot(path=str(screenshot), full_page=True)
        except Exception:
            page.screenshot(path=str(screenshot.with_name(screenshot.stem + "-failure.png")), full_page=True)
            raise
        finally:
            browser.close()
    return seen


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _missing()
    if reason is not None:
        pytest.skip(f"browser test skipped: {reason}")
    from helpers import save_tiny_checkpoint

    assets = save_tiny_checkpoint(tmp_path_factory.mktemp("demo_browser"))
    demo, url = launch(assets["lm"], title="MOSS-Speech (tiny random test model)")
    yield url, assets
    demo.close()


def test_spoken_question_gets_a_streamed_spoken_answer_in_the_browser(server, tmp_path):
    url, assets = server
    artifacts = Path(os.environ.get("PYTEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "demo_browser.png"

    seen = browse(url, assets["question"], screenshot, expected_text="five", min_live_seconds=0.9)

    assert "Ask something first" in seen["error"] and "Traceback" not in seen["error"]
    (live,) = seen["live"]
    assert live["src"] and live["duration"] >= 0.9  # 12 codes = 0.96 s, streamed as AAC
    question, answer = seen["files"]
    assert question["url"].endswith("question.wav") and question["head"] == "RIFF"
    assert answer["head"] == "RIFF" and answer["size"] == ANSWER_BYTES
    assert seen["answers"][-2:] == ["five", "five"]  # under the spoken answer's player, then the written answer
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def main(argv: list[str] | None = None) -> int:
    """Screenshot the demo of a checkpoint answering a spoken question (for docs/demo.md)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the shipped MOSS-Speech-Nano checkpoint)")
    parser.add_argument("--question", required=True, help="audio file of the question to ask")
    parser.add_argument("--out", default="docs/demo.png", help="where to write the screenshot (PNG)")
    parser.add_argument("--title", default="MOSS-Speech-Nano", help="title of the page")
    args = parser.parse_args(argv)
    reason = _missing()
    if reason is not None:
        parser.error(reason)
    from modeling_moss_speech.pretrained import nano_path

    demo, url = launch(Path(args.model) if args.model else nano_path(), args.title)
    try:
        seen = browse(url, Path(args.question), Path(args.out))
    finally:
        demo.close()
    print(f"{args.out}: answers {seen['answers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
