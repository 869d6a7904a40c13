"""Serialize the report explorer's app environment for a cluster, offline: `flyte.deploy(app_env, dry_run=True)`.

Run by tests/test_app.py in a subprocess, because ``flyte.init`` with an endpoint changes process-wide state.
As in deploy_dry_run.py: the endpoint is a loopback address nothing listens on (a dry run never contacts it),
and the image-existence check, which would ask a public registry, is replaced with "assume it exists".
Prints one JSON line: what the cluster would receive for the app, and which task environments come with it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import flyte
from flyte._internal.imagebuild.image_builder import ImageBuildEngine
from flyte.app._parameter import SerializableParameterCollection


async def assume_image_exists(image):
    return image.uri


ImageBuildEngine.image_exists = staticmethod(assume_image_exists)
ROOT = Path(__file__).resolve().parents[1]
flyte.init(endpoint="dns:///localhost:30080", insecure=True, project="demo", domain="development", root_dir=ROOT)

import pipeline  # noqa: E402  (after init, as a user script would)

deployments = flyte.deploy(pipeline.app_env, dry_run=True)
environments = {name: deployed for deployment in deployments for name, deployed in deployment.envs.items()}
spec = environments["report-explorer"].deployed_app.pb2.spec
command = list(spec.container.command)  # fserve, which unpacks the code bundle, then runs the app's args
parameters = SerializableParameterCollection.from_transport(command[command.index("--parameters") + 1])
bundle = Path(command[command.index("--tgz") + 1])
with tarfile.open(bundle) as archive:  # a dry run leaves the bundle on disk, not uploaded
    bundled = sorted(archive.getnames())
print(json.dumps({
    "environments": sorted(environments),
    "image_packages": [layer.packages for layer in pipeline.app_env.image._layers if hasattr(layer, "packages")],
    "image_uri": spec.container.image,
    "ports": [port.container_port for port in spec.container.ports],
    "app_args": list(spec.container.args),
    "entrypoint": command[0],
    "bundled": bundled,
    "parameters": [parameter.model_dump() for parameter in parameters.parameters],
    "env": {item.key: item.value for item in spec.container.env},
    "requires_auth": not spec.security_context.allow_anonymous,
}))
