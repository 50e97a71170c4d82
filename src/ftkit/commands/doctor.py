"""`ftkit doctor`: what this machine can train, and what to install or set to train more.

Python, torch and the CUDA/ROCm it was built for, each GPU with its memory and bf16 support, the optional
kernels and engines (bitsandbytes, flash-attn, liger-kernel, DeepSpeed, vLLM), whether the Hugging Face Hub
answers, where the caches are and how big; then what that means for a recipe ("4-bit QLoRA: yes", "flash_attention_2:
not installed: pip install flash-attn"). Versions come from package metadata and only torch is imported (never
transformers, trl or peft), so doctor answers even where those are broken. `--json` for scripts.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from ftkit import __version__
from ftkit.versions import OPTIONAL, STACK, installed, versions

GIB = 2**30
SIZE_WALK_SECONDS = 5.0  # a cache too big to measure in this time is reported as "at least"


def torch_info() -> dict:
    """torch's build and the GPUs it sees; {"error": ...} when torch cannot be imported."""
    try:
        import torch
    except Exception as err:  # not installed, or a broken CUDA install: say so, do not crash
        return {"version": installed("torch"), "error": f"{type(err).__name__}: {err}".splitlines()[0], "gpus": []}
    info = {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "cuda_available": torch.cuda.is_available(), "gpus": []}
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps and mps.is_available())
    for index in range(torch.cuda.device_count() if info["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(index)
        capability = f"{props.major}.{props.minor}"
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        info["gpus"].append({"index": index, "name": props.name, "memory_bytes": props.total_memory,
                             "capability": capability, "bf16": bool(bf16)})
    return info


def hub_info() -> dict:
    """The endpoint, whether it answered a 3-second probe (not probed when HF_HUB_OFFLINE=1), and whether a token
    is configured (its presence only: doctor never reads or prints a token)."""
    from huggingface_hub import constants

    from ftkit.hub import hub_reachable

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    token = bool(os.environ.get("HF_TOKEN")) or Path(constants.HF_TOKEN_PATH).is_file()
    return {"endpoint": constants.ENDPOINT, "offline_mode": offline,
            "reachable": None if offline else hub_reachable(), "token_configured": token}


def cache_info() -> list[dict]:
    from huggingface_hub import constants

    ftkit_cache = Path(os.environ.get("FTKIT_CACHE", Path.home() / ".cache" / "ftkit"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    places = [("hub models and datasets", Path(constants.HF_HUB_CACHE), "HF_HUB_CACHE or HF_HOME"),
              ("datasets (Arrow)", datasets_cache, "HF_DATASETS_CACHE"),
              ("ftkit token cache", ftkit_cache, "FTKIT_CACHE")]
    out = []
    for name, path, variable in places:
        size, complete = folder_size(path)
        out.append({"name": name, "path": str(path), "exists": path.is_dir(), "bytes": size, "complete": complete,
                    "moved_by": variable})
    return out


def folder_size(path: Path, budget: float = SIZE_WALK_SECONDS) -> tuple[int, bool]:
    """Bytes of the files under `path`, links not followed (the hub cache links snapshots to blobs); -> (bytes,
    whether the walk finished within `budget` seconds)."""
    total, stack, deadline = 0, [path], time.monotonic() + budget
    while stack:
        if time.monotonic() > deadline:
            return total, False
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total, True


def capabilities(torch: dict, packages: dict, hub: dict) -> list[dict]:
    """What the findings mean, each {"name", "available", "detail"} with what to do when it is not available."""
    gpus, cuda_build = torch.get("gpus") or [], bool(torch.get("cuda") or torch.get("hip"))
    nvidia = shutil.which("nvidia-smi") is not None

    def item(name: str, available: bool, detail: str) -> dict:
        return {"name": name, "available": available, "detail": detail}

    if torch.get("error"):
        gpu = item("GPU training", False, f"torch does not import ({torch['error']}): reinstall it, see "
                   "https://pytorch.org/get-started/locally/")
    elif gpus:
        names = ", ".join(sorted({g["name"] for g in gpus}))
        gpu = item("GPU training", True, f"{len(gpus)} x {names} ({gpus[0]['memory_bytes'] / GIB:.0f} GiB each)")
    elif nvidia and not cuda_build:
        gpu = item("GPU training", False, f"torch {torch.get('version')} is a CPU build but this machine has an "
                   "NVIDIA GPU: install a CUDA build (https://pytorch.org/get-started/locally/)")
    else:
        gpu = item("GPU training", False, "no CUDA/ROCm GPU visible: ftkit trains on the CPU (tiny models only)")
    bf16 = all(g["bf16"] for g in gpus) if gpus else False
    result = [gpu, item("bf16", bf16, "yes: ftkit trains in bf16 mixed precision" if bf16 else
                        "no GPU with bf16: ftkit trains in float32 (fp16: true for half precision on older GPUs)"
                        if gpus else "no GPU: ftkit trains in float32 on the CPU")]
    bnb = packages.get("bitsandbytes")
    if not bnb:
        result.append(item("4-bit QLoRA / 8-bit", False, "not installed: pip install bitsandbytes"))
    else:
        where = "on the GPU" if gpus else "on the CPU only: it works, slowly"
        result.append(item("4-bit QLoRA / 8-bit", True, f"yes (bitsandbytes {bnb}), {where}"))
    result.append(flash_attention(gpus, packages.get("flash_attn")))
    result.append(item("use_liger_kernel", bool(packages.get("liger_kernel")),
                       f"installed ({packages.get('liger_kernel')})" if packages.get("liger_kernel")
                       else "not installed: pip install liger-kernel (fused kernels, less memory; GPU only)"))
    result.append(item("DeepSpeed ZeRO", bool(packages.get("deepspeed")),
                       f"installed ({packages.get('deepspeed')}): --launcher accelerate_configs/deepspeed_zero3.yaml"
                       if packages.get("deepspeed") else "not installed: pip install deepspeed (FSDP2 needs nothing "
                       "extra: --launcher accelerate_configs/fsdp.yaml)"))
    if len(gpus) > 1:
        result.append(item("several GPUs", True, f"ftkit train recipe.yml --launcher accelerate_configs/ddp.yaml "
                           f"--num-processes {len(gpus)}"))
    result.append(item("vLLM serving", bool(packages.get("vllm")), f"installed ({packages.get('vllm')})"
                       if packages.get("vllm") else "not installed: pip install vllm (ftkit serve prints the line)"))
    result.append(hub_item(hub))
    return result


def flash_attention(gpus: list[dict], version: str | None) -> dict:
    ampere = [g for g in gpus if float(g["capability"]) >= 8.0]
    if version and ampere:
        return {"name": "flash_attention_2", "available": True, "detail": f"yes (flash-attn {version})"}
    if version:
        return {"name": "flash_attention_2", "available": False, "detail": f"flash-attn {version} is installed but "
                "needs an NVIDIA GPU of the Ampere generation or newer; sdpa (the default) works everywhere"}
    need = "" if ampere else " (it needs an NVIDIA GPU, Ampere or newer; sdpa, the default, works everywhere)"
    return {"name": "flash_attention_2", "available": False,
            "detail": f"not installed: pip install flash-attn --no-build-isolation{need}"}


def hub_item(hub: dict) -> dict:
    if hub["offline_mode"]:
        return {"name": "Hugging Face Hub", "available": False, "detail": "offline (HF_HUB_OFFLINE=1): only models "
                "and datasets already in the cache load"}
    if hub["reachable"]:
        token = "a token is configured" if hub["token_configured"] else "no token (gated models such as Llama need " \
                "`huggingface-cli login` or HF_TOKEN)"
        return {"name": "Hugging Face Hub", "available": True, "detail": f"{hub['endpoint']} answers; {token}"}
    return {"name": "Hugging Face Hub", "available": False, "detail": f"{hub['endpoint']} does not answer: ftkit "
            "goes offline and loads only cached models and datasets (set HF_ENDPOINT for a mirror)"}


def collect() -> dict:
    packages = versions(STACK + OPTIONAL)
    torch = torch_info()
    hub = hub_info()
    return {"ftkit": __version__,
            "python": {"version": platform.python_version(), "executable": sys.executable,
                       "platform": platform.platform()},
            "packages": packages, "torch": torch, "gpus": torch.get("gpus") or [], "hub": hub,
            "caches": cache_info(), "capabilities": capabilities(torch, packages, hub)}


def size_text(n: int, complete: bool = True) -> str:
    text = f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
    return text if complete else f"at least {text}"


def render(report: dict) -> list[str]:
    from ftkit.cells import pad

    t, py = report["torch"], report["python"]
    build = f"CUDA {t['cuda']}" if t.get("cuda") else f"ROCm {t['hip']}" if t.get("hip") else "CPU build"
    lines = [f"ftkit {report['ftkit']} on Python {py['version']} ({py['platform']})",
             f"torch {t.get('version') or 'not installed'} ({build})" + (f": {t['error']}" if t.get("error") else ""),
             "libraries: " + ", ".join(f"{n} {v}" for n, v in report["packages"].items() if v and n != "torch"),
             "missing: " + (", ".join(n for n, v in report["packages"].items() if not v) or "nothing"), ""]
    lines += [f"GPU {g['index']}: {g['name']}, {g['memory_bytes'] / GIB:.1f} GiB, compute {g['capability']}, "
              f"bf16 {'yes' if g['bf16'] else 'no'}" for g in report["gpus"]] or ["GPUs: none"]
    lines += ["", "caches:"]
    for cache in report["caches"]:
        size = size_text(cache["bytes"], cache["complete"]) if cache["exists"] else "(not created yet)"
        lines.append(f"  {pad(cache['name'], 24)} {pad(cache['path'], 44)} {size}")
    lines += ["", "what this means:"]
    width = max(len(c["name"]) for c in report["capabilities"]) + 2
    for c in report["capabilities"]:
        lines.append(f"  {pad(c['name'] + ':', width)} {c['detail']}")
    return lines


def run_doctor(as_json: bool = False, echo=print) -> dict:
    report = collect()
    echo(json.dumps(report, indent=2) if as_json else "\n".join(render(report)))
    return report
