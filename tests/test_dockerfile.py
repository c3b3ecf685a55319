"""The Dockerfile's static checks. Its `server` target is built and run for real by test_image.py (podman); the
`dashboard` target is only checked here: hadolint; every file a stage COPYs exists after the pipeline (or is made
by `make image`) and is not dropped by .dockerignore; the versions it installs are the ones in constraints.txt; the
dashboard's CMD is the command the browser test runs (test_dashboard.py).
"""
import fnmatch
import json
import re
import shlex
import subprocess

from tests.helpers import BIN, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    "[(INSTRUCTION, arguments)], with continuation lines joined and comments dropped."
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in joined.splitlines() if l.strip()]


def stages() -> dict[str, list[tuple[str, str]]]:
    "{stage name: its instructions}"
    out, current = {}, None
    for op, args in instructions(DOCKERFILE):
        if op == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else args
            out[current] = []
        elif current is not None:
            out[current].append((op, args))
    return out


def copy_sources() -> list[str]:
    "What the stages COPY from the build context (not --from another stage)."
    out = []
    for op, args in instructions(DOCKERFILE):
        if op == "COPY" and "--from=" not in args:
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
    assert "models/detector.keras" in sources and "app/" in sources and "build/image/model/" in sources
    for source in sources:
        if not source.startswith("build/"):          # build/image/model is written by `make image`
            assert (tiny_project / source).exists(), f"COPY {source}: missing after the pipeline"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_installed_versions_are_the_pinned_ones():
    norm = lambda name: re.sub(r"[-_.]+", "-", name.lower())
    pins = {norm(n): v for n, v in (l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines()
                                    if "==" in l and not l.startswith("#"))}
    installs = [(norm(n), v) for n, v in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE)]
    assert {name for name, _ in installs} >= {"tensorflow-cpu", "mlserver", "openvino", "voila"}
    for name, version in installs:
        assert pins.get(name) == version, f"Dockerfile installs {name}=={version}, constraints.txt has {pins.get(name)}"
    assert "-c constraints.txt" in DOCKERFILE


def test_base_image_is_an_argument_and_the_server_is_the_default_target():
    assert DOCKERFILE.startswith("#") and "ARG BASE_IMAGE=python:3.11.7-slim-bookworm" in DOCKERFILE
    earlier = []
    for op, args in instructions(DOCKERFILE):
        if op == "FROM":
            source, name = re.split(r"\s+AS\s+", args, flags=re.IGNORECASE)
            assert source == "${BASE_IMAGE}" or source in earlier, args
            earlier.append(name)
    # the runtime stages build on the venv stage: a `COPY --from` of the 2.5 GB venv doubled the build's disk use
    assert not [args for op, args in instructions(DOCKERFILE) if op == "COPY" and args.startswith("--from")]
    last = list(stages())[-1]
    assert last == "server" and ("USER", "10001:10001") in stages()["server"]


def test_cmd_is_the_command_the_browser_test_runs():
    cmd = dict(stages()["dashboard"])["CMD"]
    argv = json.loads(cmd)
    assert argv[:3] == ["voila", "app/dashboard.ipynb", "--Voila.config_file_paths=app"]
    browser_test = (ROOT / "tests" / "test_dashboard.py").read_text()
    assert '"app/dashboard.ipynb", "--Voila.config_file_paths=app"' in browser_test
    assert "--Voila.ip=0.0.0.0" in argv and "--port=8866" in argv
    assert "8866/voila/static/voila.js" in DOCKERFILE   # the HEALTHCHECK; test_dashboard fetches the same file
    assert "EXPOSE 8866" in DOCKERFILE and '"port": 8866' in (ROOT / "app" / "voila.json").read_text()
