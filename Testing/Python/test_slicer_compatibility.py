"""What a real Slicer 5.8 to 5.12 needs of the module, checked without Slicer: the code parses as Python 3.9
(Slicer 5.8) and uses no newer built-in, the Slicer requirements install next to the torch, numpy and scipy
that Slicer and the PyTorch extension put there (pip's resolver for every supported Slicer and every torch that
may be installed beside it), and the shipped
weights load under the oldest MONAI those requirements allow."""

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPOSITORY
from MSDSegmentLib import dependencies, modelcard

MODULE = os.path.join(REPOSITORY, "MSDSegment")
CACHE = os.path.join(REPOSITORY, ".cache")

# What each supported Slicer ships (SuperBuild/External_python-*.cmake at v5.8.1, v5.10.0, v5.12.3): its Python,
# numpy and scipy.
SLICERS = {
    "Slicer 5.8": ("3.9", {"numpy": "1.26.4", "scipy": "1.13.1"}),
    "Slicer 5.10": ("3.12", {"numpy": "2.0.2", "scipy": "1.13.1"}),
    "Slicer 5.12": ("3.12", {"numpy": "2.4.6", "scipy": "1.17.1"}),
}
# Every torch the PyTorch extension may install for that Python, from the oldest the module accepts on any Slicer
# to the newest on PyPI (2.2.2 is also the newest for Intel Macs; 2.8.0 the newest for Python 3.9).
TORCH_RELEASES = ["2.2.0", "2.2.1", "2.2.2", "2.3.0", "2.3.1", "2.4.0", "2.4.1", "2.5.0", "2.5.1", "2.6.0", "2.7.0",
                  "2.7.1", "2.8.0", "2.9.0", "2.9.1", "2.10.0", "2.11.0", "2.12.0", "2.12.1", "2.13.0", "2.14.0",
                  "2.14.1", "2.15.0"]
TORCH_FOR_PYTHON = {"3.9": TORCH_RELEASES[:TORCH_RELEASES.index("2.8.0") + 1], "3.12": TORCH_RELEASES}


def module_files():
    for folder, _, names in os.walk(MODULE):
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


class NewerThan39(ast.NodeVisitor):
    """Python 3.10+ that parses under 3.9: `X | Y` in evaluated annotations, zip(strict=), dataclass(slots=)."""

    def __init__(self, postponed):
        self.postponed = postponed  # `from __future__ import annotations`: annotations are never evaluated
        self.problems = []

    def check_annotation(self, annotation):
        if annotation is not None and not self.postponed:
            for node in ast.walk(annotation):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                    self.problems.append(f"line {node.lineno}: X | Y annotation")

    def visit_arg(self, node):
        self.check_annotation(node.annotation)

    def visit_FunctionDef(self, node):
        self.check_annotation(node.returns)
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self.check_annotation(node.annotation)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        keywords = {keyword.arg for keyword in node.keywords}
        if (name == "zip" and "strict" in keywords) or (name == "dataclass" and keywords & {"slots", "kw_only"}):
            self.problems.append(f"line {node.lineno}: {name}({', '.join(sorted(keywords))})")
        self.generic_visit(node)


@pytest.mark.parametrize("path", list(module_files()), ids=lambda path: os.path.relpath(path, MODULE))
def test_module_code_runs_on_python_39(path):
    with open(path, encoding="utf-8") as stream:
        source = stream.read()
    tree = ast.parse(source, path, feature_version=(3, 9))
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    visitor = NewerThan39(postponed)
    visitor.visit(tree)
    assert not visitor.problems, visitor.problems


def test_engine_package_declares_the_pythons_slicer_has():
    with open(os.path.join(REPOSITORY, "pyproject.toml"), encoding="utf-8") as stream:
        text = stream.read()
    assert re.search(r'requires-python\s*=\s*">=3\.9"', text)
    assert f'"torch{dependencies.TORCH_REQUIREMENT}"' in text, "pyproject.toml and the module ask for one torch"


