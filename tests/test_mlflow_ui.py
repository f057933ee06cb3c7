"""`mlflow ui` shows the stage runs: a small store made through blockdrop.tracking (no training), the UI
served on a free loopback port with one worker, the experiment's run table opened in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from blockdrop import tracking
from blockdrop.config import Params

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "pretrain", "curriculum", "finetune", "evaluate")

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or not Path("/usr/bin/chromedriver").exists(),
    reason="headless browser missing: `make browser` (apt-get install chromium chromium-driver) to run it",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(mlflow_project: str) -> tuple[str, str]:
    """A SQLite store holding one run per stage (params, a metric per epoch, a tag), as the stages log them."""
    uri = mlflow_project
    for stage in STAGES:
        with tracking.stage_run(stage, Params()) as run:
            for epoch in range(2):
                run.log_epoch({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
    experiment = MlflowClient(uri).get_experiment_by_name("blockdrop").experiment_id
    return uri, experiment


@pytest.fixture
def mlflow_ui(store: tuple[str, str], tmp_path: Path):
    uri, experiment = store
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = (tmp_path / "mlflow-ui.log").open("w")
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not start: {(tmp_path / 'mlflow-ui.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, experiment
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def test_run_table_lists_every_stage_run(mlflow_ui) -> None:
    from browser import chrome
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, experiment = mlflow_ui

    def listed(driver) -> set[str]:
        cells = driver.find_elements(By.CSS_SELECTOR, "[role='gridcell'], [role='cell'], td, a")
        return {c.text.strip() for c in cells} & set(STAGES)

    with chrome() as driver:
        driver.set_page_load_timeout(60)
        driver.get(f"{base}/#/experiments/{experiment}/runs")
        try:
            WebDriverWait(driver, 60, poll_frequency=0.5).until(lambda d: listed(d) == set(STAGES))
        except Exception:
            shown = driver.find_element(By.TAG_NAME, "body").text[:2000]
            pytest.fail(f"run table shows {sorted(listed(driver))}, expected {list(STAGES)}; page text:\n{shown}")
        assert "blockdrop" in driver.title.lower() or "mlflow" in driver.title.lower()
