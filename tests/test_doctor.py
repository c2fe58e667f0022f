"""``python -m harness doctor``: each check's ok / warn / fail, on test doubles of the NVML and
``torch.cuda`` calls it makes (the real ones need a GPU: see the ``gpu``-marked test)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch

from harness import doctor, environment
from harness.cli import main

GB = 1024**3
HANDLE = object()
GPU_CHECKS = ("cuda_driver", "processes", "persistence", "clocks", "power", "temperature", "ecc")
NOT_SUPPORTED = "not supported"


@dataclass
class FakeNvml:
    """One healthy H100 as NVML reports it; change a field to make a check warn or fail.

    Installs exactly the ``pynvml`` functions that :mod:`harness.doctor` calls; any other
    call reaches the real library, which raises (uninitialised) and turns an expected ``ok``
    into a "could not check" warn.
    """

    count: int = 1
    driver: str = "550.54.15"
    cuda_driver: int = 12040
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    total_memory: int = 80 * GB
    persistence: int | str = pynvml.NVML_FEATURE_ENABLED
    sm_clock: int = 1980
    max_sm_clock: int = 1980
    reasons: int = 0x02  # the applications (locked) clocks setting holds them
    power_mw: int = 700_000
    default_power_mw: int = 700_000
    temperature: int = 41
    slowdown: int | str = 87
    ecc_mode: int | str = pynvml.NVML_FEATURE_ENABLED
    ecc_errors: dict[int, int] = field(default_factory=dict)
    init_error: int | None = None
    calls: list[str] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByUUID",
            "nvmlDeviceGetHandleByIndex",
            "nvmlSystemGetDriverVersion",
            "nvmlSystemGetCudaDriverVersion",
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetPersistenceMode",
            "nvmlDeviceGetClockInfo",
            "nvmlDeviceGetMaxClockInfo",
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetEnforcedPowerLimit",
            "nvmlDeviceGetPowerManagementDefaultLimit",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetTemperatureThreshold",
            "nvmlDeviceGetEccMode",
            "nvmlDeviceGetTotalEccErrors",
        ):
            monkeypatch.setattr(pynvml, name, self._recorded(name, getattr(self, "_" + name)))
        return self

    def _recorded(self, name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return function(*args)

        return call

    @staticmethod
    def _value(value: Any) -> Any:
        if value == NOT_SUPPORTED:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def _device(self, handle: Any) -> None:
        assert handle is HANDLE, "a device query without the handle of cuda:0"

    def _nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def _nvmlShutdown(self) -> None:
        pass

    def _nvmlDeviceGetCount(self) -> int:
        return self.count

    def _nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        assert uuid == "GPU-8c2a0c2e-0000-4000-8000-000000000001", uuid
        return HANDLE

    def _nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return HANDLE

    def _nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def _nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver

    def _nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        self._device(handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes]

    def _nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        self._device(handle)
        return []

    def _nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        self._device(handle)
        return SimpleNamespace(total=self.total_memory, free=self.total_memory, used=0)

    def _nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        self._device(handle)
        return int(self._value(self.persistence))

    def _nvmlDeviceGetClockInfo(self, handle: Any, kind: int) -> int:
        self._device(handle)
        assert kind == pynvml.NVML_CLOCK_SM
        return self.sm_clock

    def _nvmlDeviceGetMaxClockInfo(self, handle: Any, kind: int) -> int:
        self._device(handle)
        assert kind == pynvml.NVML_CLOCK_SM
        return self.max_sm_clock

    def _nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        self._device(handle)
        return self.reasons

    def _nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        self._device(handle)
        return self.power_mw

    def _nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        self._device(handle)
        return self.default_power_mw

    def _nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        self._device(handle)
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self.temperature

    def _nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        self._device(handle)
        assert threshold == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return int(self._value(self.slowdown))

    def _nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        self._device(handle)
        mode = int(self._value(self.ecc_mode))
        return [mode, mode]

    def _nvmlDeviceGetTotalEccErrors(self, handle: Any, kind: int, counter: int) -> int:
        self._device(handle)
        assert counter == pynvml.NVML_VOLATILE_ECC
        return self.ecc_errors.get(kind, 0)


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test doubles of the torch.cuda calls the doctor makes: one H100, torch for CUDA 12.4."""
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        total_memory=80 * GB,
        uuid="8c2a0c2e-0000-4000-8000-000000000001",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def finding(name: str) -> doctor.Finding:
    found = {f.check: f for f in doctor.diagnose()}
    assert list(found) == [check.name for check in doctor.CHECKS]
    return found[name]


@pytest.mark.usefixtures("cuda")
def test_a_healthy_gpu_passes_every_gpu_check(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml().install(monkeypatch)
    findings = {f.check: f for f in doctor.diagnose()}
    assert {name: findings[name].status for name in ("gpus", *GPU_CHECKS)} == dict.fromkeys(
        ("gpus", *GPU_CHECKS), "ok"
    ), [f.line() for f in findings.values()]
    assert findings["gpus"].detail.startswith("1 × NVIDIA H100 80GB HBM3 (80.0 GB)")
    assert findings["clocks"].detail == "SM 1980 / 1980 MHz, locked (applications / locked clocks setting)"
    assert findings["power"].detail == "power limit 700 W (default 700 W)"
    assert findings["cuda_driver"].detail == (
        "torch built for CUDA 12.4, driver 550.54.15 supports CUDA 12.4"
    )
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"


CASES = [
    # (check, FakeNvml fields, status, text in the detail)
    ("cuda_driver", {"cuda_driver": 12080}, "ok", "supports CUDA 12.8"),
    ("cuda_driver", {"cuda_driver": 12020}, "warn", "minor-version compatibility"),
    ("cuda_driver", {"cuda_driver": 11080}, "fail", "supports CUDA 11.8"),
    ("processes", {"processes": [(os.getpid(), 9 * GB)]}, "ok", "no other process"),
    # pids above Linux's largest pid_max: no such process here, so no name
    ("processes", {"processes": [(4194401, 3 * GB), (4194402, None)]}, "warn",
     "2 other process(es) on the GPU: 4194401 ? (3.0 GB), 4194402 ? (?)"),
    ("processes", {"processes": [(4194401, 41 * GB)]}, "fail", "51% of its memory"),
    ("persistence", {"persistence": pynvml.NVML_FEATURE_DISABLED}, "warn", "persistence mode off"),
    ("persistence", {"persistence": NOT_SUPPORTED}, "ok", "not supported"),
    ("clocks", {"reasons": 0x00, "sm_clock": 1755}, "warn", "SM 1755 / 1980 MHz, not locked"),
    ("clocks", {"reasons": 0x01, "sm_clock": 345}, "warn", "SM 345 / 1980 MHz (idle), not locked"),
    ("clocks", {"reasons": 0x04}, "warn", "held back by the power cap"),
    ("clocks", {"reasons": 0x42, "sm_clock": 1200}, "fail", "hardware thermal slowdown"),
    ("clocks", {"reasons": 0x08}, "fail", "hardware slowdown"),
    ("power", {"power_mw": 600_000}, "warn", "power limit 600 W (default 700 W)"),
    ("power", {"power_mw": 500_000}, "fail", "power limit 500 W"),
    ("temperature", {"temperature": 78}, "warn", "78 °C (slowdown at 87 °C)"),
    ("temperature", {"temperature": 88}, "fail", "88 °C"),
    ("temperature", {"slowdown": NOT_SUPPORTED, "temperature": 50}, "ok", "no slowdown threshold"),
    ("ecc", {"ecc_errors": {pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 3}}, "warn", "3 corrected"),
    ("ecc", {"ecc_errors": {pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 1}}, "fail",
     "1 uncorrected"),
    ("ecc", {"ecc_mode": NOT_SUPPORTED}, "ok", "no ECC on this GPU"),
    ("ecc", {"ecc_mode": pynvml.NVML_FEATURE_DISABLED}, "ok", "ECC disabled"),
    ("gpus", {"count": 2}, "warn", "NVML sees 2"),
]


@pytest.mark.usefixtures("cuda")
@pytest.mark.parametrize(("check", "state", "status", "text"), CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_gpu_check_outcomes(
    monkeypatch: pytest.MonkeyPatch, check: str, state: dict[str, Any], status: str, text: str
) -> None:
    FakeNvml(**state).install(monkeypatch)
    result = finding(check)
    assert (result.status, text in result.detail) == (status, True), result.line()
    assert result.scope == "gpu"
    if status != "ok":
        assert result.advice, "a warn or fail says what to do"


def test_the_cases_cover_every_outcome_of_each_gpu_check() -> None:
    """CASES (with the healthy GPU's ok) holds a warn and a fail of each GPU check."""
    covered: dict[str, set[str]] = {}
    for check, _state, status, _text in CASES:
        covered.setdefault(check, set()).add(status)
    cannot_fail = {"persistence"}
    for name in GPU_CHECKS:
        expected = {"ok", "warn"} | (set() if name in cannot_fail else {"fail"})
        assert expected <= covered[name] | {"ok"}, (name, covered[name])


@pytest.mark.usefixtures("cuda")
def test_torch_sees_a_gpu_but_nvml_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    findings = {f.check: f for f in doctor.diagnose()}
    assert findings["gpus"].status == "warn" and "NVML" in findings["gpus"].detail
    for name in GPU_CHECKS:
        assert findings[name].status == "warn"
        assert findings[name].detail.startswith("not checked: NVML: ")


def test_nvml_sees_a_gpu_that_torch_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    FakeNvml().install(monkeypatch)
    findings = {f.check: f for f in doctor.diagnose()}
    assert findings["gpus"].status == "fail"
    assert "NVML sees 1 GPU(s) but torch" in findings["gpus"].detail
    assert findings["cuda_driver"].status == "fail"  # a CPU build of torch on a GPU machine
    assert findings["clocks"].status == "ok"  # the machine's GPU is still checked


def test_torch_that_cannot_initialise_cuda_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", broken)
    FakeNvml().install(monkeypatch)
    result = finding("gpus")
    assert result.status == "fail" and "insufficient" in result.detail, result.line()


def test_a_doctor_that_breaks_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[doctor.Finding]:
        raise OSError("no /proc")

    monkeypatch.setattr(doctor, "diagnose", broken)
    assert doctor.recorded() == [doctor.Finding(
        "doctor", "warn", "the doctor failed: OSError: no /proc").to_dict()]


@pytest.mark.usefixtures("cuda")
def test_an_unexpected_nvml_error_is_a_warn_never_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml().install(monkeypatch)

    def broken(handle: Any, kind: int) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetClockInfo", broken)
    result = finding("clocks")
    assert result.status == "warn" and result.detail.startswith("could not check: NVMLError")
    assert fake.calls[-1] == "nvmlShutdown"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_every_gpu_check_warns_no_cuda_device() -> None:
    findings = {f.check: f for f in doctor.diagnose()}
    assert findings["gpus"].status == "warn" and "no CUDA device" in findings["gpus"].detail
    for name in GPU_CHECKS:
        assert (findings[name].status, findings[name].detail) == (
            "warn", "no CUDA device: not checked")
    assert not any(f.status == "fail" for f in findings.values())


def test_cli_prints_one_line_per_check_and_exits_by_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["doctor"]) == (1 if any(f.status == "fail" for f in doctor.diagnose()) else 0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(doctor.CHECKS) + 1
    for line, check in zip(lines, doctor.CHECKS, strict=False):
        assert line.split()[:2][1] == check.name and line.split()[0] in doctor.STATUSES
    assert lines[-1].startswith("doctor: ")

    monkeypatch.setattr(doctor, "DISK_FAIL_GB", 1e9)  # no disk has that much free: a fail
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fit"] is False and report["counts"]["fail"] >= 1
    disk = next(f for f in report["findings"] if f["check"] == "disk")
    assert disk["status"] == "fail" and disk["advice"] and disk["affects"] == ["load"]


def test_disk_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "DISK_WARN_GB", 0.0)
    assert finding("disk").status == "ok"
    monkeypatch.setattr(doctor, "DISK_WARN_GB", 1e9)
    assert finding("disk").status == "warn"
    monkeypatch.setattr(doctor, "DISK_FAIL_GB", 1e9)
    assert finding("disk").status == "fail"


def test_the_token_is_reported_never_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    secret = "hf_DoNotPrintThisTokenValue1234"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "no token" in finding("hf_cache").detail
    (tmp_path / "token").write_text(secret)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert "a token is configured" in finding("hf_cache").detail
    monkeypatch.setenv("HF_TOKEN", secret)
    main(["doctor"])
    main(["doctor", "--json"])
    out = capsys.readouterr().out
    assert "a token is configured" in out and secret not in out
    assert secret not in json.dumps([f.to_dict() for f in doctor.diagnose()])


def test_cpu_governor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "CPUFREQ", tmp_path)
    assert finding("cpu_governor").status == "ok"  # none exposed
    for index, governor in enumerate(["performance", "powersave", "powersave"]):
        folder = tmp_path / f"cpu{index}" / "cpufreq"
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text(governor + "\n")
    result = finding("cpu_governor")
    assert result.status == "warn" and result.scope == "host" and result.affects == ("speed",)
    assert "performance on 1 of 3 CPUs, powersave on 2 of 3 CPUs" in result.detail
    for index in (1, 2):
        (tmp_path / f"cpu{index}" / "cpufreq" / "scaling_governor").write_text("performance")
    assert finding("cpu_governor").status == "ok"


def test_torch_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    assert finding("torch_backends").status == "ok"
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    result = finding("torch_backends")
    assert result.status == "warn" and "cudnn.benchmark True" in result.detail


def test_findings_are_recorded_in_the_environment_but_not_its_fingerprint() -> None:
    env = environment.collect()
    assert env["doctor"] == doctor.recorded()
    assert all(f["status"] in ("warn", "fail") for f in env["doctor"])
    assert "doctor" not in environment.COMPARABLE_FIELDS
    other = {**env, "doctor": [{"check": "clocks", "status": "fail", "detail": "hot"}]}
    assert environment.fingerprint(other) == environment.fingerprint(env)
    for item in env["doctor"]:
        assert doctor.Finding.from_dict(item).to_dict() == item


def test_finding_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="status must be one of"):
        doctor.Finding("x", "bad", "detail")
    with pytest.raises(ValueError, match="affects must be among"):
        doctor.Finding("x", "ok", "detail", affects=("colour",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_doctor_on_the_real_gpu() -> None:
    """The real twin: on a GPU machine every GPU check reads the device (no 'not checked')."""
    findings = {f.check: f for f in doctor.diagnose()}
    print("\n".join(f.line() for f in findings.values()))
    assert findings["gpus"].status == "ok", findings["gpus"].line()
    assert torch.cuda.get_device_name(0) in findings["gpus"].detail
    for name in GPU_CHECKS:
        assert "not checked" not in findings[name].detail, findings[name].line()
        assert "could not check" not in findings[name].detail, findings[name].line()
    assert findings["cuda_driver"].status != "fail", findings["cuda_driver"].line()
