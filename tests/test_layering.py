"""The layout is the architecture: light layers must stay light, and the engine never imports ray."""

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


def test_protocol_and_transport_import_neither_torch_nor_ray():
    _assert_import_leaves_out(["lingbot_ray.protocol", "lingbot_ray.transport"], ("torch", "ray"))


@pytest.mark.parametrize("layer", ["protocol", "transport", "control", "engine", "models"])
def test_lower_layers_never_import_ray_or_serve(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        imported = _imported_modules(path)
        assert "ray" not in imported, f"{path} imports ray"
        source = path.read_text()
        assert "lingbot_ray.serve" not in source and "from ..serve" not in source, f"{path} imports serve"


@pytest.mark.parametrize("layer", ["protocol", "transport"])
def test_wire_layers_have_no_tensor_libraries(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        assert not {"torch", "ray", "diffusers", "transformers"} & _imported_modules(path), path


def test_client_tools_import_neither_torch_nor_ray():
    """bench, record and check run wherever the server can be reached: no model stack needed."""
    modules = ["lingbot_ray.client.bench", "lingbot_ray.client.record", "lingbot_ray.client.consistency"]
    _assert_import_leaves_out(modules, ("torch", "ray", "diffusers"))
