"""GPU selection: --gpus, NVIDIA_/CUDA_VISIBLE_DEVICES semantics, the whole-node guard, discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.power.base import PowerSourceError
from sidecar.power.visibility import (
    VisibleDevices,
    foreign_pids,
    gpu_env,
    gpus_used_by,
    no_gpu_hint,
    parse_cuda_visible_devices,
    parse_gpu_list,
    parse_nvidia_visible_devices,
    select_gpus,
)

UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-4e75c9ab-0ed7-8a57-75f5-23761b9f053f"
MIG_A = "MIG-4f1f1e5e-1b0a-5e4d-9d45-0a1b2c3d4e5f"


class TestParseGpuList:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", ("0",)),
            ("0,2", ("0", "2")),
            (" 2 , 0 ", ("2", "0")),
            (f"{UUID_A},{UUID_B}", (UUID_A, UUID_B)),
            (f"1,{MIG_A}", ("1", MIG_A)),
        ],
    )
    def test_valid(self, text: str, expected: tuple[str, ...]) -> None:
        """Indices, GPU UUIDs and MIG ids parse in the order given."""
        assert parse_gpu_list(text) == expected

    @pytest.mark.parametrize("text", ["", " ", "0,,1", "0,", "gpu0", "-1", "all", "0;1", "0,0,1"])
    def test_invalid(self, text: str) -> None:
        """Anything that is not an index, UUID or MIG id is a ValueError for the settings layer."""
        with pytest.raises(ValueError, match="GPU"):
            parse_gpu_list(text)


class TestNvidiaVisibleDevices:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, VisibleDevices("unset")),
            ("all", VisibleDevices("all")),
            ("none", VisibleDevices("none")),
            ("void", VisibleDevices("void")),
            ("", VisibleDevices("void")),
            ("0,1", VisibleDevices("list", ("0", "1"))),
            (f"{UUID_A}", VisibleDevices("list", (UUID_A,))),
            ("0:1,1:0", VisibleDevices("list", ("0:1", "1:0"))),
        ],
    )
    def test_kinds(self, value: str | None, expected: VisibleDevices) -> None:
        """The container toolkit's values read as unset, all, none, void or a device list."""
        assert parse_nvidia_visible_devices(value) == expected


class TestCudaVisibleDevices:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, VisibleDevices("unset")),
            ("1,0", VisibleDevices("list", ("1", "0"))),
            ("1,x,2", VisibleDevices("list", ("1",))),
            (f"{UUID_A},{MIG_A}", VisibleDevices("list", (UUID_A, MIG_A))),
            ("GPU-8932", VisibleDevices("list", ("GPU-8932",))),
            ("", VisibleDevices("none")),
            ("-1", VisibleDevices("none")),
            ("all", VisibleDevices("none")),
        ],
    )
    def test_cuda_rules(self, value: str | None, expected: VisibleDevices) -> None:
        """CUDA reads entries up to the first invalid one; nothing valid hides every GPU."""
        assert parse_cuda_visible_devices(value) == expected


class TestSelectGpus:
    def test_explicit_gpus_win(self) -> None:
        """--gpus is used as given, whatever the environment says."""
        env = {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "3"}
        assert select_gpus(["1", UUID_A], env, visible_count=8) == ("1", UUID_A)

    def test_nothing_set_means_all_visible(self) -> None:
        """Without --gpus or variables, every GPU NVML sees is metered (None)."""
        assert select_gpus(None, {}, visible_count=2) is None

    def test_runtime_list_is_not_refiltered(self) -> None:
        """A NVIDIA_VISIBLE_DEVICES list was applied by the runtime already: NVML's view stands."""
        env = {"NVIDIA_VISIBLE_DEVICES": "3,5"}
        assert select_gpus(None, env, visible_count=2) is None

    def test_whole_node_guard(self) -> None:
        """NVIDIA_VISIBLE_DEVICES=all with several GPUs and no --gpus refuses, naming the fix."""
        with pytest.raises(PowerSourceError, match=r"--gpus with the model's GPU UUIDs") as raised:
            select_gpus(None, {"NVIDIA_VISIBLE_DEVICES": "all"}, visible_count=8)
        assert "8 GPUs" in str(raised.value)
        assert "\n" not in str(raised.value)

    def test_guard_ignores_cuda_visible_devices(self) -> None:
        """Only --gpus lifts the guard: a CUDA index would name the node's GPU, not the model's."""
        env = {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0"}
        with pytest.raises(PowerSourceError):
            select_gpus(None, env, visible_count=4)

    def test_all_with_one_gpu_is_fine(self) -> None:
        """A node with a single GPU cannot be over-counted: all is accepted."""
        assert select_gpus(None, {"NVIDIA_VISIBLE_DEVICES": "all"}, visible_count=1) is None

    def test_cuda_list_selects(self) -> None:
        """CUDA_VISIBLE_DEVICES narrows the selection when --gpus is absent."""
        assert select_gpus(None, {"CUDA_VISIBLE_DEVICES": "1,0"}, visible_count=2) == ("1", "0")

    @pytest.mark.parametrize("value", ["", "-1"])
    def test_cuda_hiding_everything_refuses(self, value: str) -> None:
        """A CUDA_VISIBLE_DEVICES that hides every GPU stops start-up rather than meter nothing."""
        with pytest.raises(PowerSourceError, match="CUDA_VISIBLE_DEVICES"):
            select_gpus(None, {"CUDA_VISIBLE_DEVICES": value}, visible_count=2)

    @pytest.mark.parametrize(
        ("env", "hint"),
        [
            ({"NVIDIA_VISIBLE_DEVICES": "none"}, "'none'"),
            ({"NVIDIA_VISIBLE_DEVICES": "void"}, "'void'"),
            ({}, "unset"),
            ({"NVIDIA_VISIBLE_DEVICES": "all"}, ""),
        ],
    )
    def test_no_gpu_hint(self, env: dict[str, str], hint: str) -> None:
        """When NVML sees nothing, the hint says what the runtime was asked to expose."""
        text = no_gpu_hint(env)
        assert (hint in text) if hint else text == ""


class TestEnvironment:
    def test_gpu_env_reads_only_visibility_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The thin wrapper copies the two visibility variables and nothing else."""
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setenv("LLM_ENERGY_UPSTREAM", "http://x")
        assert gpu_env() == {"NVIDIA_VISIBLE_DEVICES": "all"}


class TestDiscovery:
    def test_gpus_of_model_processes(self) -> None:
        """GPUs running any of the model's PIDs are returned once each, in NVML's order."""
        processes = [(UUID_A, [10, 11]), (UUID_B, [20]), ("GPU-other", [30])]
        assert gpus_used_by(processes, {11, 20, 99}) == [UUID_A, UUID_B]

    def test_no_match_gives_nothing(self) -> None:
        """Host-namespace PIDs that match no local process give an empty list, not a guess."""
        assert gpus_used_by([(UUID_A, [123456])], {7, 8}) == []

    def test_foreign_pids_skip_our_own(self, tmp_path: Path) -> None:
        """A /proc scan returns numeric entries other than our own PIDs."""
        for name in ("1", "7", "42", "self", "cpuinfo"):
            (tmp_path / name).mkdir()
        assert foreign_pids(tmp_path, own_pids={42}) == {1, 7}

    def test_foreign_pids_missing_proc(self, tmp_path: Path) -> None:
        """Without a readable /proc, discovery finds nothing instead of failing."""
        assert foreign_pids(tmp_path / "absent") == set()
