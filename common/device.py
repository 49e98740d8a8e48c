"""One helper that picks the device and dtype for every stage, and says why."""
from __future__ import annotations

import torch

from common.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def gpu_free_memory() -> list[tuple[int, int, int]]:
    """(index, free bytes, total bytes) per visible CUDA GPU; NVML when present, else torch.

    GPUtil (the seed's choice) fails to import on Python 3.12, so it is not used.
    """
    if not torch.cuda.is_available():
        return []
    try:
        import pynvml  # nvidia-ml-py: NVIDIA's own binding, no CUDA context needed

        pynvml.nvmlInit()
        try:
            # NVML numbers GPUs physically; torch honours CUDA_VISIBLE_DEVICES. Match them by UUID-free
            # order only when no mask is set, otherwise fall back to torch's view.
            import os

            if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
                out = []
                for i in range(torch.cuda.device_count()):
                    mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
                    out.append((i, int(mem.free), int(mem.total)))
                return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML absent or unusable: torch below answers the same question
        pass
    return [(i, *torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())]


def pick_device(device: str = "auto", gpu: int | None = None, verbose: bool = True) -> torch.device:
    """`auto`: the CUDA GPU with the most free memory, else CPU. `--gpu N` picks GPU N."""
    if gpu is not None:
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {gpu} asked for, but this machine has no CUDA GPU (torch {torch.__version__})")
        if not 0 <= gpu < torch.cuda.device_count():
            raise UserError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
        dev = torch.device("cuda", gpu)
        why = "chosen with --gpu"
    elif device == "auto":
        gpus = gpu_free_memory()
        if gpus:
            idx, free, total = max(gpus, key=lambda g: g[1])
            dev = torch.device("cuda", idx)
            why = f"most free memory of {len(gpus)} GPU(s): {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        else:
            dev = torch.device("cpu")
            why = "no CUDA GPU visible"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU")
        why = "chosen with --device"
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if verbose:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        print(f"device: {dev} ({name}; {why})")
    return dev


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"


def pick_dtype(name: str, dev: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} unknown (choose auto, float32, float16, bfloat16)")
    return DTYPES[name]


def host_memory_available() -> int:
    """Bytes of host memory a new allocation can get without swapping (MemAvailable), else the free pages."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse
