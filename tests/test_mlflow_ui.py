"""`mlflow ui` shows the stage runs: a small store made through blockdrop.tracking (no training), the UI
served on a free loopback port with one worker, the address `make ui` prints opened in headless Chromium."""

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
READERS = STAGES[1:]  # the stages that read data/prepared (prepare writes it)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("chromium") is None or not Path("/usr/bin/chromedriver").exists(),
    reason="headless browser missing: `make browser` (apt-get install chromium chromium-driver) to run it",
)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(mlflow_project: str) -> tuple[str, str]:
    """A SQLite store holding one run per stage (params, a metric per epoch, a tag, the prepared splits as the
    dataset input of the stages reading them), as the stages log them."""
    uri = mlflow_project
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/meta.json").write_text('{"source": "fashion-mnist"}')
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
        deadline = time.monotonic() + 300  # a busy 2-core host (other jobs, nice 19) needs minutes to start it
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


# Each body row of the runs table (ag-grid: the pinned and the scrolled columns are two elements with one
# row-index) as the list of its cells' texts; read in one call, so a re-render cannot leave stale elements.
ROWS_JS = """const rows = {};
for (const row of document.querySelectorAll("[role='row'][row-index]")) {
  const cells = [...row.querySelectorAll("[role='gridcell']")].map((c) => c.innerText.trim());
  (rows[row.getAttribute("row-index")] ||= []).push(...cells);
}
return Object.values(rows);"""


def test_make_ui_address_opens_the_training_runs_with_their_dataset(mlflow_ui) -> None:
    from browser import chrome
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, experiment = mlflow_ui
    address = tracking.ui_address(ui=base)  # what `make ui` prints
    md5 = tracking.dvc_md5("data/prepared")

    def rows(driver) -> dict[str, str]:
        """Stage run name -> its row's text (the name cell holds the run's colour label, then the name)."""
        found = {}
        for cells in driver.execute_script(ROWS_JS):
            name = next((c.splitlines()[-1] for c in cells if c and c.splitlines()[-1] in STAGES), None)
            if name:
                found[name] = " | ".join(cells)
        return found

    def ready(driver) -> bool:
        shown = rows(driver)
        return set(shown) == set(STAGES) and all("fashion-mnist prepared" in shown[s] for s in READERS)

    with chrome() as driver:
        driver.set_page_load_timeout(100)  # under selenium's own 120 s read timeout
        driver.get(address)
        try:
            WebDriverWait(driver, 180, poll_frequency=1).until(ready)
        except Exception:
            shown = driver.find_element(By.TAG_NAME, "body").text[:2000]
            pytest.fail(f"at {driver.current_url} the run table shows {rows(driver)}, expected {list(STAGES)} with "
                        f"the dataset of {list(READERS)}; page text:\n{shown}")
        shown, page, url = rows(driver), driver.find_element(By.TAG_NAME, "body").text, driver.current_url
    assert f"/experiments/{experiment}/runs?" in url and "workflowType=machine_learning" in url, url
    # The model-training view: its side bar has the model registry; the GenAI one (the UI's default) has judges
    # and sessions, and its landing tab the token usage of traces.
    lines = set(page.splitlines())
    assert "Model registry" in lines and not {"Judges", "Sessions", "Token Usage"} & lines, page
    # The Dataset cell: name (DVC md5), then the context the stage read the splits in.
    for stage in READERS:
        context = "Eval" if stage == "evaluate" else "Training"
        assert f"fashion-mnist prepared ({md5})\n{context}" in shown[stage], shown[stage]
    assert "fashion-mnist prepared" not in shown["prepare"], shown["prepare"]  # it writes the splits
