"""The deployable configs: every YAML under ``lingbot_ray/configs/`` and the root ``serve_config.yaml``.

Pure Python, no Ray cluster: each file must validate as a Serve config, its ``args`` must load with
:func:`load_config` (unknown keys fail), and :func:`deployment_options` must ask Ray for the resources
the file's comments promise. The GPU configs' memory arithmetic is re-done here from the model facts
of ``docs/MODEL.md``, so raising a capacity or a size limit without re-doing it fails.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lingbot_ray.serve.config import ServeConfig, deployment_options, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "lingbot_ray" / "configs").glob("*.yaml")) + [ROOT / "serve_config.yaml"]
IMPORT_PATH = "lingbot_ray.serve.app:build_app"
FOUR_GPU = ROOT / "lingbot_ray" / "configs" / "lingbot-world-fast-4gpu-ulysses4.yaml"
RAYSERVICE = ROOT / "lingbot_ray" / "configs" / "kuberay-rayservice.yaml"
REAL_MODEL_PATH = "/models/lingbot-world-fast-diffusers"
HUB_REPO = "robbyant/lingbot-world-fast-diffusers"  # the RayService pulls it from the hub

# Model facts for the GPU memory budget (GB = 1e9 B), as in the configs' comments.
NUM_LAYERS, HIDDEN, NUM_HEADS = 40, 5120, 40
TEXT_TOKENS = 512
PIXELS_PER_TOKEN = 16  # VAE 8x spatial compression, then 2x2 patches
FRAMES_PER_BLOCK = 3
WINDOW_FRAMES = 18  # the checkpoint's default sliding window (latent frames)
BF16_BYTES = 2
DIT_WEIGHTS_GB = 37.5  # 18.54 B parameters in bf16, time embedding/projection kept in fp32
TEXT_ENCODER_GB = 11.4  # UMT5-XXL encoder, 5.68 B parameters in bf16
DIT_WORKSPACE_GB = 2.5  # activations (1.0 at 832x480), CUDA context, NCCL buffers
VAE_FIXED_GB = 1.26  # weights 0.76 (fp32 + a bf16 copy), CUDA context 0.5
# The VAE's figures at 832x480, fp32, as lingbot_ray/engine/memory.py plans them (and traces them on the
# meta device): a session's streaming decode cache, and what a chunk's decode needs while it runs (its
# new decode cache, built beside the session's until the chunk commits, + activations).
VAE_SESSION_GB_AT_832x480 = 3.78
VAE_DECODE_GB_AT_832x480 = 3.78 + 4.05
TOKENS_AT_832x480 = (832 // PIXELS_PER_TOKEN) * (480 // PIXELS_PER_TOKEN)
GPU_GB = 81_559 * 2**20 / 1e9  # an "80 GB" card: 79.6 GiB = 85.5 GB (the H100's 81,559 MiB, the least of them)


# -- reading the files -------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        document = yaml.safe_load(f)
    assert isinstance(document, dict), f"{path.name}: not a YAML mapping"
    return document


def serve_document(path: Path) -> dict[str, Any]:
    """The Serve config a file carries: the file itself, or a RayService's ``spec.serveConfigV2``."""
    document = load_yaml(path)
    if document.get("kind") != "RayService":
        return document
    embedded = document["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "spec.serveConfigV2 must be a YAML string, not a mapping"
    parsed = yaml.safe_load(embedded)
    assert isinstance(parsed, dict)
    return parsed


def the_application(path: Path) -> dict[str, Any]:
    applications = serve_document(path)["applications"]
    assert len(applications) == 1, f"{path.name}: expected one application, got {len(applications)}"
    return applications[0]


def config_of(path: Path) -> ServeConfig:
    return load_config(the_application(path)["args"])


# -- what the options ask Ray for --------------------------------------------------------------------


def replica_gpus(options: dict[str, Any]) -> float:
    """GPUs one replica reserves: its bundles (the replica sits in bundle 0) or its actor options."""
    if "placement_group_bundles" in options:
        return sum(bundle.get("GPU", 0) for bundle in options["placement_group_bundles"])
    return options.get("ray_actor_options", {}).get("num_gpus", 0)


def replica_cpus(options: dict[str, Any]) -> float:
    if "placement_group_bundles" in options:
        return sum(bundle.get("CPU", 0) for bundle in options["placement_group_bundles"])
    return options.get("ray_actor_options", {}).get("num_cpus", 1)  # Ray's default is one CPU


def total(options: dict[str, dict[str, Any]], per_replica) -> float:
    return sum(o.get("num_replicas", 1) * per_replica(o) for o in options.values())


# -- GPU memory arithmetic (the configs' comments, executable) ---------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a DiT's memory depends on (docs/MODEL.md; the v2 1.3B: its "LingBot World 2.0" section)."""

    num_layers: int
    hidden: int
    num_heads: int
    frames_per_block: int
    window_frames: int
    dit_weights_gb: float
    text_encoder_gb: float  # when on the GPU


# LingBot World fast and v2 14B: the same architecture and sizes
FOURTEEN_B = ModelFacts(NUM_LAYERS, HIDDEN, NUM_HEADS, FRAMES_PER_BLOCK, WINDOW_FRAMES, DIT_WEIGHTS_GB, TEXT_ENCODER_GB)
# v2 1.3B: 30 layers, 1536 wide (12 heads assumed), blocks of 4, window 18; 1,709,502,016 parameters
# in bf16 + fp32 time embedding/projection; the text encoder on its GPU with its CUDA context
V2_1P3B = ModelFacts(30, 1536, 12, 4, 18, 3.45, TEXT_ENCODER_GB + 0.5)
MODEL_OF_FILE = {"lingbot-world-v2-1.3b-1gpu.yaml": V2_1P3B}


def busiest_gpu_gb(
    config: ServeConfig, sessions: int | None = None, vae_sessions: int | None = None, model: ModelFacts = FOURTEEN_B
) -> float:
    """Peak memory of the GPU that carries a DiT rank plus every stage placed beside it.

    A stage with less than one GPU of its own shares a DiT rank's GPU (the VAE at 0.1 in the 1-GPU
    config, at 0 on cuda:0 in the 4-GPU one); a text encoder on the CPU takes no GPU memory.
    """
    sessions = config.dit.sessions_per_group if sessions is None else sessions
    vae_sessions = config.vae.sessions_per_replica if vae_sessions is None else vae_sessions
    ranks = config.dit.sequence_parallel_degree
    tokens = (config.limits.max_width // PIXELS_PER_TOKEN) * (config.limits.max_height // PIXELS_PER_TOKEN)
    kv_per_frame = tokens * model.num_layers * 2 * model.hidden * BF16_BYTES / ranks  # K and V, heads split over ranks
    text_kv = model.num_layers * 2 * TEXT_TOKENS * model.hidden * BF16_BYTES  # every rank holds all of it
    camera = model.num_layers * 2 * model.frames_per_block * tokens * model.hidden * BF16_BYTES / ranks
    gb = model.dit_weights_gb + DIT_WORKSPACE_GB + (camera + sessions * (model.window_frames * kv_per_frame + text_kv)) / 1e9
    if config.vae.num_gpus < 1:
        gb += VAE_FIXED_GB + (VAE_DECODE_GB_AT_832x480 + vae_sessions * VAE_SESSION_GB_AT_832x480) * tokens / TOKENS_AT_832x480
    if not config.text_encoder.cpu_offload and config.text_encoder.num_gpus < 1:
        gb += model.text_encoder_gb
    return gb


def test_memory_arithmetic_reproduces_model_md():
    # 1.28 GB of KV cache per latent frame at 832x480 for all 40 layers; window 18 => ~23 GB.
    config = load_config({"dit": {"sequence_parallel_degree": 1}, "limits": {"max_width": 832, "max_height": 480}})
    one = busiest_gpu_gb(config, sessions=1, vae_sessions=0) - busiest_gpu_gb(config, sessions=0, vae_sessions=0)
    assert one == pytest.approx(WINDOW_FRAMES * 1.278 + 0.419, abs=0.01)
    split = load_config({"dit": {"sequence_parallel_degree": 4}, "limits": {"max_width": 832, "max_height": 480}})
    quarter = busiest_gpu_gb(split, sessions=1, vae_sessions=0) - busiest_gpu_gb(split, sessions=0, vae_sessions=0)
    assert quarter == pytest.approx(WINDOW_FRAMES * 1.278 / 4 + 0.419, abs=0.01)


# -- per-file intent ---------------------------------------------------------------------------------


def expect_cpu_default(config: ServeConfig, options: dict[str, dict[str, Any]]) -> None:
    assert config.model.device == "cpu"
    # the default must run without a download: the trained world model ships in the package
    assert config.model.path == "embedded:lingbot-world-tiny"
    from lingbot_ray.checkpoint import ensure_checkpoint

    assert (ensure_checkpoint(config.model.path, build_tiny_if_missing=config.model.build_tiny_if_missing) / "model_index.json").is_file()
    for name, o in options.items():
        assert o["ray_actor_options"].get("num_gpus", 0) == 0, name
        assert all(bundle.get("GPU", 0) == 0 for bundle in o.get("placement_group_bundles", [])), name
    assert total(options, replica_gpus) == 0


def expect_real_checkpoint_on_gpus(config: ServeConfig) -> None:
    assert config.model.path in (REAL_MODEL_PATH, HUB_REPO)
    assert not config.model.build_tiny_if_missing, "a missing real checkpoint must fail, not be replaced"
    assert config.model.device == "cuda"
    assert (config.model.dit_dtype, config.model.text_encoder_dtype) == ("bfloat16", "bfloat16")
    assert config.text_encoder.cpu_offload and config.text_encoder.num_gpus == 0
    assert not config.dit.cpu_offload
    assert (config.limits.max_width, config.limits.max_height) == (832, 480), "the memory budget is at 832x480"


def expect_one_gpu(config: ServeConfig, options: dict[str, dict[str, Any]]) -> None:
    expect_real_checkpoint_on_gpus(config)
    dit = options["DiTGroup"]
    assert dit["num_replicas"] == 1 and config.dit.sequence_parallel_degree == 1
    assert "placement_group_bundles" not in dit
    # DiT 0.9 + VAE 0.1: both pinned to the one GPU, nothing else fits on it.
    assert dit["ray_actor_options"]["num_gpus"] == pytest.approx(0.9)
    assert options["VAEDecoder"]["ray_actor_options"]["num_gpus"] == pytest.approx(0.1)
    assert options["TextEncoder"]["ray_actor_options"]["num_gpus"] == 0
    assert total(options, replica_gpus) == pytest.approx(1.0)


def expect_four_gpu_ulysses(config: ServeConfig, options: dict[str, dict[str, Any]]) -> None:
    expect_real_checkpoint_on_gpus(config)
    dit = options["DiTGroup"]
    assert dit["num_replicas"] == 1
    bundles = dit["placement_group_bundles"]
    assert len(bundles) == 4 and all(bundle["GPU"] == 1 for bundle in bundles), bundles
    assert dit["placement_group_strategy"] == "STRICT_PACK"
    # Rank 0 is the replica: it must take exactly bundle 0's GPU, or it would run on no GPU of its own.
    assert dit["ray_actor_options"]["num_gpus"] == bundles[0]["GPU"]
    # Every GPU of the node is a DiT rank's; the VAE rides on cuda:0 unaccounted, the text encoder on the CPU.
    assert options["VAEDecoder"]["ray_actor_options"]["num_gpus"] == 0
    assert options["TextEncoder"]["ray_actor_options"]["num_gpus"] == 0
    assert total(options, replica_gpus) == 4


EXPECTATIONS = {
    "serve_config.yaml": expect_cpu_default,
    "lingbot-world-fast-1gpu.yaml": expect_one_gpu,
    "lingbot-world-fast-4gpu-ulysses4.yaml": expect_four_gpu_ulysses,
    "kuberay-rayservice.yaml": expect_four_gpu_ulysses,
}


# -- LingBot World 2.0 (docs/MODEL.md, "LingBot World 2.0") -----------------------------------------

V2_14B_PATH = "/models/lingbot-world-v2-14b-causal-fast-diffusers"
V2_1P3B_PATH = "/models/lingbot-world-v2-1.3b-causal-fast"
# each v2 14B file and the v1 file whose application it is (same architecture, sizes and KV window)
V2_14B_FILES = {
    "lingbot-world-v2-14b-1gpu.yaml": "lingbot-world-fast-1gpu.yaml",
    "lingbot-world-v2-14b-4gpu-ulysses4.yaml": "lingbot-world-fast-4gpu-ulysses4.yaml",
}
V2_FILES = (*V2_14B_FILES, "lingbot-world-v2-1.3b-1gpu.yaml")


def expect_as_v1(v1_expectation):
    """A v2 14B file: its checkpoint, then everything the v1 file it mirrors promises."""

    def expect(config: ServeConfig, options: dict[str, dict[str, Any]]) -> None:
        import msgspec

        assert config.model.path == V2_14B_PATH
        assert config.model.checkpoint_settings == {"model_version": "v2-14b"}  # its files are v1's
        as_v1 = msgspec.structs.replace(
            config, model=msgspec.structs.replace(config.model, path=REAL_MODEL_PATH, checkpoint_settings={})
        )
        v1_expectation(as_v1, options)

    return expect


def expect_v2_1p3b_one_gpu(config: ServeConfig, options: dict[str, dict[str, Any]]) -> None:
    assert config.model.path == V2_1P3B_PATH
    assert not config.model.build_tiny_if_missing, "a missing real checkpoint must fail, not be replaced"
    assert config.model.device == "cuda"
    assert (config.model.dit_dtype, config.model.text_encoder_dtype) == ("bfloat16", "bfloat16")
    assert not config.dit.cpu_offload
    assert (config.limits.max_width, config.limits.max_height) == (832, 480), "the memory budget is at 832x480"
    dit = options["DiTGroup"]
    assert dit["num_replicas"] == 1 and config.dit.sequence_parallel_degree == 1
    assert "placement_group_bundles" not in dit
    # DiT 0.8 + VAE 0.1 + text encoder 0.1: all three pinned to the one GPU, which the budget fits
    assert dit["ray_actor_options"]["num_gpus"] == pytest.approx(0.8)
    assert options["VAEDecoder"]["ray_actor_options"]["num_gpus"] == pytest.approx(0.1)
    assert not config.text_encoder.cpu_offload
    assert options["TextEncoder"]["ray_actor_options"]["num_gpus"] == pytest.approx(0.1)
    assert total(options, replica_gpus) == pytest.approx(1.0)


EXPECTATIONS.update(
    {
        "lingbot-world-v2-14b-1gpu.yaml": expect_as_v1(expect_one_gpu),
        "lingbot-world-v2-14b-4gpu-ulysses4.yaml": expect_as_v1(expect_four_gpu_ulysses),
        "lingbot-world-v2-1.3b-1gpu.yaml": expect_v2_1p3b_one_gpu,
    }
)
GPU_FILES = [path for path in CONFIG_FILES if EXPECTATIONS.get(path.name) is not expect_cpu_default]


@pytest.mark.parametrize("name", sorted(V2_14B_FILES))
def test_a_v2_14b_application_is_its_v1_files_but_for_the_checkpoint(name):
    """v2 14B is v1's architecture at v1's sizes: when a v1 file changes, its v2 copy must follow."""
    configs = ROOT / "lingbot_ray" / "configs"
    v2, v1 = copy.deepcopy(the_application(configs / name)), copy.deepcopy(the_application(configs / V2_14B_FILES[name]))
    assert (v2["args"]["model"].pop("path"), v1["args"]["model"].pop("path")) == (V2_14B_PATH, REAL_MODEL_PATH)
    assert v2["args"]["model"].pop("checkpoint_settings") == {"model_version": "v2-14b"}
    assert v2 == v1

    def arithmetic(path: Path) -> str:
        """The comment from the memory (or placement) arithmetic on, the other configs named as v2's."""
        head = path.read_text().split("\nproxy_location:")[0]
        start = min(head.index(marker) for marker in ("# GPU memory at", "# Placement.") if marker in head)
        return head[start:].replace("lingbot-world-fast-", "lingbot-world-v2-14b-")

    assert arithmetic(configs / name) == arithmetic(configs / V2_14B_FILES[name])


def test_the_1p3b_arithmetic_reproduces_its_config_comment():
    config = config_of(ROOT / "lingbot_ray" / "configs" / "lingbot-world-v2-1.3b-1gpu.yaml")
    one = busiest_gpu_gb(config, 1, 0, model=V2_1P3B) - busiest_gpu_gb(config, 0, 0, model=V2_1P3B)
    assert one == pytest.approx(18 * 0.2875 + 0.094, abs=0.005)  # KV 0.288 GB per latent frame, text K/V
    assert busiest_gpu_gb(config, 0, 0, model=V2_1P3B) == pytest.approx(28.1, abs=0.05)
    assert busiest_gpu_gb(config, model=V2_1P3B) == pytest.approx(82.4, abs=0.05)
    assert busiest_gpu_gb(config, 7, 7, model=V2_1P3B) == pytest.approx(91.4, abs=0.05)


def test_every_config_file_has_an_expectation():
    assert sorted(path.name for path in CONFIG_FILES) == sorted(EXPECTATIONS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_serve_accepts_the_file(path):
    from ray.serve.schema import ServeDeploySchema

    document = serve_document(path)
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(document)
    assert the_application(path)["import_path"] == IMPORT_PATH


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_resources_match_the_files_intent(path):
    config = config_of(path)
    EXPECTATIONS[path.name](config, deployment_options(config))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_ray_serve_accepts_every_deployments_options(path):
    from ray import serve

    class Stub:
        pass

    # Serve checks, among others, that the replica's resources fit in bundle 0 of its placement group.
    for name, options in deployment_options(config_of(path)).items():
        serve.deployment(Stub, name=name, **options)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_capacities_are_consistent(path):
    config = config_of(path)
    dit_capacity = config.dit.num_groups * config.dit.sessions_per_group
    # Every DiT session needs a VAE decode slot, and the ingress must let that many sockets in.
    assert config.vae.num_replicas * config.vae.sessions_per_replica >= dit_capacity
    assert config.ingress.num_replicas * config.ingress.max_sessions >= dit_capacity
    # Ulysses gives every rank whole attention heads.
    assert MODEL_OF_FILE.get(path.name, FOURTEEN_B).num_heads % config.dit.sequence_parallel_degree == 0


@pytest.mark.parametrize("path", GPU_FILES, ids=lambda p: p.name)
def test_sessions_per_group_is_the_most_that_fits_in_gpu_memory(path):
    config = config_of(path)
    model = MODEL_OF_FILE.get(path.name, FOURTEEN_B)
    sessions, vae_sessions = config.dit.sessions_per_group, config.vae.sessions_per_replica
    assert busiest_gpu_gb(config, model=model) <= GPU_GB, busiest_gpu_gb(config, model=model)
    assert busiest_gpu_gb(config, sessions + 1, vae_sessions + 1, model=model) > GPU_GB


def test_the_engines_memory_plan_agrees_with_the_configs_arithmetic():
    """lingbot_ray/engine/memory.py computes what the comments add up, from the model's configs; and
    every GPU config places the text encoder where the budget allows: on the busiest GPU only if it
    fits there beside everything the file puts there, else on the CPU (the rule the engine applies,
    with one session, in RealtimeEngine.from_pretrained)."""
    import msgspec
    import torch

    from lingbot_ray.engine.memory import GB, ModelMemory
    from tests.engine.test_memory import V1_TRANSFORMER, V1_VAE

    v1 = ModelMemory.from_configs(V1_TRANSFORMER, V1_VAE, torch.bfloat16)
    session = v1.session(832, 480)
    # the DiT's GPU alone: the VAE on a GPU of its own, the text encoder on the CPU
    alone = {"vae": {"num_gpus": 1}, "text_encoder": {"cpu_offload": True, "num_gpus": 0}}
    config = load_config({**alone, "limits": {"max_width": 832, "max_height": 480}})
    empty = busiest_gpu_gb(config, sessions=0, vae_sessions=0)
    per_session = busiest_gpu_gb(config, sessions=1, vae_sessions=0) - empty
    assert per_session == pytest.approx((session.kv + session.text_kv) / GB, abs=1e-6)
    camera = empty - DIT_WEIGHTS_GB - DIT_WORKSPACE_GB
    assert camera == pytest.approx(session.camera / GB, abs=1e-6)
    assert session.dit_activations / GB < DIT_WORKSPACE_GB
    assert session.vae_cache / GB == pytest.approx(VAE_SESSION_GB_AT_832x480, abs=0.005)
    assert session.vae_decode / GB == pytest.approx(VAE_DECODE_GB_AT_832x480, abs=0.005)
    for path in GPU_FILES:
        config, model = config_of(path), MODEL_OF_FILE.get(path.name, FOURTEEN_B)
        on_gpu = msgspec.structs.replace(config, text_encoder=msgspec.structs.replace(config.text_encoder, cpu_offload=False))
        fits = busiest_gpu_gb(on_gpu, model=model) <= GPU_GB
        assert config.text_encoder.cpu_offload == (not fits), (path.name, busiest_gpu_gb(on_gpu, model=model))


def test_the_memory_budget_covers_every_gpu_config():
    assert {path.name for path in GPU_FILES} == {
        "lingbot-world-fast-1gpu.yaml",
        "lingbot-world-fast-4gpu-ulysses4.yaml",
        "kuberay-rayservice.yaml",
        *V2_FILES,
    }


# -- the RayService ----------------------------------------------------------------------------------


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayservice_carries_the_four_gpu_application_unchanged():
    # the same application; only where the checkpoint comes from differs (the RayService: the hub)
    service, four_gpu = copy.deepcopy(the_application(RAYSERVICE)), copy.deepcopy(the_application(FOUR_GPU))
    for app in (service, four_gpu):
        app["args"]["model"].pop("path")
    assert service == four_gpu


def test_rayservice_cluster_fits_the_application():
    service = load_yaml(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    options = deployment_options(config_of(RAYSERVICE))

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "dashboard-host" in head["rayStartParams"]
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1
    (group,) = gpu_groups
    (worker,) = group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    pod_gpus = int(limits["nvidia.com/gpu"])
    # STRICT_PACK puts a whole DiT group on one node: one pod must hold all of its bundles.
    assert pod_gpus >= replica_gpus(options["DiTGroup"])
    assert group["replicas"] * pod_gpus >= total(options, replica_gpus)
    # The head offers no logical CPUs, so every replica's CPUs come from the worker pods.
    assert group["replicas"] * cpu_quantity(limits["cpu"]) >= total(options, replica_cpus)

    # Where the model comes from (head: nothing; workers: the hub cache or a mount): tests/serve/test_kuberay.py

    # The API key reaches the ingress (on the worker) through the environment variable it reads.
    env = {e["name"] for e in worker.get("env", [])}
    assert config_of(RAYSERVICE).ingress.api_key_env in env

    ray_version = cluster["rayVersion"]
    for container in (head_container, worker):
        assert f"ray{ray_version}" in container["image"] or f"ray:{ray_version}" in container["image"], container["image"]


# -- typos fail loudly -------------------------------------------------------------------------------


def test_misspelled_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="num_group"):
        load_config({"dit": {"num_group": 2}})


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_misspelled_key_in_a_real_file_is_rejected_by_name(path):
    args = copy.deepcopy(the_application(path)["args"])
    args["dit"]["sequence_parallel_degre"] = args["dit"].pop("sequence_parallel_degree")
    with pytest.raises(ValueError, match="sequence_parallel_degre.*dit|dit.*sequence_parallel_degre"):
        load_config(args)


def test_serve_build_writes_the_default_application_and_build_app_needs_no_args(tmp_path):
    """A pip user has no config file: the builder's defaults serve the embedded model, and
    ``serve build`` works on the documented import path (post-processing, with no weights anywhere,
    is not deployed)."""
    import subprocess

    from lingbot_ray.serve.app import build_app
    from lingbot_ray.serve.config import load_config

    assert load_config({}).model.path == "embedded:lingbot-world-tiny"
    assert build_app({}) is not None
    out = tmp_path / "built.yaml"
    done = subprocess.run(
        ["serve", "build", "lingbot_ray.serve.app:app", "-o", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["import_path"] == "lingbot_ray.serve.app:app"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "TextEncoder", "DiTGroup", "VAEDecoder"}


def test_a_placement_group_override_that_disagrees_with_the_sequence_parallel_degree_is_named(monkeypatch):
    """Serve lets a serve config override any deployment option; the DiT group's placement group is
    computed from dit.sequence_parallel_degree, so an override with too few bundles fails with both."""
    import ray.util

    from lingbot_ray.serve.dit_group import RankGroup

    class OneBundle:
        bundle_count = 1

    monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: OneBundle())
    config = load_config({"dit": {"sequence_parallel_degree": 2}, "model": {"torch_threads": 1}})
    with pytest.raises(ValueError, match=r"sequence_parallel_degree=2: .* has 1 bundle\(s\)"):
        RankGroup(config, run_local=None)
