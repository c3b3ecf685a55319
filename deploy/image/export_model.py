"""Export a registered model (MLflow model folder) into the image's build context: what `COPY build/image/model/`
takes. Used by deploy/image/build.sh (make image) and the CI release job.

    python deploy/image/export_model.py [MODEL_URI] [DEST]   # defaults: the champion, build/image/model
"""

import shutil
import sys
import tempfile

import mlflow

from deepguard.core import REGISTRY_MODEL, mlflow_setup


def main(uri: str = REGISTRY_MODEL, dest: str = "build/image/model") -> None:
    mlflow_setup()  # the project's tracking store, or MLFLOW_TRACKING_URI
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp), dest)
    print(f"export_model: {uri} -> {dest}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
