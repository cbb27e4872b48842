"""What the engine needs that Slicer may not have: PyTorch, the packages in Resources/requirements.txt,
and a CUDA GPU. Everything here is found out without importing torch (that takes seconds and must not
happen at Slicer's start-up)."""

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                            "requirements.txt")
# Asked of the PyTorch extension, which picks the CUDA or CPU build (the engine's pyproject.toml says the same).
# The networks come from MONAI, and every MONAI release needs either numpy < 2 (MONAI 1.4) or torch >= 2.4.1
# (MONAI 1.5 and later, which allow numpy 2; torch before 2.3 cannot use numpy 2 at all). Slicer 5.8 ships
# numpy 1.26, Slicer 5.10 and later numpy 2: there the oldest torch that can work is 2.4.1.
TORCH_REQUIREMENT = ">=2.2"
TORCH_REQUIREMENT_WITH_NUMPY_2 = ">=2.4.1"
# The last PyTorch built for macOS on Intel processors (newer releases are for Apple silicon only).
LAST_TORCH_FOR_INTEL_MACS = "2.2.2"
# Packages that Slicer or the PyTorch extension installed: installing the requirements must never replace them.
KEEP_INSTALLED = ("torch", "numpy", "scipy", "SimpleITK")


def is_installed(module_name):
    return importlib.util.find_spec(module_name) is not None


def requirement_lines(path=REQUIREMENTS):
    with open(path, encoding="utf-8") as stream:
        lines = [line.split("#", 1)[0].strip() for line in stream]
    return [line for line in lines if line]


def is_satisfied(requirement):
    """Whether an installed distribution satisfies one requirement line (name and version specifier)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no `packaging`: only check that the distribution is there
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        specifier = None
    else:
        parsed = Requirement(requirement)
        name, specifier = parsed.name, parsed.specifier
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return specifier is None or specifier.contains(version, prereleases=True)


def unmet_requirements(path=REQUIREMENTS):
    """Requirement lines of the file that the installed packages do not satisfy."""
    return [line for line in requirement_lines(path) if not is_satisfied(line)]


def major_version(version):
    return int(re.match(r"\d+", version).group(0))


def torch_requirement(numpy_version=None):
    """The torch versions that can run the engine beside this numpy (by default, the installed one)."""
    if numpy_version is None:
        numpy_version = installed_versions(("numpy",)).get("numpy", "1")
    return TORCH_REQUIREMENT_WITH_NUMPY_2 if major_version(numpy_version) >= 2 else TORCH_REQUIREMENT


def torch_needed():
    """Whether PyTorch is missing or older than the engine needs beside the installed numpy."""
    return not is_satisfied("torch" + torch_requirement())


def installation_problem(system=None, machine=None, numpy_version=None):
    """Why no PyTorch that can run the engine can be installed here, in one line with what to do; None when one
    can. Asked before anything is downloaded."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    requirement = torch_requirement(numpy_version)
    if system == "Darwin" and machine.lower() in ("x86_64", "amd64", "i386") and requirement != TORCH_REQUIREMENT:
        return (f"MSDSegment cannot run in this Slicer on an Intel Mac: beside its numpy 2 it needs PyTorch "
                f"{requirement}, and the last PyTorch for Intel Macs is {LAST_TORCH_FOR_INTEL_MACS}; use Slicer 5.8 "
                f"on this computer, or a newer Slicer on Apple silicon, Windows or Linux.")
    return None


def installed_versions(names=KEEP_INSTALLED):
    """{distribution: version} of those of `names` that are installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def constraints_text(versions):
    """A pip constraints file pinning these packages: pip then picks a MONAI that fits the torch and numpy
    already there instead of replacing them (a newer MONAI may ask for a newer torch than the one installed)."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def pip_arguments(constraints_path, requirements_path=REQUIREMENTS):
    """Arguments after `pip install` for the requirements, with the installed packages pinned."""
    return ["-r", requirements_path, "-c", constraints_path]


def torch_cuda_build():
    """CUDA version the installed torch was built for ('' for a CPU build, None if torch is absent).

    Read from torch/version.py rather than by importing torch.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError:
        return ""
    match = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else ""


def nvidia_driver_present():
    if platform.system() == "Darwin":
        return False
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def gpu_status():
    """(available, reason): whether the GPU choice can work, and if not, why, in one line."""
    if platform.system() == "Darwin":
        return False, "CUDA GPUs are not supported on macOS"
    if not nvidia_driver_present():
        return False, "No NVIDIA GPU driver found on this computer"
    cuda = torch_cuda_build()
    if cuda is None:
        return True, "PyTorch will be installed with CUDA support on first use"
    if not cuda:
        return False, "The installed PyTorch is a CPU-only build (reinstall it with CUDA from the PyTorch module)"
    return True, f"NVIDIA GPU with PyTorch built for CUDA {cuda}"
