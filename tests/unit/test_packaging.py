"""What `pip install` of this project puts on a machine: the `worker` package, its licence."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_wheel_installs_the_worker_package_alone_with_its_licence(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"worker"}, "bench/ and tests/ stay out"
    assert any(name.endswith("licenses/LICENSE") for name in names), names[-10:]
    assert "worker/dev/corpus.jsonl" in names, "the demo's corpus ships with it"
    assert not any(name.startswith("worker/dev/kafka/lib/") for name in names), "no downloaded jars"
