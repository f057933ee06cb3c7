"""Operations tooling around the pipeline, one command per module (``python -m ops.<module>``):

* ``pool``: the flows as deployments on the Prefect work pool ``blockdrop``, and a worker (``make deploy``,
  ``make worker``)
* ``tracking_server``: a shared MLflow server over PostgreSQL (``make tracking-server``)
* ``serve``: the registered champion over HTTP with ``mlflow models serve`` (``make serve``)
* ``profile``: merge a profile into params.yaml (``python -m ops.profile profiles/tiny.yaml``)

``ops`` never imports prefect itself: it runs the ``prefect`` command, and uses ``orchestration``'s
Prefect-free helpers (the local server, ``orchestration.prefect_server``). Dependencies point one way: ``ops``
may import ``orchestration`` and ``blockdrop``; neither imports ``ops``.
"""
