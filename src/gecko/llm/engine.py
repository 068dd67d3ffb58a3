"""Which engine and dtype `default` runs on: measured on this machine once, not guessed from a flag.

The packaged Gemma 3 270M runs either on llama.cpp's Q4 kernels or on PyTorch (transformers).
PyTorch wins only where the machine multiplies bfloat16 fast: a GPU, or a CPU with bf16 hardware
(AMX on Intel Xeon 4th gen+, avx512_bf16 on AMD Zen 4/5). Side by side on such CPUs the bf16
engine ran 1.9x (Zen 4) to 2.7x (Xeon AMX) llama.cpp's generate throughput, while in float32 it ran
0.56x (benchmarks/RESULTS.md). So the choice is one calibration: a bf16 and a float32 matrix
product of the model's output-layer shape on the threads the LLM will get; bf16 at least
`MIN_BF16_SPEEDUP` times faster → transformers in bf16, else llama.cpp. The result is cached per
machine (CPU flags, thread count, torch version) in $GECKO_HOME/engine.json; GECKO_LLM_BACKEND
(llamacpp | transformers) and GECKO_LLM_DTYPE (bfloat16 | float32) override it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

from gecko.journal import write_text_atomic
from gecko.llm.base import llm_threads
from gecko.models import gecko_home

BACKENDS = ("llamacpp", "transformers")
DTYPES = ("bfloat16", "float32")
# bf16/float32 matmul speed above which the bf16 engine beats llama.cpp: at 3.0x (Zen 4, 2 threads)
# it ran 1.86x llama.cpp's passages/s (0.62 x the speed-up), in float32 0.56x, so break-even sits
# near 1.6x. One thread of this Zen 4 measures 2.0-2.6x (two: 3.9-4.3x); a CPU without bf16
# hardware measures below 1 (bf16 emulated).
MIN_BF16_SPEEDUP = 1.6
_announced = False


@dataclass(frozen=True)
class EngineChoice:
    backend: str  # llamacpp | transformers
    dtype: str | None  # the transformers dtype; None for llama.cpp
    reason: str  # one line: why this engine

    def line(self) -> str:
        engine = self.backend + (f" {self.dtype}" if self.dtype else "")
        return f"gecko: LLM engine {engine} ({self.reason})"


def machine_key(threads: int) -> str:
    """What the calibration depends on: the CPU's flags and model, threads, torch version."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = "".join(line for line in handle if line.startswith(("flags", "model name")))[:4096]
    except OSError:
        cpu = platform.processor()
    return hashlib.sha256(f"{cpu}|{threads}|{torch.__version__}".encode()).hexdigest()[:16]


def measure_bf16_speedup(threads: int, seconds: float = 0.1, rounds: int = 3) -> tuple[float, float]:
    """Best GFLOP/s of float32 and bfloat16 products shaped like the LLM's output layer (16 rows ×
    640 × 16,384 columns) on `threads` threads: `rounds` alternating rounds of about `seconds`
    each, so a burst of load on the machine spoils one round, not the choice."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        operands = {dtype: (torch.randn(16, 640).to(dtype), torch.randn(640, 16384).to(dtype))
                    for dtype in (torch.float32, torch.bfloat16)}
        best = dict.fromkeys(operands, 0.0)
        for _ in range(rounds):
            for dtype, (a, b) in operands.items():
                a @ b  # first-call dispatch, packing, thread start-up
                runs, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
                    a @ b
                    runs += 1
                best[dtype] = max(best[dtype], 2 * 16 * 640 * 16384 * runs / elapsed / 1e9)
        return best[torch.float32], best[torch.bfloat16]
    finally:
        torch.set_num_threads(before)


def _calibrated(threads: int) -> EngineChoice:
    """The cached choice for this machine and thread count, measured on first use."""
    path = gecko_home() / "engine.json"
    key = machine_key(threads)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}  # none yet, or torn: measure again
    fields = set(EngineChoice.__dataclass_fields__)  # entries of another shape (older versions) are dropped
    saved = {k: v for k, v in saved.items() if isinstance(v, dict) and v.keys() == fields} if isinstance(saved, dict) else {}
    if key in saved:
        return EngineChoice(**saved[key])
    f32, bf16 = measure_bf16_speedup(threads)
    speedup = bf16 / f32
    measured = f"bf16 matmul {speedup:.1f}x float32 on {threads} thread(s), {bf16:.0f} vs {f32:.0f} GFLOP/s"
    if speedup >= MIN_BF16_SPEEDUP:
        choice = EngineChoice("transformers", "bfloat16", f"{measured}; cached in {path}")
    else:
        choice = EngineChoice("llamacpp", None, f"{measured} < {MIN_BF16_SPEEDUP}x; cached in {path}")
    write_text_atomic(path, json.dumps({**saved, key: asdict(choice)}, indent=1))
    return choice


def _env(name: str, allowed: tuple[str, ...]) -> str | None:
    value = os.environ.get(name)
    if value and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value or None


def default_dtype(device: str = "cpu", threads: int | None = None) -> str:
    """The transformers engine's dtype when none is asked for: GECKO_LLM_DTYPE, bf16 on a GPU,
    else what the calibration found fast on this CPU."""
    import torch

    chosen = _env("GECKO_LLM_DTYPE", DTYPES)
    if chosen:
        return chosen
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return "bfloat16"
    return "bfloat16" if fast_bf16(llm_threads(threads)) else "float32"


def fast_bf16(threads: int) -> bool:
    """Whether this CPU multiplies bfloat16 at least `MIN_BF16_SPEEDUP` times faster than float32 on
    `threads` threads (bf16 hardware: AMX, avx512_bf16), by the cached calibration."""
    return _calibrated(threads).backend == "transformers"


def choose_engine(threads: int | None = None) -> EngineChoice:
    """The engine and dtype for `default`: environment overrides, a GPU, else the cached calibration."""
    import torch

    backend, dtype = _env("GECKO_LLM_BACKEND", BACKENDS), _env("GECKO_LLM_DTYPE", DTYPES)
    if backend == "llamacpp":
        return EngineChoice("llamacpp", None, "GECKO_LLM_BACKEND")
    if dtype:  # a dtype is a transformers setting: asking for one asks for that engine
        return EngineChoice("transformers", dtype, "GECKO_LLM_DTYPE")
    if torch.cuda.is_available():
        return EngineChoice("transformers", "bfloat16", "CUDA GPU")
    measured = _calibrated(llm_threads(threads))
    if backend == "transformers":  # engine forced, dtype from the calibration
        fast = measured.backend == "transformers"
        return EngineChoice("transformers", "bfloat16" if fast else "float32", f"GECKO_LLM_BACKEND; {measured.reason}")
    return measured


def announce(choice: EngineChoice) -> None:
    """Say once per process which engine `default` runs on, and why (stderr: stdout stays data)."""
    global _announced
    if not _announced:
        print(choice.line(), file=sys.stderr, flush=True)
        _announced = True
