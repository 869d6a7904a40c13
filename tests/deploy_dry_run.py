"""Serialize both task environments for a cluster, offline: `flyte.deploy(..., dry_run=True)`.

Run by tests/test_runtime.py in a subprocess, because ``flyte.init`` with an
endpoint changes process-wide state. The endpoint is a loopback address that
nothing listens on: a dry run never contacts it. Flyte's image-existence check
would look the base image up in a public registry, so it is replaced with
"assume it exists" (what Flyte itself concludes when every check fails).

Arguments ``name=value`` are passed to ``runtime.configure`` after ``import pipeline``
and before the deploy, as a notebook cell would (``backend=openai model=gpt-4.1-mini``).
Prints one JSON line describing what would be deployed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import flyte
from flyte._internal.imagebuild.image_builder import ImageBuildEngine


async def assume_image_exists(image):
    return image.uri


ImageBuildEngine.image_exists = staticmethod(assume_image_exists)
ROOT = Path(__file__).resolve().parents[1]
flyte.init(endpoint="dns:///localhost:30080", insecure=True, project="demo", domain="development", root_dir=ROOT)

import pipeline  # noqa: E402  (after init, as a user script would)

changes = dict(argument.split("=", 1) for argument in sys.argv[1:])
if changes:
    pipeline.runtime.configure(**changes)

deployments = flyte.deploy(pipeline.driver_env, dry_run=True)
specs = {
    task.get_name(): str(task.deployed_task)
    for deployment in deployments
    for env in deployment.envs.values()
    for task in env.deployed_entities
}


def env_vars(spec: str) -> dict[str, str]:
    return dict(re.findall(r'env \{\s*key: "(REPORT_\w+|OPENAI_\w+)"\s*value: "([^"]*)"', spec))


worker, driver = specs["llm-worker.refine_report"], specs["driver.report_batch_pipeline"]
print(json.dumps({
    "tasks": sorted(specs),
    "worker_secret": 'key: "openai-api-key"' in worker and 'env_var: "OPENAI_API_KEY"' in worker,
    "formatter_secret": 'key: "openai-api-key"' in specs["llm-worker.format_outputs"],
    "worker_reuse": "reuse_policy {" in worker and "concurrency: 4" in worker and "max_replicas: 2" in worker,
    "worker_retries": "retries: 3" in worker,
    "worker_env": env_vars(worker),
    "driver_env": env_vars(driver),
    "driver_secret": "openai-api-key" in driver,
}))
