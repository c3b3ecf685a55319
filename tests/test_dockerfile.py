"""The dashboard's Dockerfile, checked without a Docker engine (this machine has none).

hadolint lints it; every file it COPYs must exist after the pipeline and must not be dropped by .dockerignore;
the versions it installs must be the ones in constraints.txt; its CMD must be the command the browser test runs
(test_dashboard.py), so the container starts what the suite exercises.
"""
import fnmatch
import json
import re
import shlex
import subprocess

from conftest import BIN, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    "[(INSTRUCTION, arguments)], with continuation lines joined and comments dropped."
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in joined.splitlines() if l.strip()]


def copy_sources() -> list[str]:
    out = []
    for op, args in instructions(DOCKERFILE):
        if op == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            out += parts[:-1]
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    "Docker's rule: the last matching line wins; a '!' line re-includes. A folder pattern covers what is below it."
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.rstrip("/").split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
               for p in prefixes):
            result = not negate
    return result


def test_hadolint_is_clean():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ignore_rules():
    patterns = ["models/checkpoints", "data/features/*.npz", "!data/features/mean_spectra.npz", "**/__pycache__"]
    assert ignored("models/checkpoints/last.keras", patterns)
    assert not ignored("models/detector.keras", patterns)
    assert ignored("data/features/train.npz", patterns) and not ignored("data/features/mean_spectra.npz", patterns)
    assert ignored("deepguard/__pycache__", patterns)


def test_copied_files_exist_after_the_pipeline_and_reach_the_build_context(tiny_project):
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    sources = copy_sources()
    assert "models/detector.keras" in sources and "app/" in sources
    for source in sources:
        assert (tiny_project / source).exists(), f"COPY {source}: missing after the pipeline"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_installed_versions_are_the_pinned_ones():
    pins = dict(l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in l and not l.startswith("#"))
    installs = re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE)
    assert {name for name, _ in installs} >= {"torch", "voila"}
    for name, version in installs:
        assert pins.get(name) == version, f"Dockerfile installs {name}=={version}, constraints.txt has {pins.get(name)}"
    assert "-c constraints.txt" in DOCKERFILE


def test_cmd_is_the_command_the_browser_test_runs():
    cmd = dict(instructions(DOCKERFILE))["CMD"]
    argv = json.loads(cmd)
    assert argv[:3] == ["voila", "app/dashboard.ipynb", "--Voila.config_file_paths=app"]
    browser_test = (ROOT / "tests" / "test_dashboard.py").read_text()
    assert '"app/dashboard.ipynb", "--Voila.config_file_paths=app"' in browser_test
    assert "--Voila.ip=0.0.0.0" in argv and "--port=8866" in argv
    assert "8866/voila/static/voila.js" in DOCKERFILE   # the HEALTHCHECK; test_dashboard fetches the same file
    assert "EXPOSE 8866" in DOCKERFILE and '"port": 8866' in (ROOT / "app" / "voila.json").read_text()
