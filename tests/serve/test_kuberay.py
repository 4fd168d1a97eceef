"""The KubeRay manifests: every ``lingbot_ray/configs/kuberay*.yaml`` RayService.

Pure Python, no cluster. Each manifest must

- validate against ``tests/serve/crds/ray.io_rayservices.v1.schema.json``: a hand-written subset of the
  RayService v1 CRD schema of KubeRay v1.4.2 (``ray-operator/config/crd/bases/ray.io_rayservices.yaml``;
  the file names its source), strict about unknown fields, as ``kubectl apply`` is by default;
- carry a ``serveConfigV2`` that Ray Serve's own schema accepts (with no key Serve would silently
  ignore), whose ``args`` load with :func:`load_config` and whose ``deployments:`` entries name
  deployments the application builds;
- become Ready on KubeRay: KubeRay gives RayService worker pods a readiness probe that also checks the
  Serve proxy's ``/-/healthz`` on the ``serve`` port, so every worker needs a proxy
  (``proxy_location: EveryNode``); the head, which runs no replica, is kept out of the serve Service
  (``excludeHeadPodFromServeSvc``);
- put GPU work on GPU nodes only (a node selection and a toleration of the ``nvidia.com/gpu`` taint),
  keep the head CPU-only and free of any model storage, and reach the model on the workers;
- name the installed Ray's major.minor in ``rayVersion`` and in the image tags.

The policy checks return lists of problems, so the negative tests below can show each one fails.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from lingbot_ray.serve.config import ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = Path(__file__).parent / "crds" / "ray.io_rayservices.v1.schema.json"
MANIFESTS = sorted((ROOT / "lingbot_ray" / "configs").glob("kuberay*.yaml"))
IMPORT_PATH = "lingbot_ray.serve.app:build_app"
# What build_app can bind (lingbot_ray/serve/app.py); PostProcess only when postprocess has weights.
BUILT_DEPLOYMENTS = {"TextEncoder", "DiTGroup", "VAEDecoder", "PostProcess", "Ingress"}
GPU = "nvidia.com/gpu"
SERVE_PORT_NAME = "serve"  # KubeRay's readiness probe finds the proxy's port by this name
DEFAULT_SERVE_PORT = 8000
# model.path naming a hub repo: hf://ORG/NAME, or a bare ORG/NAME (lingbot_ray/hub.py has the full rule)
HUB_REPO_ID = re.compile(r"(hf://)?[A-Za-z0-9_][\w.-]*/[\w.-]*[A-Za-z0-9_]")


# -- reading ---------------------------------------------------------------------------------------


def load_manifest(path: Path) -> dict[str, Any]:
    with open(path) as f:
        document = yaml.safe_load(f)
    assert isinstance(document, dict) and document.get("kind") == "RayService", f"{path.name}: not a RayService"
    return document


@cache
def crd_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Every place the document breaks the vendored CRD schema, as ``spec.a.b: message``."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(crd_schema())
    return sorted(
        ".".join(str(p) for p in error.absolute_path) + ": " + error.message for error in validator.iter_errors(document)
    )


def serve_config(document: dict[str, Any]) -> dict[str, Any]:
    text = document["spec"]["serveConfigV2"]
    assert isinstance(text, str), "spec.serveConfigV2 must be a YAML string"
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict), "spec.serveConfigV2 must hold a YAML mapping"
    return parsed


def app_configs(document: dict[str, Any]) -> list[ServeConfig]:
    return [load_config(app.get("args")) for app in serve_config(document)["applications"]]


def cluster(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"]["rayClusterConfig"]


def head_pod(document: dict[str, Any]) -> dict[str, Any]:
    return cluster(document)["headGroupSpec"]["template"]["spec"]


def worker_groups(document: dict[str, Any]) -> list[dict[str, Any]]:
    return cluster(document).get("workerGroupSpecs", [])


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("containers", []) + pod.get("initContainers", [])


def container_gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(kind, {}).get(GPU, 0)) for kind in ("limits", "requests"))


def gpu_groups(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in worker_groups(document) if any(container_gpus(c) for c in g["template"]["spec"]["containers"])]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def is_hub_repo_id(model_path: str) -> bool:
    return HUB_REPO_ID.fullmatch(model_path) is not None


def mounted_volume(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume whose mount in ``container`` holds ``path`` (the deepest mount), or None."""
    best = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (best is None or len(root) > len(best["mountPath"].rstrip("/"))):
            best = mount
    if best is None:
        return None
    return next((v for v in pod.get("volumes", []) if v["name"] == best["name"]), {"name": best["name"]})


