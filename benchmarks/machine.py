"""Machine / software description recorded with every run."""
import datetime
import os
import platform
import re
import subprocess

import torch


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device):
    import gradfuse
    from .timing import last_level_cache_bytes
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gradfuse": gradfuse.__version__,
        "gradfuse_cuda_compiled": bool(gradfuse.cuda_compiled),
        "git_commit": _run(["git", "-C", root, "rev-parse", "HEAD"]),
        "git_dirty": bool(_run(["git", "-C", root, "status", "--porcelain", "--", "gradfuse", "csrc"])),
        "llc_bytes": last_level_cache_bytes(device),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({
            "gpu_name": torch.cuda.get_device_name(0),
            "gpu_memory_bytes": props.total_memory,
            "gpu_sm_count": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0],
            "cudnn": torch.backends.cudnn.version(),
        })
    return info


def machine_tag(info):
    name = info.get("gpu_name") if info["device"] == "cuda" else info["cpu_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    slug = re.sub(r"-(processor|cpu)\b", "", slug)
    if info["device"] == "cuda":
        return f"cuda-{slug}"
    return f"cpu-{slug}-{info['torch_threads']}t"
