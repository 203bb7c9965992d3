"""Machine facts for kernel choices and benchmark headers, read from /proc/cpuinfo."""

from lowmem_paligemma import machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni amx_bf16_not_a_flag

processor\t: 1
model name\t: ignored second entry
"""


def test_cpu_model_and_kernel_flags(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    monkeypatch.setattr(machine, "_CPUINFO", path)
    cpu = machine.cpu()
    assert cpu.model == "AMD EPYC 9B14"
    assert cpu.flags == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")  # KERNEL_FLAGS order
    assert "AMD EPYC 9B14" in cpu.describe() and "avx512_bf16" in cpu.describe()


def test_without_cpuinfo_there_is_still_a_name(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_CPUINFO", tmp_path / "missing")
    cpu = machine.cpu()
    assert cpu.model and cpu.flags == () and cpu.cores >= 1