# -- the policy checks (each returns its problems) -------------------------------------------------


def serve_config_problems(document: dict[str, Any]) -> list[str]:
    """serveConfigV2 against Ray Serve's schema (plus keys it would silently drop) and the app's own."""
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(mapping: dict[str, Any], model, where: str) -> list[str]:
        known = {field.alias or name for name, field in model.model_fields.items()}
        return [f"{where}: {key!r} is not a {model.__name__} field (Serve would ignore it)" for key in sorted(set(mapping) - known)]

    problems: list[str] = []
    config = serve_config(document)
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:  # pydantic.ValidationError
        return [f"serveConfigV2: {exc}"]
    problems += unknown(config, ServeDeploySchema, "serveConfigV2")
    problems += unknown(config.get("http_options") or {}, HTTPOptionsSchema, "serveConfigV2.http_options")
    for app in config["applications"]:
        where = f"serveConfigV2.applications[{app.get('name')}]"
        problems += unknown(app, ServeApplicationSchema, where)
        if app["import_path"] != IMPORT_PATH:
            problems.append(f"{where}.import_path: {app['import_path']!r}, expected {IMPORT_PATH!r}")
        try:
            app_config = load_config(app.get("args"))
        except ValueError as exc:
            problems.append(f"{where}.args: {exc}")
            continue
        for deployment in app.get("deployments", []):
            name = deployment.get("name")
            problems += unknown(deployment, DeploymentSchema, f"{where}.deployments[{name}]")
            if name not in BUILT_DEPLOYMENTS:
                problems.append(f"{where}.deployments: {name!r} is not a deployment the app builds {sorted(BUILT_DEPLOYMENTS)}")
            elif name == "PostProcess" and not app_config.postprocess.has_weights:
                problems.append(f"{where}.deployments: PostProcess is not built when postprocess names no weights")
            if name == "Ingress" and "user_config" in deployment:
                try:
                    app_config.with_live(deployment["user_config"])
                except ValueError as exc:
                    problems.append(f"{where}.deployments[Ingress].user_config: {exc}")
    return problems


def readiness_problems(document: dict[str, Any]) -> list[str]:
    """Every worker runs a Serve proxy, so KubeRay's injected worker readiness probe can pass."""
    problems = []
    config = serve_config(document)
    if config.get("proxy_location") != "EveryNode":
        problems.append(
            f"proxy_location={config.get('proxy_location')!r}: KubeRay's worker readiness probe checks the Serve proxy "
            "on every worker pod; only EveryNode runs one there (HeadOnly workers stay NotReady)"
        )
    if document["spec"].get("excludeHeadPodFromServeSvc") is not True:
        problems.append("spec.excludeHeadPodFromServeSvc must be true: the head runs no replica and should carry no traffic")
    port = (config.get("http_options") or {}).get("port", DEFAULT_SERVE_PORT)
    for group in worker_groups(document):
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container
        if "readinessProbe" in ray_container:
            problems.append(
                f"worker group {group['groupName']}: an explicit readinessProbe replaces KubeRay's, which checks the "
                "proxy too; these manifests rely on the injected one"
            )
        serve_ports = [p["containerPort"] for p in ray_container.get("ports", []) if p.get("name") == SERVE_PORT_NAME]
        if (serve_ports or [DEFAULT_SERVE_PORT]) != [port]:
            problems.append(
                f"worker group {group['groupName']}: the `serve` port {serve_ports or DEFAULT_SERVE_PORT} is not "
                f"http_options.port {port}: the readiness probe would check the wrong port"
            )
    return problems


def tolerates_gpu_taint(pod: dict[str, Any]) -> bool:
    return any(
        (t.get("key") == GPU or (t.get("operator") == "Exists" and not t.get("key"))) and t.get("effect", "") in ("", "NoSchedule")
        for t in pod.get("tolerations", [])
    )


def selects_nodes(pod: dict[str, Any]) -> bool:
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return bool(pod.get("nodeSelector")) or bool(required.get("nodeSelectorTerms"))


def gpu_placement_problems(document: dict[str, Any]) -> list[str]:
    """GPU pods: chosen GPU nodes and the usual GPU taint tolerated; GPU requests equal limits."""
    problems = []
    for group in gpu_groups(document):
        pod, name = group["template"]["spec"], group["groupName"]
        if not selects_nodes(pod):
            problems.append(f"worker group {name}: asks for GPUs but has no nodeSelector or required nodeAffinity")
        if not tolerates_gpu_taint(pod):
            problems.append(f"worker group {name}: asks for GPUs but tolerates no {GPU}:NoSchedule taint")
        for container in pod_containers(pod):
            resources = container.get("resources", {})
            limit, request = resources.get("limits", {}).get(GPU), resources.get("requests", {}).get(GPU)
            if request is not None and str(request) != str(limit):
                problems.append(f"worker group {name}, container {container['name']}: {GPU} request {request} != limit {limit}")
    if not gpu_groups(document):
        problems.append("no worker group asks for GPUs")
    return problems


