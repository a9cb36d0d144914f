"""Where models come from: the Hugging Face hub (reachable or not), a local folder, or the built-in toy.

Loading is split in two so that bad input fails fast: ``open_source`` reads only the config and the
tokenizer (seconds), ``load_model`` the weights. When the hub does not answer a TCP connect within
``HUB_PROBE_TIMEOUT`` seconds, both read the local cache only (``offline_mode``), which answers in about a
second instead of huggingface_hub's ~25 s of retries; ``datautils`` uses the same probe for datasets.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

HUB_PROBE_TIMEOUT = 3.0  # seconds; a reachable hub answers a TCP connect in well under a second
SUPPORTED_TYPES = ("opt",)


class ModelError(Exception):
    """A user-facing, one-line problem with MODEL (not found, unreachable, unsupported)."""


@functools.cache
def hub_probe() -> str | None:
    """None when the hub endpoint (or the https proxy) accepts a TCP connection, else a short reason.

    Runs once per process. The connect happens in a daemon thread so that a hanging DNS lookup, which
    socket timeouts do not cover, still cannot stall us beyond HUB_PROBE_TIMEOUT.
    """
    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"no connection to {host} ({e.strerror or type(e).__name__})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"no answer from {host} within {HUB_PROBE_TIMEOUT:g} s"


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Temporarily what HF_HUB_OFFLINE=1 does: datasets and huggingface_hub read the local cache only.

    Both libraries read these module constants at call time (the env vars only seed them at import).
    """
    from huggingface_hub import constants

    try:
        import datasets.config as dconfig
    except ImportError:  # model loading needs no datasets package (GPU images may lack it)
        dconfig = types.SimpleNamespace(HF_HUB_OFFLINE=False)
    saved = dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    dconfig.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@dataclass(frozen=True)
class ModelSource:
    """A model's location and what loading its config told us. ``offline``: read the local cache only."""

    name: str  # as the user gave it
    path: str  # local folder or hub id
    positions: int  # max_position_embeddings
    offline: bool
    trust_remote_code: bool

    def cache_only(self):
        return offline_mode() if self.offline else contextlib.nullcontext()


def resolve(name: str) -> str:
    """A local folder or hub id for MODEL ('toy' is built and cached on first use)."""
    if name == "toy":
        import toy

        return toy.toy_model_path()
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or os.path.exists(name):
        raise ModelError(f"MODEL {name}: model folder not found (give a local folder, a hub id or 'toy')")
    return name


def open_source(name: str, trust_remote_code: bool = False):
    """(ModelSource, tokenizer) from the config and tokenizer only: cheap, so bad input fails before the weights."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars cover layers and evaluation; keep stderr for errors
    path = resolve(name)
    reason = None if os.path.isdir(path) else hub_probe()
    try:
        with offline_mode() if reason else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        why = f"{reason} and not in the cache" if reason else _first_line(e)
        raise ModelError(f"MODEL {name}: could not load it from the Hugging Face hub or the local cache "
                         f"({why}); offline? pass a local model folder or 'toy'") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"MODEL {name}: model_type '{config.model_type}' is not OPT; this toolkit walks OPT")
    if _packed(path):
        import packed

        packed.read_manifest(path)  # a damaged saved folder fails here, before calibration
    src = ModelSource(name, path, config.max_position_embeddings, bool(reason), trust_remote_code)
    with src.cache_only():
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return src, tokenizer


def load_model(src: ModelSource, dtype: str, dev: torch.device):
    """The model in eval mode, no KV cache. dtype "auto": float32 on CPU, the checkpoint's dtype elsewhere."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        torch_dtype = torch.float32 if dev.type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    if _packed(src.path):  # a folder saved by --save-format packed: its own loader, exact weights
        import packed

        model = packed.load_compressed(src.path, None if torch_dtype == "auto" else torch_dtype)
        model.config.use_cache = False
        return model
    with src.cache_only():
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype,
                                                     trust_remote_code=src.trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model


def _packed(path: str) -> bool:
    """A folder saved with --save-format packed (damaged or not): read by packed.py, not from_pretrained."""
    import packed

    return os.path.isdir(path) and packed.is_packed(path)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
