"""Serve the report explorer at http://127.0.0.1:$APP_PORT/ (default 8866) until Ctrl-C: what `make app` runs.

Flyte's local serving runs the command of ``pipeline.app_env`` (Voilà on apps/explorer.ipynb) on
loopback; see machinery/app_serving.py.
"""

import sys

import pipeline
from machinery.app_serving import main

if __name__ == "__main__":
    sys.exit(main(pipeline.app_env, pipeline.runtime.settings.reports_dir))
