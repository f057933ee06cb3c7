"""One thin entry point per DVC stage (``python -m pipelines.<stage>``), and nothing else: the Prefect flows
that run these stages are in ``orchestration/``, the operations commands (servers, deployments) in ``ops/``."""
