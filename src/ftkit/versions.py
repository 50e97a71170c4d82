"""Installed versions of ftkit and the libraries it runs on, read from package metadata: nothing is imported,
so `ftkit --version` and `ftkit doctor` stay fast and work even when a library is broken."""

from __future__ import annotations

from importlib import metadata

from ftkit import __version__

CORE = ("torch", "transformers", "trl", "peft")
STACK = (*CORE, "accelerate", "datasets", "huggingface_hub", "bitsandbytes", "tokenizers", "safetensors")
OPTIONAL = ("flash_attn", "liger_kernel", "deepspeed", "vllm", "wandb", "tensorboard", "kernels")
DISTRIBUTIONS = {"flash_attn": "flash-attn", "liger_kernel": "liger-kernel", "huggingface_hub": "huggingface-hub"}


def installed(name: str) -> str | None:
    """The installed version of a package (import name or distribution name), or None."""
    for candidate in (DISTRIBUTIONS.get(name, name), name, name.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_line() -> str:
    """`ftkit 0.1.0, torch 2.13.0, transformers 5.25.0, trl 1.16.0, peft 0.21.2`."""
    parts = [f"ftkit {__version__}"]
    parts += [f"{name} {installed(name) or 'not installed'}" for name in CORE]
    return ", ".join(parts)


def versions(names: tuple[str, ...] = STACK) -> dict[str, str | None]:
    return {name: installed(name) for name in names}
