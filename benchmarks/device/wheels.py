"""Checks the wheels the device run carries, after ``make device-wheels`` downloaded them:

    python -m benchmarks.device.wheels [.whl]

- one wheel per pin of benchmarks/device/wheels.txt, at that version, and nothing else (two
  versions of one package stop the device's whole install);
- every requirement of every carried wheel (for Python 3.12 on Linux, extras left out) is carried
  or in the image (benchmarks/device/image-packages.txt), at a version that satisfies it where the
  image's version is known;
- what travels stays under the device tool's 64 MiB: the repository's tracked and not-ignored
  files plus the wheels. Prints the sizes; exits non-zero on any problem.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIMIT_BYTES = 64 * 2**20  # the device tool's working-tree limit, carried folders included
# The device image's interpreter, for evaluating markers such as `python_version < "3.11"`.
DEVICE_MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}
DEVICE_MARKERS.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) by canonical name; a bare name: None."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version or None
    return found


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    wanted = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({**DEVICE_MARKERS, "extra": ""}):
                wanted.append(requirement)
    return wanted


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files of the repository: what the device tool sends."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def check(folder: Path) -> list[str]:
    problems = []
    wanted = pins(HERE / "wheels.txt")
    image = pins(HERE / "image-packages.txt")
    wheels = sorted(folder.glob("*.whl"))
    carried: dict[str, Version] = {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in carried:
            problems.append(f"two wheels of {name}: {carried[name]} and {version}")
        carried[name] = version
        if name not in wanted:
            problems.append(f"{wheel.name} is not in wheels.txt")
        elif Version(wanted[name]) != version:
            problems.append(f"{wheel.name}: wheels.txt pins {wanted[name]}")
    problems += [f"{name}=={version}: no wheel in {folder}" for name, version in wanted.items() if name not in carried]
    for wheel in wheels:
        for requirement in requirements(wheel):
            name = canonicalize_name(requirement.name)
            if name in carried:
                version = carried[name]
            elif name in image:
                version = Version(image[name]) if image[name] else None
            else:
                problems.append(f"{wheel.name} needs {requirement}: neither carried nor in the image")
                continue
            if version is not None and not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel.name} needs {requirement}, but {version} would be there")
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    total = wheel_bytes + travelling_bytes()
    print(f"{len(wheels)} wheels, {wheel_bytes / 2**20:.1f} MiB; with the repository {total / 2**20:.1f} MiB of 64")
    if total > LIMIT_BYTES:
        problems.append(f"{total} bytes would travel, over the device tool's {LIMIT_BYTES}")
    return problems


def main(argv: list[str]) -> int:
    problems = check(Path(argv[0]) if argv else REPO / ".whl")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
