"""What ``pipeline.py`` uses but does not teach. No module here imports ``pipeline``.

Layers, each importing only the ones above it in this list:

* ``offline_llm``   the deterministic offline model: in-process transport and loopback server
* ``settings``      environment variables -> ``Settings`` (checked, with clear errors)
* ``records``       ``Record`` (pydantic, schema built once) and prompt text made from fields
* ``concurrency``   ``InflightLimit`` (a resizable cap across event loops) and ``Tally``
* ``pacing``        ``Pace`` and ``PacedTransport``: an adaptive window of requests in flight, pauses
                    shared by every request when the server rate-limits, patience, counters
* ``reply_cache``   the reply cache: identical model requests answered from SQLite
* ``runtime``       ``runtime``: the one owner of the process's state (settings, pace, clients,
                    reply cache, progress listeners, the model's name, the batch's counts),
                    with ``configured`` and ``use_transport``
* ``model_client``  ``complete``: one chat completion, paced, cached, retried within one deadline,
                    metered, redacted; ``check_backend`` before a batch
* ``progress``      progress events as console lines: ``print_notable`` (retries, waits, timeouts,
                    cut-offs, rate limits) and ``StepLines`` (a topic's steps, for the CLI)
* ``cache_policy``  Flyte cache keys that cover the whole pipeline module and the model
* ``inputs``        ``validate_batch`` and ``coerce_topics``
* ``files``         slugs, atomic writes and folder replacement
* ``html_page``     the HTML5 document and Content-Security-Policy around every page
* ``run_output``    ``save_run``: ``<reports>/<run-id>/`` with ``index.html`` and ``summary.json``
* ``app_serving``   the report explorer app served locally through Flyte: ``APP_PORT``, Voila's command,
                    waiting until it listens, stopping it and every kernel it started (``make app``)
"""
