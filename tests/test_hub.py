"""Hub access: the probe reads HF_ENDPOINT's host and port, an unreachable hub switches to offline mode with one
note, and a hub id that is not cached then fails at once with the offline hint instead of retrying."""

from __future__ import annotations

import os
import socket

import pytest

from ftkit import hub


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT on a closed local port; offline mode off, and restored afterwards wherever the probe sets it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_probe_connects_to_the_endpoints_own_port(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable(timeout=2)
    assert not hub.hub_reachable(timeout=2)  # the same port, closed


def test_unreachable_hub_switches_to_offline_mode_with_one_note(unreachable_hub, tmp_path):
    import huggingface_hub.constants

    notes: list[str] = []
    hub.prepare_hub_access([str(tmp_path), None, "someorg/somemodel"], log=notes.append)
    assert notes == ["note: the Hugging Face Hub is not reachable; using only locally cached files for "
                     "someorg/somemodel"]
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_local_names_need_no_probe(unreachable_hub, tmp_path):
    notes: list[str] = []
    hub.prepare_hub_access([str(tmp_path), "./data.jsonl", "a/b/c"], log=notes.append)
    assert notes == [] and os.environ["HF_HUB_OFFLINE"] == "0"


def test_a_hub_model_then_fails_at_once_with_the_offline_hint(unreachable_hub):
    from ftkit.config.arguments import ModelArguments
    from ftkit.errors import FtkitError
    from ftkit.train.model import load_tokenizer

    hub.prepare_hub_access(["someorg/somemodel"], log=lambda *_: None)
    with pytest.raises(FtkitError) as err:
        load_tokenizer(ModelArguments(model_name_or_path="someorg/somemodel"), None, log=lambda *_: None)
    assert str(err.value) == f"tokenizer 'someorg/somemodel' could not be loaded: {hub.OFFLINE_HINT}"


def test_probe_after_a_bare_huggingface_hub_import(tmp_path):
    """`import huggingface_hub` loads its constants lazily; the probe must not assume they are there."""
    import subprocess
    import sys

    code = ("import os, huggingface_hub; from ftkit.hub import prepare_hub_access; "
            "prepare_hub_access(['someorg/somemodel']); "
            "from huggingface_hub import constants; print(os.environ['HF_HUB_OFFLINE'], constants.HF_HUB_OFFLINE)")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "1 True"
