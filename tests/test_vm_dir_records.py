"""The VM dir's fixed-width records (phase, console boot offset): each is written over the
last in place, and reads back right whatever was there before it."""

from __future__ import annotations

from pathlib import Path

from agent.vm_dir import Phase, StateDir


def test_a_phase_reads_back_after_a_longer_one(tmp_path: Path) -> None:
    vm = StateDir(tmp_path / "state").vm("vm-1")
    vm.create()
    vm.save_phase("hotplugging", 123456789)
    vm.save_phase("created", 2)
    assert vm.load_phase() == Phase("created", 2)


def test_a_phase_written_by_an_older_agent_is_overwritten(tmp_path: Path) -> None:
    vm = StateDir(tmp_path / "state").vm("vm-1")
    vm.create()
    vm.phase_file.write_text("booting 4\n")  # unpadded, as replaced files were
    assert vm.load_phase() == Phase("booting", 4)
    vm.save_phase("running", 4)
    assert vm.load_phase() == Phase("running", 4)


def test_a_console_offset_reads_back_after_a_larger_one(tmp_path: Path) -> None:
    vm = StateDir(tmp_path / "state").vm("vm-1")
    vm.save_console_boot_offset(9_876_543_210)
    vm.save_console_boot_offset(7)
    assert vm.load_console_boot_offset() == 7
    assert vm.console_boot_file.stat().st_size == 21
