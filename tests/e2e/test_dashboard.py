"""The browser dashboard on the real stack, in Debian's headless Chromium driven by playwright.

Enter a key, upload files through the form (a bad one first: its problems are shown), submit a
tiny LoRA job, watch its loss curve gain points while it runs, wait for success, download the
adapter. TUNEQ_UPDATE_SCREENSHOT=1 also writes the job page to docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.e2e.conftest import ROOT, Stack, dump_logs, reverse_dataset


CHROMIUM = Path(os.environ.get("TUNEQ_TEST_CHROMIUM", "/usr/bin/chromium"))
# As root in a container without a network: no sandbox, and nothing that calls home (each
# refused connection would slow the start).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
SCREENSHOT_MAX_BYTES = 300_000


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}, and CI=true allows no skipped tests (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    if not CHROMIUM.is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.problems = []  # type: ignore[attr-defined]
        pg.on("pageerror", lambda exc: pg.problems.append(f"page error: {exc}"))  # type: ignore[attr-defined]
        pg.on("console", lambda msg: pg.problems.append(f"console {msg.type}: {msg.text}")  # type: ignore[attr-defined]
              if msg.type == "error" else None)
        try:
            yield pg
        finally:
            context.close()
            browser.close()


def _count(page, selector: str) -> int:
    value = page.get_attribute(selector, "data-count")
    return int(value) if value is not None else 0


def test_ui_served_without_key_under_csp() -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app()) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and 'src="/ui/static/app.js"' in page.text
        for r in (page, client.get("/ui/static/app.js"), client.get("/ui/static/style.css")):
            assert r.status_code == 200
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        assert "javascript" in client.get("/ui/static/job.js").headers["content-type"]
        assert client.get("/ui/static/%2e%2e/routes/ui.py").status_code == 404  # nothing outside api/ui/static


def test_ui_scripts_never_parse_html() -> None:
    """Text from the server goes into the page only as text nodes (dom.js), never as markup."""
    for js in (ROOT / "api" / "ui" / "static").glob("*.js"):
        source = js.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{js.name} uses {sink}"


@pytest.mark.e2e
@pytest.mark.slow
# `page` first: without a browser the test skips before the stack starts.
def test_dashboard_submits_watches_and_downloads(page, stack: Stack, chat_server, tmp_path: Path) -> None:
    started = time.monotonic()
    train, valid, bad = tmp_path / "train.jsonl", tmp_path / "valid.jsonl", tmp_path / "bad.jsonl"
    train.write_text(reverse_dataset(96, seed=1))
    valid.write_text(reverse_dataset(16, seed=2))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')

    # The page itself needs no key, and forbids inline scripts.
    response = page.goto(f"{stack.url}/ui")
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.get_by_text("Enter an API key").wait_for()

    page.fill("#api-key", stack.key)
    page.click("#key-form button")
    page.wait_for_selector("#key-state.ok")
    page.click("a[data-nav=new]")

    # A bad file is refused with its line numbers; the good ones are accepted.
    page.set_input_files("#valid-file", str(bad))
    page.wait_for_selector("#valid-report .report[data-status=error]")
    assert "line 2" in page.inner_text("#valid-report")
    page.set_input_files("#valid-file", str(valid))
    page.wait_for_selector("#valid-report .report[data-status=processed]")
    page.set_input_files("#train-file", str(train))
    page.wait_for_selector("#train-report .report[data-status=processed]")
    assert "96 examples" in page.inner_text("#train-report")

    page.wait_for_selector("#model option[value=tiny-llama]", state="attached")
    page.select_option("#model", "tiny-llama")
    page.select_option("#method", "lora")
    page.fill("#lora-r", "16")
    page.fill("#lora-alpha", "64")
    # 96 examples / batch 8 * 5 epochs = 60 steps: a metric point per step, a valid point per 5; long
    # enough that even an idle machine shows the curve between two of the worker's reads.
    page.fill("#n-epochs", "5")
    page.fill("#batch-size", "8")
    page.fill("#learning-rate", "0.003")
    page.fill("#eval-every", "5")
    page.fill("#checkpoint-every", "10")
    page.click("#submit-job")
    page.wait_for_url("**/ui#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]

    # The curve must grow while the job runs, not only appear at the end.
    train_series = "#loss-chart [data-series=train_loss]"
    counts: list[int] = []
    modes: set[str] = set()
    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:
        status = page.get_attribute("#job-status", "data-status") or ""
        if status in ("succeeded", "failed", "cancelled"):
            break
        modes.add(page.get_attribute("#live-mode", "data-mode") or "")
        n = _count(page, train_series) if page.query_selector(train_series) else 0
        if n and (not counts or n != counts[-1]):
            counts.append(n)
        time.sleep(0.2)
    assert status == "succeeded", f"job {job_id} ended {status!r}\n{dump_logs(stack)}"
    assert counts == sorted(counts), counts
    assert len(counts) >= 2, f"the loss curve did not gain points while the job ran: {counts}"

    page.wait_for_selector("#live-mode[data-mode=finished]")
    assert _count(page, train_series) == 60
    assert _count(page, "#lr-chart [data-series=learning_rate]") == 60
    assert _count(page, "#loss-chart [data-series=valid_loss]") == 12
    assert len(page.query_selector_all("#loss-chart [data-series=train_loss] circle.pt")) == 60
    assert page.query_selector_all("#checkpoints tbody tr"), "no checkpoints listed"
    assert "GiB" in page.inner_text("#mem-predicted")  # the plan stored with the job
    assert page.query_selector_all("#events tbody tr")

    # The download needs the key header: fetched as a blob, saved through an object URL.
    button = page.wait_for_selector("button[data-artifact='adapter.tar.gz']")
    with page.expect_download() as info:
        button.click()
    saved = tmp_path / "adapter.tar.gz"
    info.value.save_as(saved)
    with tarfile.open(saved, mode="r:gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("adapter_config.json") for n in names), names

    # Try it: the base model and the fine-tuned one answer the same prompt side by side, streamed.
    page.wait_for_selector("#try-ask:not([disabled])")
    page.fill("#try-prompt", "Reverse: apple")
    page.click("#try-ask")
    page.wait_for_function("() => ['#try-base', '#try-tuned'].every((s) => document.querySelector(s).textContent.length > 0)"
                           " && !document.querySelector('#try-ask').disabled", timeout=180_000)
    assert not page.query_selector_all("#try-it pre.error"), page.inner_text("#try-it")
    assert "tiny-llama" in page.inner_text("#try-it") and job_id in page.inner_text("#try-it")

    shot = tmp_path / "dashboard.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    assert 0 < shot.stat().st_size < SCREENSHOT_MAX_BYTES
    if os.environ.get("TUNEQ_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    # The jobs table lists it with its owner, method and finished progress.
    page.click("a[data-nav=jobs]")
    row = page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}']")
    text = row.inner_text()
    assert "succeeded" in text and "lora" in text and "tiny-llama" in text and "60/60" in text, text

    assert not page.problems, page.problems  # type: ignore[attr-defined]
    print(f"dashboard e2e: {time.monotonic() - started:.1f}s, curve counts seen live {counts}, live modes {sorted(modes)}")
