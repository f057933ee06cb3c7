# `make repro` and `make test` are the whole set-up on a fresh machine: they create .venv, install the
# pinned stack from pyproject.toml, make the default data available and run.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

# The stage commands in dvc.yaml run `python`: put the project's venv first on PATH for them.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install data repro test test-fast test-slow lint plots ui serve flow retrain schedule deploy worker sweep browser \
	push pull sshd postgres tracking-server

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)  ## create .venv and install the pinned stack

# The raw data is versioned like everything else: prepare depends on data.raw (dvc.yaml), a folder DVC tracks.
data: install  ## put data.raw in place and track it with DVC (dvc pull, else Debian's package or a download)
	$(PY) -m ops.data

repro: install data  ## reproduce the whole pipeline (dvc repro)
	dvc repro

# Two pytest workers, one per core: most of the suite's time goes to starting processes (stages, dvc, servers)
# that keep one core busy at a time. `--dist loadfile` keeps a file's tests (and its module fixtures) on one worker.
test: install browser sshd postgres  ## the whole suite, unit and end-to-end tiers (slow tests excluded)
	pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-fast: install  ## the unit tier: no dvc repro, no servers, no stage processes (under 3 minutes)
	pytest -q -m "not slow and not e2e" -n 2 --durations=10

test-slow: install  ## run only the slow tests
	pytest -q -m slow

lint: install  ## ruff
	ruff check .

serve: install  ## serve the registered champion on http://127.0.0.1:5001/invocations (mlflow models serve, 1 worker)
	$(PY) -m ops.serve $(ARGS)

flow: install data  ## run the pipeline once as a Prefect flow (a task per DVC stage, one parent MLflow run)
	$(PY) -m orchestration run

retrain: install data  ## run the retrain flow once: the pipeline, then champion/challenger promotion
	$(PY) -m orchestration retrain

schedule: install data  ## serve the retrain flow on flow.cron (starts a Prefect server on 127.0.0.1:4200 if none)
	$(PY) -m orchestration serve --port 4200

# prefect.yaml: the three flows as deployments on the `process` work pool `blockdrop`, retrain on flow.cron (UTC).
# Both targets use PREFECT_API_URL when set (a shared server), else the server on 127.0.0.1:4200 (make schedule's),
# started for the command if none answers. A worker runs the flow runs in this checkout: start one per machine.
deploy: install  ## create the Prefect work pool `blockdrop` if missing and deploy prefect.yaml's flows to it
	$(PY) -m ops.pool deploy

worker: install data  ## a Prefect worker on the pool: runs the deployments' flow runs here (ARGS="--limit 1")
	$(PY) -m ops.pool worker $(ARGS)

sweep: install data  ## every setting of sweep.grid as a DVC experiment; reports/sweep/ (ARGS="--set key=v1,v2")
	$(PY) -m orchestration sweep $(ARGS)

ui: install  ## MLflow UI on http://127.0.0.1:5000 (one worker) over this project's tracking store
	@$(PY) -c 'from blockdrop import config, tracking; \
	  print("runs table:", tracking.ui_address(config.load_params().tracking.experiment))'
	@# A tracking server (MLFLOW_TRACKING_URI=http://...) serves its own UI: the address above is on it.
	@case "$${MLFLOW_TRACKING_URI:-}" in http://*|https://*) exit 0;; esac; \
	mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri "$$($(PY) -c 'from blockdrop.tracking import tracking_uri; print(tracking_uri())')"

browser:  ## headless Chromium + chromedriver for the browser tests (apt-get, when root and missing)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "note: apt could not install chromium; the browser tests will be skipped"; \
	else echo "note: run 'sudo apt-get install chromium chromium-driver' for the browser tests"; fi

# The default remote is .dvc/config's `storage`, a folder beside the clone (../blockdrop-dvc-remote); point it
# at shared storage with `dvc remote modify storage url s3://...` (or gs://, ssh://). Git holds dvc.lock, the
# remote holds the bytes it names: push after a run, pull in a fresh clone, and `dvc repro` has nothing to do.
push: install  ## dvc push: the raw data, data/prepared and models/ to the default DVC remote
	dvc push

pull: install  ## dvc pull: the raw data and the outs dvc.lock names, from the default DVC remote
	dvc pull

sshd:  ## OpenSSH server for the SSH-remote test (apt-get, when root and missing)
	@if [ -x /usr/sbin/sshd ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends openssh-server >/dev/null) \
	    || echo "note: apt could not install openssh-server; the SSH-remote test will be skipped"; \
	else echo "note: run 'sudo apt-get install openssh-server' for the SSH-remote test"; fi

postgres:  ## PostgreSQL for `make tracking-server` and its test (apt-get, when root and missing)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null) \
	    || echo "note: apt could not install postgresql; the tracking-server test will be skipped"; \
	else echo "note: run 'sudo apt-get install postgresql' for make tracking-server and its test"; fi

# A private PostgreSQL cluster in .tracking/pg and `mlflow server` over it, both on 127.0.0.1; Ctrl-C stops both.
tracking-server: install postgres  ## MLflow server on http://127.0.0.1:5050 over PostgreSQL (ARGS="--port N")
	$(PY) -m ops.tracking_server $(ARGS)

plots: install  ## DVC plots as HTML in reports/plots/, with vendored vega scripts (works offline)
	rm -rf reports/plots && mkdir -p reports/plots/vendor
	dvc plots show --html-template dvc_plots/template.html -o reports/plots
	cp dvc_plots/vendor/*.js reports/plots/vendor/
	@echo "open reports/plots/index.html"
