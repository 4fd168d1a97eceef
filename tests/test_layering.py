"""The layout is the architecture: light layers must stay light, the engine never imports ray, and
the serving layer reaches models only through the engine.

    protocol, transport, control, checkpoint  ← no torch, no ray
    engine (stages, hosts, chain)             ← no ray; its messages and chain need no torch
    serve (deployments, ingress, router)      ← models only through engine; the ingress loads no model stack
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lingbot_ray"


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _assert_import_leaves_out(modules: list[str], banned: tuple[str, ...]) -> None:
    """Importing ``modules`` in a fresh interpreter loads none of ``banned``."""
    code = f"import sys, {', '.join(modules)}; bad = [m for m in {banned!r} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


MODEL_STACK = ("torch", "diffusers", "transformers")


def test_light_layers_import_neither_the_model_stack_nor_ray():
    light = ["lingbot_ray.protocol", "lingbot_ray.transport", "lingbot_ray.control", "lingbot_ray.checkpoint"]
    _assert_import_leaves_out(light, MODEL_STACK + ("ray",))


def test_the_ingress_and_the_chain_load_no_model_stack():
    """The ingress replica imports these (and what they import) and nothing else of ours."""
    modules = ["lingbot_ray.serve.ingress", "lingbot_ray.serve.session", "lingbot_ray.serve.backend", "lingbot_ray.engine.chain"]
    _assert_import_leaves_out(modules, MODEL_STACK)


def test_checking_a_serve_config_loads_no_model_stack():
    """The ingress parses the whole config: the names of the speed settings must not pull torch in."""
    code = (
        "import sys; from lingbot_ray.serve.config import load_config; "
        "load_config({'dit': {'fp8': 'rowwise', 'compile': 'default'}, 'vae': {'decoder': 'tiny'}}); "
        f"bad = [m for m in {MODEL_STACK!r} if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


@pytest.mark.parametrize("layer", ["protocol", "transport", "control", "engine", "models"])
def test_lower_layers_never_import_ray_or_serve(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        imported = _imported_modules(path)
        assert "ray" not in imported, f"{path} imports ray"
        source = path.read_text()
        assert "lingbot_ray.serve" not in source and "from ..serve" not in source, f"{path} imports serve"


@pytest.mark.parametrize("layer", ["protocol", "transport", "control"])
def test_light_layers_have_no_tensor_libraries(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        assert not {"torch", "ray", "diffusers", "transformers"} & _imported_modules(path), path


def test_serve_reaches_models_only_through_the_engine():
    for path in (PACKAGE / "serve").rglob("*.py"):
        source = path.read_text()
        assert "lingbot_ray.models" not in source and "from ..models" not in source, f"{path} imports models"
        assert not {"diffusers", "transformers"} & _imported_modules(path), path


def test_client_tools_import_neither_torch_nor_ray():
    """bench, record and check run wherever the server can be reached: no model stack needed."""
    modules = ["lingbot_ray.client.bench", "lingbot_ray.client.record", "lingbot_ray.client.consistency"]
    _assert_import_leaves_out(modules, ("torch", "ray", "diffusers"))
