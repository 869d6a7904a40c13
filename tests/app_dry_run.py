"""Serialize the report explorer's app environment for a cluster, offline: `flyte.deploy(app_env, dry_run=True)`.

Run by tests/test_app.py in a subprocess, because ``flyte.init`` with an endpoint changes process-wide state.
As in deploy_dry_run.py: the endpoint is a loopback address nothing listens on (a dry run never contacts it),
and the image-existence check, which would ask a public registry, is replaced with "assume it exists".
Prints one JSON line: what the cluster would receive for the app, and which task environments come with it; and the
image URIs Flyte computes (``Image.uri``) for the app's image, the pipeline's, and the pipeline's image with the
packages given as arguments, to compare with the image the serialized app names.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import flyte
from flyte._internal.imagebuild.image_builder import ImageBuildEngine
from flyte.app._parameter import SerializableParameterCollection


async def assume_image_exists(image):
    return image.uri


ImageBuildEngine.image_exists = staticmethod(assume_image_exists)
ROOT = Path(__file__).resolve().parents[1]
# A registry named at init, as a cluster's config names one: images declared afterwards carry it, so their URIs are the
# ones deployed (without it, a local build would add the localhost dev registry only when it builds).
flyte.init(endpoint="dns:///localhost:30080", insecure=True, project="demo", domain="development", root_dir=ROOT,
           image_registry="registry.example.com/reports")

import pipeline  # noqa: E402  (after init, as a user script would)

# Before the deploy, which may resolve an environment's image again: the URIs of the images as declared.
image_uris = {"app": pipeline.app_env.image.uri, "pipeline": pipeline.image.uri,
              "pipeline_with_packages": pipeline.image.with_pip_packages(*sys.argv[1:]).uri}
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
    "image_uri": spec.container.image,
    "declared_image_uris": image_uris,
    "ports": [port.container_port for port in spec.container.ports],
    "app_args": list(spec.container.args),
    "entrypoint": command[0],
    "bundled": bundled,
    "parameters": [parameter.model_dump() for parameter in parameters.parameters],
    "env": {item.key: item.value for item in spec.container.env},
    "requires_auth": not spec.security_context.allow_anonymous,
}))
