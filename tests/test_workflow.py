"""The GitHub Actions workflow, linted offline against the GitHub workflow schema (check-jsonschema's vendored copy),
and its jobs wired as the README says: tests on every push, image and manifests only after them, on main."""
import subprocess

import yaml

from tests.helpers import BIN, ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yaml"


def test_workflow_matches_the_github_schema():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_runs_after_tests_on_main_only():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert [s.get("run") for s in jobs["test"]["steps"] if "run" in s] == ["bash .ci/run"]
    release = jobs["release"]
    assert release["needs"] == "test" and "refs/heads/main" in release["if"]
    assert release["permissions"]["packages"] == "write"
    script = "\n".join(s.get("run", "") for s in release["steps"])
    assert (
        "docker build --target server" in script
        and "docker push" in script
        and "kubernetes-validate --strict" in script
    )
