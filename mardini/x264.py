"""libx264 options shared by every mp4 we write (shards, samples); no torch import here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# x264's instruction sets up to AVX2. Its AVX-512 code gave different bytes for the same frames
# in about 1 of 25 encodes on the AVX-512 machines here (Linux VMs, PyAV 18's bundled x264;
# never with AVX-512 masked out, nor with no asm at all), which broke reproducible shards.
# x264's asm is bit-exact with its C code, so masking AVX-512 changes speed, not output.
_X264_AVX2 = "MMX2,SSE,SSE2,SSE3,SSSE3,SSE4.1,SSE4.2,AVX,AVX2,FMA3,LZCNT,BMI1,BMI2"


@functools.cache
def x264_options() -> dict[str, str]:
    """Extra libx264 options that keep its output reproducible on this CPU."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    # Every CPU with AVX-512 F has all of _X264_AVX2; forcing them elsewhere could SIGILL.
    return {"x264-params": f"asm={_X264_AVX2}"} if "avx512f" in flags else {}
