"""The ``/v1/models`` card (JSON over HTTP), as OpenAI-style clients and the reference WebUI read it."""

from __future__ import annotations

import time

import msgspec


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "lingbot_ray"
    root: str = ""
    parent: None = None
    max_model_len: None = None
    num_gpus: int = 0
    task_type: str = "I2V"
    dit_precision: str = "fp32"
    vae_precision: str = "fp32"
    pipeline_name: str = "lingbot_world_causal_dmd"
    pipeline_class: str = "LingBotWorldCausalDMDPipeline"

    def __post_init__(self) -> None:
        if not self.root:
            self.root = self.id


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class _NotFound(msgspec.Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str = "model"
    code: str = "model_not_found"


class ModelNotFound(msgspec.Struct, kw_only=True):
    error: _NotFound


def model_not_found(model_id: str) -> ModelNotFound:
    return ModelNotFound(error=_NotFound(message=f"The model '{model_id}' does not exist"))
