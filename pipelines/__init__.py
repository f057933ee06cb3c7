"""One thin entry point per DVC stage (``python -m pipelines.<stage>``), and the Prefect flows."""
