"""A Hub model id checked in seconds before anything loads it.

Transformers and vLLM fetch a Hub id's files with retries and backoff: without network that is
a minute of "Retrying in 8s" ending in a generic "couldn't connect". Asked first, the Hub
answers (or fails to) within HUB_TIMEOUT_SECONDS, and a user without network is told what to
do: HF_HUB_OFFLINE=1 with a cached copy, or a local model folder.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("batchgen")

HUB_TIMEOUT_SECONDS = 5.0
LOCAL_FOLDER = "or pass --model a local model folder (config.json, weights, tokenizer)"
OFFLINE_FIX = (
    "set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache (download one where "
    "there is network: `hf download {model}`), " + LOCAL_FOLDER
)


def _cached(model: str) -> bool:
    """Whether the Hugging Face cache holds this id's config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an id the hub library refuses to parse is not cached either
        return False


def hub_model_problem(model: str) -> str | None:
    """Why the Hub id `model` cannot be loaded here, or None; with a cached copy and an
    unreachable Hub, switches this process (and the engine it starts) to offline mode."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        if _cached(model):
            return None
        return (
            f"--model {model}: not a local folder, and HF_HUB_OFFLINE is set with no copy of it "
            f"in the Hugging Face cache; download it where there is network (`hf download "
            f"{model}`), {LOCAL_FOLDER}"
        )
    reason = _unreachable(model)
    if reason is None:
        return None
    if reason.startswith("no such model"):
        return f"--model {model}: {reason}"
    if _cached(model):
        log.warning(
            "the Hugging Face Hub is unreachable (%s); using the cached copy of %s "
            "(HF_HUB_OFFLINE=1 for this run)",
            reason,
            model,
        )
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by vLLM's engine processes
        constants.HF_HUB_OFFLINE = True
        return None
    return (
        f"--model {model}: not a local folder, and the Hugging Face Hub ({constants.ENDPOINT}) "
        f"cannot be reached ({reason}); {OFFLINE_FIX.format(model=model)}"
    )


def _unreachable(model: str) -> str | None:
    """Why the Hub cannot say whether `model` exists (None: it can, and it does)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        model_info(model, timeout=HUB_TIMEOUT_SECONDS)
    except GatedRepoError:
        return None  # it exists; the token decides, and the engine says so
    except RepositoryNotFoundError:
        return (
            "no such model on the Hugging Face Hub (or a private one: log in with `hf auth "
            "login`); check the id, or pass a local model folder"
        )
    except (HfHubHTTPError, ValueError):
        return None  # the Hub answered; let the loader report what it says
    except Exception as exc:  # the HTTP library's (vendored) transport errors: no answer
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, OSError) or names & {"TransportError", "TimeoutException"}:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise
    return None
