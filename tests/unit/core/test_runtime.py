"""training.cpu_bf16: "auto" follows the CPU's bf16 matrix instructions."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import Settings
from services.core.runtime import cpu_flags, train_cpu_in_bf16

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLDER_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(EPYC + "\n" + EPYC)
    assert {"avx512_bf16", "avx2"} <= cpu_flags(cpuinfo) and "avx512bw" not in cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == frozenset()  # no /proc: not Linux


@pytest.mark.parametrize(
    ("setting", "cpuinfo", "expected"),
    [
        ("auto", EPYC, True),
        ("auto", OLDER_XEON, False),  # bf16 would be emulated there: slower than float32
        ("auto", "processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n", True),
        (True, OLDER_XEON, True),  # asked for: done even where it does not pay
        (False, EPYC, False),
    ],
)
def test_auto_trains_in_bf16_only_on_cpus_with_bf16_instructions(
    tmp_path: Path, setting: bool | str, cpuinfo: str, expected: bool
) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert train_cpu_in_bf16(setting, cpu_flags(path)) is expected


def test_the_setting_takes_auto_or_a_boolean_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, parsed in (("auto", "auto"), ("true", True), ("false", False)):
        monkeypatch.setenv("FEEDLOOP_TRAINING__CPU_BF16", raw)
        assert Settings().training.cpu_bf16 == parsed
    monkeypatch.setenv("FEEDLOOP_TRAINING__CPU_BF16", "sometimes")
    with pytest.raises(ValueError, match="cpu_bf16"):
        Settings()
