"""The application builder: ``import_path: lingbot_ray.serve.app:build_app`` in ``serve_config.yaml``.

Classes stay undecorated; this is the one place that turns them into deployments, with the options
:func:`~lingbot_ray.serve.config.deployment_options` computes from config, and binds the graph::

    Ingress ──▶ TextEncoder
       │   ──▶ DiTGroup    (sticky)
       │   ──▶ VAEDecoder  (sticky)
       │   ──▶ PostProcess (sticky; only for sessions that ask for it)

The ingress calls them in the order the stage chain declares (:mod:`lingbot_ray.engine.chain`).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from lingbot_ray.checkpoint import ensure_checkpoint
from lingbot_ray.hub import hub_repo_id
from lingbot_ray.engine.chain import StageChain

from .backend import InProcessBackend
from .config import ServeConfig, deployment_options, load_config
from .deployments import DiTGroup, PostProcess, RayDiTGroup, RayPostProcess, RayTextEncoder, RayVAEDecoder, TextEncoder, VAEDecoder
from .ingress import Ingress, RayIngress

logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any] | ServeConfig | None = None):
    """Validate the config, make sure the checkpoint exists, and bind the deployment graph.

    ``serve run lingbot_ray.serve.app:build_app`` serves the embedded model with no file at all;
    ``serve build lingbot_ray.serve.app:app`` writes the config of that default application.
    """
    config = load_config(args)
    # a missing folder is built once, here, before replicas race for it; a hub model is fetched by
    # the nodes that load it (this build task may run on a head node without it)
    if hub_repo_id(config.model.path) is None:
        ensure_checkpoint(config.model.path, build_tiny_if_missing=config.model.build_tiny_if_missing, settings=config.model.checkpoint_settings)
    options = deployment_options(config)

    def deploy(cls, name: str):
        return serve.deployment(cls, name=name, **options[name])

    # each stage is bound only the model and its own section (see ServeConfig.for_stage)
    text = deploy(RayTextEncoder, "TextEncoder").bind(config.for_stage("text_encoder"))
    # the Ray* classes add the replicas' metrics (lingbot_ray.serve.metrics) to the plain ones
    dit = deploy(RayDiTGroup, "DiTGroup").bind(config.for_stage("dit"))
    vae = deploy(RayVAEDecoder, "VAEDecoder").bind(config.for_stage("vae"))
    # post-processing is deployed only where it can run: with weights configured or allowed
    post = deploy(RayPostProcess, "PostProcess").bind(config.for_stage("postprocess")) if config.postprocess.has_weights else None
    ingress = serve.deployment(serve.ingress()(RayIngress), name="Ingress", **options["Ingress"])
    return ingress.bind(config, text, dit, vae, post)


def build_in_process(args: dict[str, Any] | ServeConfig | None = None) -> Ingress:
    """The same ingress and stages in this process, without Ray (tests, notebook, benchmark)."""
    config = load_config(args)
    chain = StageChain(TextEncoder(config), DiTGroup(config), VAEDecoder(config), PostProcess(config))
    return Ingress(config, InProcessBackend(chain))


def __getattr__(name: str):
    # ``app``: the default application as an object, for tools that take one (``serve build``);
    # built on first access, not at import
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
