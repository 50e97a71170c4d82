"""Hub access: decide once, before transformers is imported, whether the Hugging Face Hub is reachable.

Why: with no network, huggingface_hub retries each file for ~25 s with a wall of warnings before
failing. One 3-second probe instead; when it fails we switch to offline mode, so models and datasets
already in the local cache still load and missing ones fail at once with a clear message.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ftkit.errors import FtkitError


# Namespaces the Hub reserves for its own pages (huggingface.co/models, /datasets, /spaces): no user or
# organisation has these names, so `models/tiny` is always a local path, never a hub id.
RESERVED_NAMESPACES = {"models", "datasets", "spaces"}


def looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.jsonl) is a local path, and so is
    `org/name` when `org` is a reserved hub namespace or a folder here (a mistyped `models/tnyi` is a missing
    local model, not a hub id to fetch)."""
    first = name.split("/", 1)[0]
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt"}
        or Path(name).exists()
        or ("/" in name and (first in RESERVED_NAMESPACES or Path(first).is_dir()))
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection be opened to HF_ENDPOINT's host and port (a mirror may serve http on any port)?"""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # ValueError: a port that is not a number
        return False


def prepare_hub_access(names: list[str | None], log=print) -> None:
    """Go offline when some name is a hub id and the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    hub_names = [n for n in names if n and not looks_local(n) and not Path(n).exists()]
    if hub_names and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        import sys

        if "huggingface_hub.constants" in sys.modules:  # already imported: it read the variable at import time
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
        log(f"note: the Hugging Face Hub is not reachable; using only locally cached files for {', '.join(hub_names)}")


OFFLINE_HINT = ("it is not a local directory and not in the local Hugging Face cache, and the hub is not "
                "reachable: download it where there is network (huggingface-cli download NAME) or use a local path")


def read_model_config(name: str, revision: str = "main") -> tuple[dict, str]:
    """-> (config.json as a dict, where it came from). A local dir, else the hub (or its local cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise FtkitError(f"model '{name}': no config.json in that directory")
        return _load_json(file), str(file)
    if looks_local(name):
        raise FtkitError(f"model '{name}' is not a directory (for a hub model use its id, e.g. google/gemma-2b)")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(name, "config.json", revision=revision, local_files_only=offline)
    except Exception as err:  # offline and not cached, gated, missing repo, no network
        if offline:
            raise FtkitError(f"model '{name}': its config.json is not in the local Hugging Face cache and the hub is "
                             "not reachable; download it where there is network (huggingface-cli download "
                             f"{name} config.json) or point model_name_or_path at a local directory") from None
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise FtkitError(f"model '{name}': config.json could not be fetched from the hub ({first})") from None
    return _load_json(Path(file)), f"{name} (hub{', cached' if offline else ''})"


def _load_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FtkitError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise FtkitError(f"{file}: expected a JSON object of model settings, got {type(data).__name__}")
    return data


def load_failure(err: Exception) -> str:
    """The first line of a loading error, or the offline hint when offline mode is why it failed."""
    text = str(err).lower()
    # the phrases transformers/huggingface_hub/datasets use for "not cached and not allowed to download";
    # matching bare "cache" would also catch a model named e.g. org/kv-cache-llama
    offline = ("offline mode", "offline_mode", "cached files", "local_files_only", "localentrynotfound",
               "couldn't connect", "couldn't reach", "offlinemodeisenabled", "not in the local cache", "in the cache")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and (type(err).__name__ == "LocalEntryNotFoundError"
                                                    or any(phrase in text for phrase in offline)):
        return OFFLINE_HINT
    return str(err).splitlines()[0][:300]
