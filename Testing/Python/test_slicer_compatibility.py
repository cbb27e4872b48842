"""What a real Slicer 5.8 to 5.12 needs of the module, checked without Slicer: the code parses as Python 3.9
(Slicer 5.8) and uses no newer built-in, the Slicer requirements install next to the torch, numpy and scipy
that Slicer and the PyTorch extension put there (a pip dry run for Python 3.9 and 3.12), and the shipped
weights load under the oldest MONAI those requirements allow."""

import ast
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from packaging.version import Version

from conftest import REPOSITORY
from MSDSegmentLib import dependencies, modelcard

MODULE = os.path.join(REPOSITORY, "MSDSegment")
CACHE = os.path.join(REPOSITORY, ".cache")

# (Python, what is installed before MSDSegment's requirements): Slicer 5.8 ships Python 3.9, numpy 1.26.4 and
# scipy 1.13.1; 5.10 Python 3.12, numpy 2.0.2, scipy 1.13.1; 5.12 Python 3.12, numpy 2.4.6, scipy 1.17.1
# (SuperBuild/External_python-*.cmake at each tag). torch: the oldest the module accepts and the newest for
# that Python.
SLICER_ENVIRONMENTS = {
    "Slicer 5.8, old torch": ("3.9", {"numpy": "1.26.4", "scipy": "1.13.1", "torch": "2.2.2"}),
    "Slicer 5.8, newest torch": ("3.9", {"numpy": "1.26.4", "scipy": "1.13.1", "torch": "2.8.0"}),
    "Slicer 5.10": ("3.12", {"numpy": "2.0.2", "scipy": "1.13.1", "torch": "2.5.1"}),
    "Slicer 5.12": ("3.12", {"numpy": "2.4.6", "scipy": "1.17.1", "torch": "2.13.0"}),
}


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


@pytest.mark.parametrize("environment", list(SLICER_ENVIRONMENTS))
def test_slicer_requirements_install_beside_what_slicer_has(environment, tmp_path):
    """pip, as the module runs it (requirements + constraints pinning what is installed), resolves for that
    Python and keeps torch, numpy and scipy: nothing that Slicer or the PyTorch extension chose is replaced."""
    python, installed = SLICER_ENVIRONMENTS[environment]
    stubs = tmp_path / "installed"
    stubs.mkdir()
    for name, version in installed.items():  # "+slicer": preferred to PyPI's file of the same version
        stub_wheel(str(stubs), name, version + "+slicer")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(dependencies.constraints_text(installed))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--only-binary=:all:", "--python-version", python, "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux2014_x86_64", "--target", str(tmp_path / "target"),
               "--find-links", str(stubs), "--report", str(report)]
    command += dependencies.pip_arguments(str(constraints))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode and re.search(r"NewConnectionError|Temporary failure in name resolution|Network is "
                                       r"unreachable|ProxyError", result.stderr):
        pytest.skip("PyPI cannot be reached from here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    for name, version in installed.items():
        assert chosen.get(name, version + "+slicer") == version + "+slicer", f"{name} would be replaced: {chosen}"
    assert "monai" in chosen, chosen


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
