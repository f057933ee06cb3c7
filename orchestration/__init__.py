"""Prefect flows over the DVC pipeline: the only package of the project that imports prefect.

Entry point: ``python -m orchestration run|retrain|serve|sweep`` (``make flow``, ``make retrain``,
``make schedule``, ``make sweep``), in ``orchestration/__main__.py``. One job per module:

* ``stages``: run one DVC stage as a Prefect task; the flow lock, the stages' DAG order, the stage errors
* ``stage_output``, ``stage_timeout``: the tee of a running stage's output, the watchdog that kills it
* ``flows``: the flows ``blockdrop-pipeline`` and ``blockdrop-retrain``
* ``grid``, ``dvc_queue``, ``sweep_results``, ``sweep``: the flow ``blockdrop-sweep`` on DVC's experiment queue
* ``cron``, ``schedule``: ``flow.cron`` checked with Prefect's own schedule model; the retrain flow served on it
* ``prefect_server``, ``api``: a local ``prefect server start`` as a child process; the API a flow reports to

Dependencies point one way: ``orchestration`` imports ``blockdrop`` (never ``ops``), and ``ops`` may import
``orchestration``. ``prefect_server`` and ``grid`` do not import prefect, so ``ops`` uses them without
loading it. Module names must not match a top-level module (``queue``, ``watchdog``...): Prefect loads a
deployment's entrypoint (``orchestration/flows.py:...``) with this folder first on ``sys.path``.
"""
