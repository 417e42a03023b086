"""No committed file names a path of one machine: paths are relative to the project or ../shared."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths of a machine: home and work folders, temporary folders, Windows profiles.
MACHINE_PATH = re.compile(
    "|".join(
        [
            "/" + "work/",
            "/" + "home/",
            "/" + "Users/",
            "/" + "tmp/",
            "/" + "root/",
            r"\b[A-Z]:\\\\(?:Users|Windows|Program)",
        ]
    )
)


def project_files():
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        return [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # Not a git checkout: every visible file.
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
        ]


def test_no_committed_file_holds_an_absolute_machine_path():
    found = []
    for path in project_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # Binary files (images, weights).
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = MACHINE_PATH.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "absolute machine paths:\n" + "\n".join(found)
