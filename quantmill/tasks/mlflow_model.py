"""A quantized checkpoint folder made into an MLflow Model, in place.

The folder keeps every file of the compressed-tensors checkpoint at its root (so
`AutoModelForCausalLM.from_pretrained(folder)` and vLLM load it unchanged) and gains an `MLmodel`
file with a pyfunc flavour whose loader (`quantmill.serving`) builds the quantized model from
those same files: `mlflow.pyfunc.load_model` and `mlflow models serve` work on it.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

import yaml

LOADER_MODULE = "quantmill.serving"
# What the loader imports; pinned to the versions that wrote the checkpoint.
RUNTIME_PACKAGES = ("torch", "transformers", "accelerate", "compressed-tensors", "safetensors", "tokenizers", "pandas", "mlflow")


def signature():
    """Prompts in, generated text out; generation settings as parameters."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 32),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
        ]),
    )


def _requirements() -> list[str]:
    out = []
    for name in RUNTIME_PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem (the store): no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def build_model_folder(checkpoint: Path, dst: Path) -> Path:
    """dst = the checkpoint's files + MLmodel, python_env.yaml, requirements.txt."""
    import mlflow.pyfunc
    from mlflow.models import Model

    dst.mkdir(parents=True)
    for src in sorted(checkpoint.rglob("*")):
        target = dst / src.relative_to(checkpoint)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, target)
    (dst / "requirements.txt").write_text(
        "# quantmill itself must be importable too (its loader module is quantmill.serving)\n" + "\n".join(_requirements()) + "\n"
    )
    python = ".".join(map(str, sys.version_info[:3]))
    (dst / "python_env.yaml").write_text(yaml.safe_dump({"python": python, "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]}, sort_keys=False))
    model = Model(signature=signature())
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, python_env="python_env.yaml")
    model.save(str(dst / "MLmodel"))
    return dst
