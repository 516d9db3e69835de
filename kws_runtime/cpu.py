"""What this CPU does to int8 models: whether onnxruntime's int8 kernels here can saturate.

onnxruntime runs a QDQ model's uint8 x int8 products on x86 with ``vpmaddubsw`` unless the
CPU has VNNI: that instruction adds each pair of products into a signed 16-bit value, which
overflows (saturates) when weights use the full int8 range (255 x 127 x 2 > 2**15 - 1).
With 7-bit weights (kws-export's default, ``reduce_range``) a pair stays below 2**15. VNNI
(``avx512_vnni``, ``avx_vnni``) accumulates in 32 bits, and ARM's kernels do not pair
products this way, so neither saturates.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686", "x86")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def flags_have_vnni(cpuinfo: str) -> bool:
    """Whether the ``flags`` lines of a Linux ``/proc/cpuinfo`` text name VNNI."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            if set(line.split(":", 1)[1].split()) & set(VNNI_FLAGS):
                return True
    return False


@functools.lru_cache(maxsize=1)
def int8_pairs_saturate() -> bool:
    """True on x86 CPUs without VNNI, and on x86 where that cannot be read (outside Linux):
    there, int8 models with full-range weights can lose accuracy in onnxruntime."""
    if platform.machine().lower() not in X86:
        return False
    try:
        return not flags_have_vnni(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return True
