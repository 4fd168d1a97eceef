"""Transitional: the names moved to lingbot_ray.checkpoint and lingbot_ray.models.loading."""
# TODO remove once every user imports from the new places
from lingbot_ray.checkpoint import *  # noqa: F401,F403
from lingbot_ray.checkpoint import MODEL_INDEX_FILE, SERVING_DEFAULTS_FILE, PIPELINE_CLASS_NAME, EXPECTED_COMPONENTS, NULL_COMPONENTS, ServingDefaults  # noqa: F401
from .loading import default_dtype, load_dit as load_transformer, load_prompt_encoder, load_scheduler_config, load_vae  # noqa: F401