def head_problems(document: dict[str, Any]) -> list[str]:
    """The head: no GPUs, no logical CPUs for replicas, and no model storage at all."""
    problems = []
    params = cluster(document)["headGroupSpec"].get("rayStartParams", {})
    for key in ("num-cpus", "num-gpus"):
        if params.get(key) != "0":
            problems.append(f"head rayStartParams.{key}={params.get(key)!r}: must be \"0\" so no replica lands on the head")
    pod = head_pod(document)
    for container in pod_containers(pod):
        if container_gpus(container):
            problems.append(f"head container {container['name']}: requests {GPU}")
        for config in app_configs(document):
            if config.model.path.startswith("/") and mounted_volume(pod, container, config.model.path):
                problems.append(f"head container {container['name']}: mounts model.path {config.model.path}")
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume or "hostPath" in volume:
            problems.append(f"head volume {volume['name']}: model storage on the head (the build task must not need it)")
    return problems


def model_access_problems(document: dict[str, Any]) -> list[str]:
    """Each GPU worker reaches model.path: a hub repo id through a node-local HF_HUB_CACHE, or a mounted folder."""
    problems = []
    for config in app_configs(document):
        model_path = config.model.path
        for group in gpu_groups(document):
            pod, name = group["template"]["spec"], group["groupName"]
            ray_container = pod["containers"][0]
            env = env_of(ray_container)
            if is_hub_repo_id(model_path):
                cache_dir = env.get("HF_HUB_CACHE", {}).get("value")
                volume = mounted_volume(pod, ray_container, cache_dir) if cache_dir else None
                if volume is None or not ({"hostPath", "emptyDir"} & set(volume)):
                    problems.append(
                        f"worker group {name}: model.path {model_path!r} is a hub repo; HF_HUB_CACHE={cache_dir!r} "
                        "must be on a node-local volume (hostPath or emptyDir)"
                    )
                if env.get("HF_HUB_OFFLINE", {}).get("value", "0") not in ("", "0"):
                    problems.append(f"worker group {name}: HF_HUB_OFFLINE is set, but model.path {model_path!r} must be downloaded")
                token = env.get("HF_TOKEN")
                if token is not None and not token.get("valueFrom", {}).get("secretKeyRef", {}).get("optional"):
                    problems.append(f"worker group {name}: HF_TOKEN must come from a Secret with optional: true")
            elif model_path.startswith("/") and mounted_volume(pod, ray_container, model_path) is None:
                problems.append(f"worker group {name}: nothing is mounted at model.path {model_path}")
            api_key_env = config.ingress.api_key_env
            if api_key_env and "secretKeyRef" not in env.get(api_key_env, {}).get("valueFrom", {}):
                problems.append(f"worker group {name}: {api_key_env} (the ingress's API key) does not come from a Secret")
    return problems


def ray_version_problems(document: dict[str, Any]) -> list[str]:
    """rayVersion and every Ray image tag name the installed Ray's major.minor (and each other)."""
    import ray

    problems = []
    ray_version = str(cluster(document).get("rayVersion", ""))
    installed = ".".join(ray.__version__.split(".")[:2])
    if ".".join(ray_version.split(".")[:2]) != installed:
        problems.append(f"rayVersion {ray_version!r} is not the installed Ray {ray.__version__} (major.minor {installed})")
    pods = [("head", head_pod(document))] + [(g["groupName"], g["template"]["spec"]) for g in worker_groups(document)]
    for where, pod in pods:
        for index, container in enumerate(pod_containers(pod)):
            repository, _, tag = container.get("image", "").rpartition(":")
            found = re.search(r"ray-?(\d+\.\d+(?:\.\d+)?)", tag)
            if found is None and "ray" in repository.rpartition("/")[2]:  # rayproject/ray:2.60.0-py311-gpu
                found = re.fullmatch(r"(\d+\.\d+\.\d+)(?:-.*)?", tag)
            if found is None:
                if index == 0:  # KubeRay's Ray container must say which Ray it holds
                    problems.append(f"{where} container {container['name']}: image tag {tag!r} names no Ray version")
            elif found.group(1) != ray_version:
                problems.append(f"{where} container {container['name']}: image tag {tag!r} is Ray {found.group(1)}, rayVersion {ray_version!r}")
    return problems


