"""Load a model or processor from a local directory or a Hugging Face Hub id, failing fast and clearly.

Without a network, transformers retries each file for minutes before it gives up; a user should instead
see at once, in one line, that the id cannot be fetched and that a local path works.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache

from capfilt.errors import ModelLoadError


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_cached(model_id: str) -> bool:
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_pretrained(cls: Any, model_id: str, role: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(model_id)` with a one-line `ModelLoadError` instead of retries and tracebacks."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # capfilt prints one line per model; its run's bar is the one to watch
    local = Path(model_id).expanduser()
    if local.is_dir():
        # Checked here: some transformers releases guess a model type from the folder's name instead.
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"cannot load the {role} from {model_id}: it holds no config.json")
        try:
            return cls.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load the {role} from {model_id}: {first_line(error)}") from error
    if model_id.count("/") > 1 or model_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"the {role} path {model_id} is not a directory")
    cached = is_cached(model_id)
    if not cached and not hub_reachable():
        raise ModelLoadError(
            f"cannot fetch the {role} '{model_id}': the Hugging Face Hub is unreachable and it is not in the "
            f"local cache; download it where there is a network, or pass a local directory (model + processor)"
        )
    try:
        return cls.from_pretrained(model_id, local_files_only=not hub_reachable(), **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the {role} '{model_id}': {first_line(error)}") from error


@contextlib.contextmanager
def offline_unless_hub_reachable() -> Iterator[bool]:
    """For libraries that fetch from the Hub without a `local_files_only` (open_clip): where the Hub is
    unreachable, their downloads are answered from the local cache at once instead of retried for minutes.
    Yields whether the Hub is reachable."""
    if hub_reachable():
        yield True
        return
    offline = constants.HF_HUB_OFFLINE  # read by huggingface_hub on each download
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = offline