def stub_wheel(folder, name, version):
    """An empty wheel that stands for a package already installed in Slicer (pip sees its name and version)."""
    stem = f"{name}-{version}"
    path = os.path.join(folder, f"{stem}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def resolve(python, installed, folder):
    """pip's resolver, as the module runs it (requirements + constraints pinning what is installed), for that
    Python: (True, {name: version chosen}) or (False, pip's last error line)."""
    stubs = os.path.join(folder, "installed")
    os.makedirs(stubs)
    for name, version in installed.items():  # "+slicer": preferred to PyPI's file of the same version
        stub_wheel(stubs, name, version + "+slicer")
    constraints = os.path.join(folder, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as stream:
        stream.write(dependencies.constraints_text(installed))
    report = os.path.join(folder, "report.json")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--only-binary=:all:", "--python-version", python, "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux2014_x86_64", "--target", os.path.join(folder, "target"),
               "--find-links", stubs, "--report", report]
    command += dependencies.pip_arguments(constraints)
    # As in a user's Slicer: no pip configuration of this machine's (a global constraints file would cap torch).
    environment = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    if result.returncode and re.search(r"NewConnectionError|Temporary failure in name resolution|Network is "
                                       r"unreachable|ProxyError", result.stderr):
        pytest.skip("PyPI cannot be reached from here: " + result.stderr.strip().splitlines()[-1])
    if result.returncode:
        return False, (result.stderr.strip().splitlines() or ["pip failed"])[-1]
    with open(report, encoding="utf-8") as stream:
        return True, {item["metadata"]["name"].lower(): item["metadata"]["version"]
                      for item in json.load(stream)["install"]}


@pytest.mark.parametrize("slicer", list(SLICERS))
def test_every_torch_the_pytorch_extension_may_install_resolves_exactly_where_the_module_accepts_it(slicer,
                                                                                                    tmp_path):
    """For each torch that may be installed beside this Slicer's Python, numpy and scipy: where the module accepts
    that torch, pip resolves the requirements without replacing torch, numpy or scipy and picks a MONAI; where it
    does not, pip finds no solution either, so the module's one-line answer is neither too strict nor too lax."""
    python, shipped = SLICERS[slicer]
    requirement = SpecifierSet(dependencies.torch_requirement(shipped["numpy"]))

    def check(torch_version):
        installed = dict(shipped, torch=torch_version)
        return torch_version, resolve(python, installed, str(tmp_path / torch_version))

    with ThreadPoolExecutor(max_workers=4) as pool:  # each dry run waits mostly on the package index
        outcomes = dict(pool.map(check, TORCH_FOR_PYTHON[python]))
    wrong = []
    for torch_version, (resolved, chosen) in outcomes.items():
        accepted = torch_version in requirement
        if accepted != resolved:
            wrong.append(f"torch {torch_version}: module {'accepts' if accepted else 'refuses'}, pip: {chosen}")
        elif resolved:
            installed = dict(shipped, torch=torch_version)
            replaced = [name for name, version in installed.items()
                        if chosen.get(name, version + "+slicer") != version + "+slicer"]
            if replaced or "monai" not in chosen:
                wrong.append(f"torch {torch_version}: replaces {replaced} or no MONAI: {chosen}")
    assert not wrong, wrong
    assert any(resolved for resolved, _ in outcomes.values()), "no torch at all can run on " + slicer


@pytest.mark.parametrize("slicer", list(SLICERS))
def test_an_intel_mac_is_told_in_one_line_before_anything_is_downloaded(slicer):
    """PyTorch stopped at 2.2.2 for Intel Macs: enough beside Slicer 5.8's numpy 1.26, not beside numpy 2."""
    numpy_version = SLICERS[slicer][1]["numpy"]
    problem = dependencies.installation_problem("Darwin", "x86_64", numpy_version)
    if dependencies.LAST_TORCH_FOR_INTEL_MACS in SpecifierSet(dependencies.torch_requirement(numpy_version)):
        assert problem is None
    else:
        assert problem and "\n" not in problem and "Slicer 5.8" in problem, problem
    for system, machine in (("Darwin", "arm64"), ("Windows", "AMD64"), ("Linux", "x86_64")):
        assert dependencies.installation_problem(system, machine, numpy_version) is None


def test_the_torch_asked_for_follows_the_numpy_installed():
    assert dependencies.torch_requirement("1.26.4") == dependencies.TORCH_REQUIREMENT == ">=2.2"
    assert dependencies.torch_requirement("2.0.2") == dependencies.torch_requirement("2.4.6") == ">=2.4.1"


def oldest_allowed(package):
    for line in dependencies.requirement_lines():
        match = re.match(rf"{package}>=([0-9.]+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no lower bound for {package} in {dependencies.REQUIREMENTS}")


FORWARD_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import monai
from MSDSegmentLib import modelcard
torch.manual_seed(0)
outputs = {"monai": monai.__version__}
for task, card in modelcard.catalogue().items():
    for stage in card.stages:
        network = modelcard.load_stage_network(stage)  # strict: every tensor must match by name and shape
        x = torch.randn(1, stage.network["in_channels"], *stage.patch_size, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            outputs[stage.weights] = network(x)[0, :, ::4, ::4, ::4].numpy().tolist()
print(__import__("json").dumps(outputs))
"""


def test_shipped_weights_load_and_agree_under_the_oldest_monai_allowed():
    """The requirements allow MONAI from their lower bound: the shipped state_dicts load into that version's
    networks and give the same outputs as under the MONAI installed here."""
    cards = modelcard.catalogue()
    if not cards or any(modelcard.missing_weights(card) for card in cards.values()):
        pytest.skip("no bundled weights")
    version = oldest_allowed("monai")
    target = os.path.join(CACHE, f"monai-{version}")
    if not os.path.isdir(os.path.join(target, "monai")):
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                                 f"monai=={version}"], capture_output=True, text=True, timeout=600)
        if result.returncode:
            pytest.skip(f"monai=={version} could not be installed here: {result.stderr.strip()[-300:]}")
    outputs = []
    for extra in ([target], []):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(extra + [MODULE]))
        result = subprocess.run([sys.executable, "-c", FORWARD_SCRIPT, MODULE], capture_output=True, text=True,
                                env=environment, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(json.loads(result.stdout))
    oldest, current = outputs
    assert Version(oldest.pop("monai")) == Version(version) != Version(current.pop("monai"))
    assert oldest.keys() == current.keys()
    for weights in oldest:
        assert np.allclose(oldest[weights], current[weights], atol=1e-4), weights
