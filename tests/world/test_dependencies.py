"""lingbot_ray.world is training tooling beside the product: it leans on the product, never on the
client tools, the tests or the random test checkpoint, and it imports without its [train] extra."""

import ast
import pathlib
import subprocess
import sys

import lingbot_ray

WORLD = pathlib.Path(lingbot_ray.__file__).parent / "world"
# modules world must not import: client internals, the random test checkpoint, test code
FORBIDDEN = ("lingbot_ray.client", "lingbot_ray.models.tiny", "tests")


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = f"lingbot_ray.world.{path.stem}".split(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_world_imports_no_client_tests_or_test_checkpoint():
    for path in sorted(WORLD.glob("*.py")):
        bad = sorted(n for n in _imports(path) if n in FORBIDDEN or n.startswith(tuple(f"{f}." for f in FORBIDDEN)))
        assert not bad, f"{path.name} imports {bad}"


def test_world_imports_without_the_train_extra():
    # the training scripts import diffusers, which brings tqdm of its own; the rest must not need it
    modules = [f"lingbot_ray.world.{name}" for name in ("dataset", "progress", "quality", "render", "scene", "textures")]
    code = (
        "import sys; sys.modules['tqdm'] = None\n"  # as if not installed: importing it raises ImportError
        f"import importlib; [importlib.import_module(m) for m in {modules!r}]\n"
        "from lingbot_ray.world.progress import progress_bar\n"
        "try:\n    progress_bar(desc='x', enabled=False)\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'lingbot_ray[train]'" in result.stdout
