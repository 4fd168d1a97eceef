"""The README is a front page that works: its Python example runs as written (on a tiny checkpoint,
CPU, its default size), its set-up commands are the ones CI runs, it stays short, every relative
link of the docs leads somewhere, and no file carries work-log references."""

import pathlib
import re
import subprocess

import pytest

from lingbot_ray.models.tiny import build_tiny_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
# The two set-up commands a newcomer runs on a fresh machine; .ci/run runs the second one's steps.
MAIN_JOB = "pip install torch==2.13.0 && pip install -e . && serve run serve_config.yaml"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    folder = build_tiny_checkpoint(tmp_path / "tiny")
    code = (
        block.replace('"/models/lingbot-world-fast-diffusers"', repr(str(folder)))
        .replace('device="cuda"', 'device="cpu"')
        .replace("(480, 832, 3)", "(96, 160, 3)")
        .replace("width=832, height=480", "width=160, height=96")
    )
    assert code != block
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert [c.shape for c in namespace["chunks"]] == [(9, 96, 160, 3), (12, 96, 160, 3)]


def test_readme_is_a_front_page_of_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_setup_commands_are_the_ones_ci_runs():
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)]
    assert MAIN_JOB in blocks and TEST_COMMAND in blocks, "the two set-up command blocks must stay as they are"
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ("pip install -q torch==2.13.0", 'pip install -q -e ".[test]"', "-m pytest -q"):
        assert step in ci, f".ci/run no longer runs the README's test command step {step!r}"


# ---------------------------------------------------------------------------------------------
# Links


def _docs() -> list[pathlib.Path]:
    card = ROOT / "lingbot_ray" / "checkpoints" / "lingbot-world-tiny" / "README.md"
    return [README, card, *sorted((ROOT / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code spans blanked (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "``", text)


def _headings_source(path: pathlib.Path) -> str:
    """Headings keep their code spans' text (`init` is a heading's whole name)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def _anchor_set(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", _headings_source(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_every_relative_link_in_the_docs_points_to_a_file_that_exists():
    broken = []
    for doc in _docs():
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(doc.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(ROOT)} → {target}"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor.lower() not in _anchor_set(resolved):
                broken.append(f"{where}: no heading with that anchor")
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------------------------------------
# Work logs

TEXT_SUFFIXES = (".md", ".py", ".js", ".yaml", ".json", ".toml", ".ipynb", ".html", ".css")
# The word "session" followed by a number: a numbered work session of whoever wrote the file (examples
# in test_the_work_log_pattern_tells_logs_from_code). Not matched: the CLI's --sessions flag, identifiers
# such as session_1, "session {n}" templates, and counts followed by a figure.
WORK_LOG = re.compile(r"(?<![-\w])(?<!\d )sessions?[ -]\d+\b(?![.,]\d)", re.I)
# (path, text of the matching line) pairs that legitimately number sessions in prose; none so far.
ALLOWED: set[tuple[str, str]] = set()


def _repository_text_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in listed if name.endswith(TEXT_SUFFIXES) and (ROOT / name).is_file()]


def test_no_file_carries_work_log_references():
    found = []
    for name in _repository_text_files():
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if WORK_LOG.search(line) and (name, line.strip()) not in ALLOWED:
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "work-log references (say what was done or measured, not when):\n" + "\n".join(found)


def test_the_work_log_pattern_tells_logs_from_code():
    # built from parts, so that this file itself carries no work-log reference
    logs = [f"measured in session {16}", f"Session-{12}'s checkpoint", f"(sessions {11} and {12})", f"session {3} showed"]
    code = ["lingbot-ray bench --sessions 2", "test_session_1", 'f"session {n}"', "sessions_per_group: 3", f"1 session {37.5} fps"]
    assert all(WORK_LOG.search(text) for text in logs)
    assert not any(WORK_LOG.search(text) for text in code)
