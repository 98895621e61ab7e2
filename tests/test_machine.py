"""vtrim_measure_machine: the rates the benchmarks divide by (tools/bench_common.machine_limits)."""

from __future__ import annotations

import pytest

import pyvtrim
from pyvtrim import _ffi

try:
    ffi, lib = _ffi.get()[:2]
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)


def test_rates_are_measured() -> None:
    out = ffi.new("struct vtrim_machine_rates *")
    assert lib.vtrim_measure_machine(1, 256, out) == 0
    # any CPU that runs the tests does more than 0.1 GFLOP/s and copies more than 0.1 GB/s
    for rate in (out.f32_flops, out.f16_flops, out.bf16_flops, out.copy_bytes_per_s):
        assert 1e8 < rate < 1e15


@pytest.mark.parametrize("n", [0, 63, 16385])
def test_bad_sizes_are_refused(n) -> None:
    out = ffi.new("struct vtrim_machine_rates *")
    assert lib.vtrim_measure_machine(1, n, out) == -1
    assert b"64 <= n <= 16384" in ffi.string(lib.vtrim_last_error())
    assert lib.vtrim_measure_machine(1, 256, ffi.NULL) == -1
