"""docs/backends.md is generated from the runtimes' capability declarations and kept fresh."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tools.codegen import backend_docs as gen_backend_docs
from tools.fleet.cluster import ROOT
from vmm import features
from vmm.v1 import host_pb2


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.codegen.backend_docs", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every table row of the page."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_checked_in_page_matches_the_declarations() -> None:
    done = run_generator("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_on_a_stale_page_and_writing_fixes_it(tmp_path: Path) -> None:
    page = tmp_path / "backends.md"
    page.write_text(gen_backend_docs.DOC_PATH.read_text().replace("1-32", "1-64"))
    stale = run_generator("--check", "--output", str(page))
    assert stale.returncode == 1
    assert "stale" in stale.stdout and "make docs" in stale.stdout
    assert run_generator("--output", str(page)).returncode == 0
    assert run_generator("--check", "--output", str(page)).returncode == 0
    missing = run_generator("--check", "--output", str(tmp_path / "absent.md"))
    assert missing.returncode == 1


def test_every_feature_has_a_row_with_each_backends_declared_support() -> None:
    declared = gen_backend_docs.declared_capabilities()
    assert [c.backend for c in declared] == list(features.BACKENDS)
    rows = table_rows(gen_backend_docs.DOC_PATH.read_text())
    titles = [gen_backend_docs.BACKEND_TITLES[b] for b in features.BACKENDS]
    assert rows["Feature"] == titles
    for f in features.FEATURES:
        cells = rows[f"{f.title} (`{f.key}`)"]
        for caps, cell in zip(declared, cells, strict=True):
            decl = features.support_of(caps, f.key)
            label = gen_backend_docs.SUPPORT_LABELS[decl.support]
            assert cell.startswith(label), (f.key, caps.backend, cell)


def test_the_spec_rows_read_as_the_spec_says() -> None:
    rows = table_rows(gen_backend_docs.DOC_PATH.read_text())
    firecracker, cloud_hypervisor = 0, 1  # columns in vmm.features.BACKENDS order
    assert rows["max_vcpu_count (`cpu.max_vcpu_count`)"][firecracker].startswith("⚪ Ignored")
    assert rows["CPU Hotplug (`cpu.hotplug`)"][firecracker] == "❌ Not supported"
    assert rows["CPU Hotplug (`cpu.hotplug`)"][cloud_hypervisor].startswith("✅ Full")
    assert "Ctrl+Alt+Del" in rows["VM Shutdown (`vm.shutdown`)"][firecracker]
    assert rows["vCPUs per VM"][:2] == ["1-32", "1-448"]
    assert rows["Memory per VM"][:2] == ["128 MiB - 32 GiB", "512 MiB - no limit"]
    assert rows["Disks per VM"][:2] == ["10", "no limit"]


def test_a_partial_declaration_renders_with_its_detail() -> None:
    decl = features.feature("vm.shutdown", host_pb2.SUPPORT_PARTIAL, "force only")
    assert gen_backend_docs.support_cell(decl) == "⚠️ Partial — force only"
    ignored = features.feature("cpu.max_vcpu_count", host_pb2.SUPPORT_IGNORED,
                               "ignored - no hotplug support")
    assert gen_backend_docs.support_cell(ignored) == "⚪ Ignored — no hotplug support"
    bare = features.feature("vm.boot", host_pb2.SUPPORT_FULL)
    assert gen_backend_docs.support_cell(bare) == "✅ Full"