def cluster_problems(document: dict[str, Any]) -> list[str]:
    """What the CRD's types cannot say: replica bounds, and no field KubeRay no longer reads."""
    problems = []
    for group in worker_groups(document):
        low, high = group["minReplicas"], group["maxReplicas"]
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"worker group {group['groupName']}: replicas {group.get('replicas')} outside [{low}, {high}]")
    for field in ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"):
        if field in document["spec"]:
            problems.append(f"spec.{field}: deprecated, KubeRay ignores it (kuberay#1685)")
    return problems


POLICIES = [serve_config_problems, readiness_problems, gpu_placement_problems, head_problems, model_access_problems, ray_version_problems, cluster_problems]


# -- the manifests ---------------------------------------------------------------------------------


def test_there_are_manifests_and_the_schema_names_its_source():
    from jsonschema import Draft202012Validator

    assert MANIFESTS, "no lingbot_ray/configs/kuberay*.yaml"
    schema = crd_schema()
    Draft202012Validator.check_schema(schema)
    source = schema["x-source"]
    assert source["path"] == "ray-operator/config/crd/bases/ray.io_rayservices.yaml"
    assert source["repository"] == "https://github.com/ray-project/kuberay" and source["version"] == "v1"
    assert source["hand_written_subset"] is True and "hand-written" in schema["description"].lower()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_vendored_crd_schema(path):
    assert schema_errors(load_manifest(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("policy", POLICIES, ids=lambda f: f.__name__.removesuffix("_problems"))
def test_manifest_follows_the_policy(path, policy):
    assert policy(load_manifest(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_v2_is_a_string_serve_and_load_config_accept(path):
    from ray.serve.schema import ServeDeploySchema

    document = load_manifest(path)
    assert isinstance(document["spec"]["serveConfigV2"], str)
    ServeDeploySchema.model_validate(serve_config(document))
    assert all(isinstance(config, ServeConfig) for config in app_configs(document))


# -- negative: each check can fail -----------------------------------------------------------------


def the_manifest() -> dict[str, Any]:
    return load_manifest(ROOT / "lingbot_ray" / "configs" / "kuberay-rayservice.yaml")


def first_gpu_pod(document: dict[str, Any]) -> dict[str, Any]:
    return gpu_groups(document)[0]["template"]["spec"]


def rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def set_serve(document: dict[str, Any], change) -> None:
    config = serve_config(document)
    change(config)
    document["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)


SCHEMA_BREAKS = {
    "misspelled spec field": (lambda d: rename(d["spec"], "excludeHeadPodFromServeSvc", "excludeHeadPodFromServeSvcs"), "excludeHeadPodFromServeSvcs"),
    "misspelled cluster field": (lambda d: rename(cluster(d), "rayVersion", "rayversion"), "rayversion"),
    "misspelled worker group field": (lambda d: rename(worker_groups(d)[0], "minReplicas", "minReplica"), "minReplica"),
    "misspelled container field": (lambda d: rename(first_gpu_pod(d)["containers"][0], "resources", "resource"), "resource"),
    "misspelled pod field": (lambda d: rename(first_gpu_pod(d), "tolerations", "toleration"), "toleration"),
    "number in rayStartParams": (lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus: 0 is not of type 'string'"),
    "string replicas": (lambda d: worker_groups(d)[0].update(replicas="1"), "replicas: '1' is not of type 'integer'"),
    "float cpu quantity": (lambda d: first_gpu_pod(d)["containers"][0]["resources"]["limits"].update(cpu=0.5), "limits.cpu"),
    "serveConfigV2 as a mapping": (lambda d: d["spec"].update(serveConfigV2=serve_config(d)), "serveConfigV2"),
    "no headGroupSpec": (lambda d: cluster(d).pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    "unknown upgrade type": (lambda d: d["spec"]["upgradeStrategy"].update(type="Rolling"), "upgradeStrategy.type"),
    "two sources in one volume": (lambda d: first_gpu_pod(d)["volumes"][0].update(emptyDir={}), "volumes.0"),
    "env value and valueFrom": (lambda d: first_gpu_pod(d)["containers"][0]["env"][0].update(value="x"), "env.0"),
    "name not a DNS-1035 label": (lambda d: d["metadata"].update(name="LingBot_World"), "metadata.name"),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS, ids=str)
def test_a_broken_manifest_fails_the_crd_schema(case):
    document = the_manifest()
    change, expected = SCHEMA_BREAKS[case]
    change(document)
    errors = schema_errors(document)
    assert any(expected in error for error in errors), errors


POLICY_BREAKS = {
    "HeadOnly proxies": (readiness_problems, lambda d: set_serve(d, lambda c: c.update(proxy_location="HeadOnly")), "only EveryNode"),
    "head in the serve Service": (readiness_problems, lambda d: d["spec"].pop("excludeHeadPodFromServeSvc"), "excludeHeadPodFromServeSvc"),
    "explicit worker probe": (readiness_problems, lambda d: first_gpu_pod(d)["containers"][0].update(readinessProbe={"tcpSocket": {"port": 8000}}), "readinessProbe"),
    "proxy on another port": (readiness_problems, lambda d: set_serve(d, lambda c: c.setdefault("http_options", {}).update(port=9000)), "http_options.port 9000"),
    "GPU group without selection": (gpu_placement_problems, lambda d: [first_gpu_pod(d).pop(k, None) for k in ("nodeSelector", "affinity")], "no nodeSelector"),
    "GPU group without toleration": (gpu_placement_problems, lambda d: first_gpu_pod(d).pop("tolerations"), "tolerates no"),
    "GPU request differs from limit": (gpu_placement_problems, lambda d: first_gpu_pod(d)["containers"][0]["resources"]["requests"].update({GPU: 2}), "request 2"),
    "GPUs on the head": (head_problems, lambda d: head_pod(d)["containers"][0]["resources"]["limits"].update({GPU: 1}), "requests nvidia.com/gpu"),
    "head offers CPUs": (head_problems, lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    "model volume on the head": (
        head_problems,
        lambda d: head_pod(d).update(volumes=[{"name": "model", "persistentVolumeClaim": {"claimName": "lingbot-world-fast-diffusers"}}]),
        "model storage on the head",
    ),
    "hub model offline": (model_access_problems, lambda d: first_gpu_pod(d)["containers"][0]["env"].append({"name": "HF_HUB_OFFLINE", "value": "1"}), "HF_HUB_OFFLINE"),
    "hub cache in the container": (model_access_problems, lambda d: first_gpu_pod(d)["containers"][0]["volumeMounts"].pop(0), "node-local volume"),
    "unmounted model folder": (
        model_access_problems,
        lambda d: set_serve(d, lambda c: c["applications"][0]["args"]["model"].update(path="/models/lingbot-world-fast-diffusers")),
        "nothing is mounted at model.path",
    ),
    "rayVersion of another Ray": (ray_version_problems, lambda d: cluster(d).update(rayVersion="2.9.3"), "not the installed Ray"),
    "image of another Ray": (ray_version_problems, lambda d: head_pod(d)["containers"][0].update(image="rayproject/ray:2.59.0-py311-gpu"), "is Ray 2.59.0"),
    "misspelled Serve key": (serve_config_problems, lambda d: set_serve(d, lambda c: rename(c, "proxy_location", "proxy_locaton")), "'proxy_locaton' is not a ServeDeploySchema field"),
    "wrong Serve value": (serve_config_problems, lambda d: set_serve(d, lambda c: c.update(proxy_location="Everynode")), "proxy_location"),
    "misspelled args key": (serve_config_problems, lambda d: set_serve(d, lambda c: rename(c["applications"][0]["args"]["dit"], "num_groups", "num_group")), "num_group"),
    "deployment the app does not build": (
        serve_config_problems,
        lambda d: set_serve(d, lambda c: c["applications"][0].update(deployments=[{"name": "DiT", "num_replicas": 2}])),
        "'DiT' is not a deployment the app builds",
    ),
    "a knob that is not live": (
        serve_config_problems,
        lambda d: set_serve(d, lambda c: c["applications"][0].update(deployments=[{"name": "Ingress", "user_config": {"dit": {"num_groups": 2}}}])),
        "user_config",
    ),
    "replicas above maxReplicas": (cluster_problems, lambda d: worker_groups(d)[0].update(replicas=2), "outside [1, 1]"),
    "deprecated threshold": (cluster_problems, lambda d: d["spec"].update(serviceUnhealthySecondThreshold=900), "deprecated"),
}


@pytest.mark.parametrize("case", POLICY_BREAKS, ids=str)
def test_a_broken_manifest_fails_its_policy(case):
    document = the_manifest()
    policy, change, expected = POLICY_BREAKS[case]
    assert policy(copy.deepcopy(document)) == []
    change(document)
    problems = policy(document)
    assert any(expected in problem for problem in problems), problems
