"""The Slicer module's files that cannot run outside Slicer, checked statically: the Qt Designer panel
against the widget code and the parameter node, the CMake lists against the files on disk, the
Extensions Index entry against its schema, and the import rules (no torch at Slicer start-up)."""

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import SimpleITK as sitk

from conftest import REPOSITORY
import MSDSegmentLogicTests as selftests
from MSDSegmentLib import background, dependencies, worker
from MSDSegmentLib.errors import MSDSegmentError
from MSDSegmentLib.imageio import looks_like_ct, validate_channels

MODULE = os.path.join(REPOSITORY, "MSDSegment")
MODULE_SCRIPT = os.path.join(MODULE, "MSDSegment.py")
APPLICATION_SCRIPT = os.path.join(MODULE, "MSDSegmentLib", "application.py")
UI_FILE = os.path.join(MODULE, "Resources", "UI", "MSDSegment.ui")

# What the widget code relies on: widget name -> (class, node types of a node selector).
EXPECTED_WIDGETS = {
    "taskComboBox": ("QComboBox", None),
    "taskDescriptionLabel": ("QLabel", None),
    "inputVolumeSelector": ("qMRMLNodeComboBox", ["vtkMRMLScalarVolumeNode"]),
    "adcVolumeLabel": ("QLabel", None),
    "adcVolumeSelector": ("qMRMLNodeComboBox", ["vtkMRMLScalarVolumeNode"]),
    "deviceComboBox": ("QComboBox", None),
    "testTimeMirroringCheckBox": ("QCheckBox", None),
    "keepLargestCheckBox": ("QCheckBox", None),
    "outputSegmentationSelector": ("qMRMLNodeComboBox", ["vtkMRMLSegmentationNode"]),
    "show3DCheckBox": ("QCheckBox", None),
    "allFramesCheckBox": ("QCheckBox", None),
    "batchVolumesLabel": ("QLabel", None),
    "batchVolumesComboBox": ("qMRMLCheckableNodeComboBox", ["vtkMRMLScalarVolumeNode"]),
    "smoothingSliderWidget": ("ctkSliderWidget", None),
    "segmentButton": ("QPushButton", None),
    "progressBar": ("QProgressBar", None),
    "statusLabel": ("QLabel", None),
    "volumesTable": ("QTableWidget", None),
    "inputsCollapsibleButton": ("ctkCollapsibleButton", None),
    "optionsCollapsibleButton": ("ctkCollapsibleButton", None),
    "outputsCollapsibleButton": ("ctkCollapsibleButton", None),
}


# ---------------------------------------------------------------------------------------------
# The panel (.ui) and the widget code


@pytest.fixture(scope="module")
def ui():
    return ElementTree.parse(UI_FILE).getroot()


def widgets(ui):
    return {widget.get("name"): widget for widget in ui.iter("widget")}


def string_property(widget, name):
    prop = widget.find(f"property[@name='{name}']")
    return None if prop is None else prop.findtext("string")


def node_types(widget):
    prop = widget.find("property[@name='nodeTypes']")
    return None if prop is None else [item.text for item in prop.iter("string")]


def module_source():
    with open(MODULE_SCRIPT, encoding="utf-8") as stream:
        return stream.read()


def parameter_fields():
    """Field name -> annotation source of the parameterNodeWrapper class in MSDSegment.py."""
    tree = ast.parse(module_source())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "MSDSegmentParameterNode")
    return {item.target.id: ast.unparse(item.annotation) for item in cls.body if isinstance(item, ast.AnnAssign)}


def test_every_widget_the_code_uses_exists_with_its_class(ui):
    found = widgets(ui)
    used = set(re.findall(r"self\.ui\.(\w+)", module_source()))
    assert used, "the widget code uses no self.ui names?"
    assert used <= set(found), f"used in MSDSegment.py but not in the .ui: {sorted(used - set(found))}"
    assert used <= set(EXPECTED_WIDGETS), f"update EXPECTED_WIDGETS for: {sorted(used - set(EXPECTED_WIDGETS))}"
    for name, (class_name, types) in EXPECTED_WIDGETS.items():
        assert found[name].get("class") == class_name, name
        if types is not None:
            assert node_types(found[name]) == types, name


def test_node_selectors_exclude_label_maps_and_allow_creating_output(ui):
    found = widgets(ui)
    for name in ("inputVolumeSelector", "adcVolumeSelector"):
        assert found[name].find("property[@name='showChildNodeTypes']").findtext("bool") == "false", name
    output = found["outputSegmentationSelector"]
    assert output.find("property[@name='noneEnabled']").findtext("bool") == "true"
    assert string_property(output, "noneDisplay") == "Create new segmentation"


def test_every_mrml_widget_gets_the_scene(ui):
    root_name = ui.find("widget").get("name")
    assert ui.find("widget").get("class") == "qMRMLWidget"
    receivers = {connection.findtext("receiver") for connection in ui.iter("connection")
                 if connection.findtext("sender") == root_name
                 and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, widget in widgets(ui).items()
                    if widget.get("class").startswith("qMRML") and name != root_name}
    assert mrml_widgets and mrml_widgets == receivers


def test_custom_widgets_are_declared(ui):
    declared = {custom.findtext("class") for custom in ui.iter("customwidget")}
    used = {widget.get("class") for widget in ui.iter("widget") if not widget.get("class").startswith("Q")}
    assert used <= declared, sorted(used - declared)


def test_every_parameter_is_bound_to_one_widget_of_the_right_kind(ui):
    fields = parameter_fields()
    bound = {}
    for name, widget in widgets(ui).items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is not None:
            assert parameter not in bound, f"{parameter} bound twice"
            bound[parameter] = widget
    # connectGui has no connector for a checkable node combo box: that parameter is kept in step by the widget code.
    manual = {"batchVolumes": "batchVolumesComboBox"}
    assert set(bound) == set(fields) - set(manual), f"fields {sorted(fields)} vs bound widgets {sorted(bound)}"
    for parameter, name in manual.items():
        assert widgets(ui)[name].get("class") == "qMRMLCheckableNodeComboBox"
        assert f"self._parameterNode.{parameter} = list(self.ui.{name}.checkedNodes())" in module_source()
    for parameter, annotation in fields.items():
        if parameter in manual:
            continue
        widget = bound[parameter]
        if annotation.startswith("vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox" and node_types(widget) == [annotation], parameter
        elif annotation == "bool":
            assert widget.get("class") == "QCheckBox", parameter
        elif annotation.startswith("Annotated[float"):  # a bounded float: a slider (parameterNodeWrapper needs bounds)
            assert widget.get("class") == "ctkSliderWidget" and "WithinRange" in annotation, parameter
        else:  # a str with Choice, or an Enum: both need a plain combo box
            assert widget.get("class") == "QComboBox", parameter


def test_parameter_choices_are_the_catalogue_tasks():
    assert "Choice(list(modelcard.TASKS))" in parameter_fields()["task"]


def test_module_never_imports_torch_at_start_up():
    """Slicer imports MSDSegment.py at start-up: nothing heavy may be imported at its top level."""
    tree = ast.parse(module_source())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert not top_level & {"torch", "monai", "scipy", "skimage", "nibabel"}, top_level
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from MSDSegmentLib import background, dependencies, modelcard, mrml, worker\n"
              "modelcard.catalogue()\n"
              "heavy = sorted(m for m in ('torch', 'monai', 'scipy') if m in sys.modules)\n"
              "assert not heavy, heavy\n") % MODULE
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_engine_package_imports_without_slicer():
    """Everything in MSDSegmentLib but mrml.py and application.py works where slicer, vtk and qt do not exist."""
    names = sorted(name[:-3] for name in os.listdir(os.path.join(MODULE, "MSDSegmentLib"))
                   if name.endswith(".py") and name not in ("mrml.py", "application.py", "__main__.py"))
    script = ("import sys; sys.path.insert(0, %r)\n"
              "sys.modules['slicer'] = None; sys.modules['vtk'] = None; sys.modules['qt'] = None\n"
              "import importlib\n"
              "for name in %r: importlib.import_module('MSDSegmentLib.' + name)\n") % (MODULE, names)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Background process exchange and dependencies


def test_worker_command_is_accepted_by_the_worker():
    program = background.worker_program("python")
    assert program == ["python", "-m", "MSDSegmentLib.worker"]
    command = background.worker_command(program, "prostate", device="cpu", tta=True, keep_largest=False,
                                        models_dir="/models")
    parsed = worker.build_parser().parse_args(command[len(program):])
    assert (parsed.task, parsed.device, parsed.tta, parsed.no_largest, parsed.models_dir) == \
        ("prostate", "cpu", True, True, "/models")
    default = worker.build_parser().parse_args(background.worker_command([], "liver"))
    assert not default.tta and not default.no_largest and default.precision == "auto" and not default.standby
    assert worker.build_parser().parse_args(background.worker_command([], "liver", standby=True)).standby


def test_worker_events_are_parsed_and_other_output_ignored(capsys):
    worker.emit("progress", job=2, fraction=0.5, stage="Running network")
    worker.emit("failed", job=1, error="Unexpected error: RuntimeError: x", details="Traceback...", pid=7)
    print("a warning torch printed on standard output")
    lines = capsys.readouterr().out.splitlines()
    events = [background.parse_event(line) for line in lines]
    assert events[0] == {"event": "progress", "job": 2, "fraction": 0.5, "stage": "Running network"}
    assert events[1]["event"] == "failed" and events[1]["error"].startswith("Unexpected error") and events[2] is None
    assert background.parse_event(worker.EVENT_PREFIX + "{not json") is None
    job = json.loads(background.job_line(3, ["a.nrrd"], "out.nrrd"))
    assert job == {"job": 3, "inputs": ["a.nrrd"], "output": "out.nrrd"} and json.loads(background.END_LINE)["end"]


def test_outcome_report_counts_what_is_in_the_scene():
    outcome = background.Outcome(["A", "B", "C"], ["node A", None, "node C"], cancelled=False)
    outcome.errors[1] = MSDSegmentError("Unexpected error: RuntimeError: boom")
    outcome.warnings.append("C: The input does not look like CT")
    assert outcome.report().splitlines() == ["Done: 2 of 3 segmented.", "Failed: B: Unexpected error: RuntimeError: boom",
                                             "Warning: C: The input does not look like CT"]


def test_error_message_is_the_last_error_line():
    stderr = "msdsegment: warning: The input does not look like CT\nmsdsegment: error: Input not found: x.nrrd\n"
    assert background.error_message(stderr, 2) == "Input not found: x.nrrd"
    assert background.error_message("Traceback...\nMemoryError\n", 1) == "MemoryError"
    assert "exit code -9" in background.error_message("", -9)


def test_workspace_is_removed():
    workspace = background.Workspace()
    with open(workspace.output, "w") as stream:
        stream.write("x")
    workspace.remove()
    assert not os.path.exists(workspace.folder)


def test_requirements_are_checked_against_installed_versions(tmp_path):
    import numpy

    assert dependencies.requirement_lines() and all(" " not in line for line in dependencies.requirement_lines())
    assert any(line.startswith("monai") for line in dependencies.requirement_lines())
    path = tmp_path / "requirements.txt"
    path.write_text(f"# comment\nnumpy=={numpy.__version__}\nnumpy==0.0.1\nno-such-package-msdsegment\n\n")
    assert dependencies.unmet_requirements(str(path)) == ["numpy==0.0.1", "no-such-package-msdsegment"]


def test_gpu_status_is_read_without_importing_torch():
    import torch

    build = dependencies.torch_cuda_build()
    assert build == (torch.version.cuda or "")
    available, reason = dependencies.gpu_status()
    assert isinstance(available, bool) and reason and "\n" not in reason
    if not torch.cuda.is_available():
        assert not available or dependencies.nvidia_driver_present()


def test_phantom_for_the_slicer_self_test_is_a_valid_ct(tmp_path):
    image = sitk.ReadImage(selftests.write_phantom_ct(str(tmp_path / "phantom.nrrd")))
    validate_channels([image], ["CT"])
    assert looks_like_ct(image)


# ---------------------------------------------------------------------------------------------
# Extension packaging


def cmake_set(text, variable):
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)\s*\n", text, re.DOTALL)
    assert match, variable
    return match.group(1)


def cmake_items(text, variable):
    items = cmake_set(text, variable).split()
    return [item.replace("${MODULE_NAME}", "MSDSegment") for item in items]


@pytest.fixture(scope="module")
def module_cmake():
    with open(os.path.join(MODULE, "CMakeLists.txt"), encoding="utf-8") as stream:
        return re.sub(r"#[^\n]*", "", stream.read())


def test_every_listed_module_file_exists_and_every_file_is_listed(module_cmake):
    scripts = cmake_items(module_cmake, "MODULE_PYTHON_SCRIPTS")
    resources = [item for item in cmake_items(module_cmake, "MODULE_PYTHON_RESOURCES") if not item.startswith("$")]
    for item in scripts + resources:
        assert os.path.isfile(os.path.join(MODULE, item)), f"listed but missing: {item}"
    on_disk = {"MSDSegment.py"} | {f"MSDSegmentLib/{name}" for name in os.listdir(os.path.join(MODULE, "MSDSegmentLib"))
                                   if name.endswith(".py")}
    assert set(scripts) == on_disk, "the module's scripts (its tests are not shipped: MSDSegment/Testing)"
    globbed = re.findall(r"Resources/Models/\*\.(\w+)", module_cmake)
    for folder, _, names in os.walk(os.path.join(MODULE, "Resources")):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), MODULE).replace(os.sep, "/")
            if relative.startswith("Resources/Models/"):
                assert name.rsplit(".", 1)[-1] in globbed, f"model file not shipped: {relative}"
            else:
                assert relative in resources, f"resource not listed: {relative}"
    assert "WITH_GENERIC_TESTS" in module_cmake
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", module_cmake)
    assert re.search(r"if\(BUILD_TESTING\).*add_subdirectory\(\s*Testing\s*\).*endif", module_cmake, re.DOTALL)


def test_module_tests_are_registered_with_ctest():
    """The logic test bodies live where Slicer keeps a module's tests and ctest runs them inside Slicer."""
    tests = os.path.join(MODULE, "Testing")
    with open(os.path.join(tests, "CMakeLists.txt"), encoding="utf-8") as stream:
        assert re.search(r"add_subdirectory\(\s*Python\s*\)", stream.read())
    with open(os.path.join(tests, "Python", "CMakeLists.txt"), encoding="utf-8") as stream:
        registered = re.findall(r"slicer_add_python_unittest\(\s*SCRIPT\s+(\S+?)\s*\)", stream.read())
    assert registered == ["MSDSegmentModuleTest.py"]
    source = open(os.path.join(tests, "Python", "MSDSegmentModuleTest.py"), encoding="utf-8").read()
    assert "class MSDSegmentModuleTest(ScriptedLoadableModuleTest)" in source
    assert "bodies.TESTS + bodies.TRAINED_MODEL_TESTS" in source
    assert "MSDSegmentModuleTest.runLogicTests(self)" in method_source("MSDSegmentTest", "runTest")
    assert not os.path.exists(os.path.join(MODULE, "MSDSegmentLib", "selftests.py")), "one copy of each body"


def test_extension_metadata():
    with open(os.path.join(REPOSITORY, "CMakeLists.txt"), encoding="utf-8") as stream:
        text = re.sub(r"#[^\n]*", "", stream.read())
    values = {name: cmake_set(text, f"EXTENSION_{name}").strip().strip('"') for name in
              ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")}
    assert values["HOMEPAGE"] == "https://github.com/msdsegment/SlicerMSDSegment"
    assert values["CATEGORY"] == "Segmentation" and values["DEPENDS"] == "PyTorch"
    assert len(values["DESCRIPTION"]) > 80 and values["CONTRIBUTORS"]
    raw = "https://raw.githubusercontent.com/msdsegment/SlicerMSDSegment/main/"
    for url in [values["ICONURL"]] + values["SCREENSHOTURLS"].split():
        assert url.startswith(raw) and os.path.isfile(os.path.join(REPOSITORY, url[len(raw):])), url
    assert re.search(r"add_subdirectory\(\s*MSDSegment\s*\)", text)
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(os.path.join(MODULE, "Resources", "Icons", "MSDSegment.png")) as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


SCHEMA_PROPERTIES = {  # slicer-extension-catalog-entry-schema-v1.0.1.json: property -> type
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}


def test_extensions_index_entry_follows_the_schema():
    with open(os.path.join(REPOSITORY, "MSDSegment.json"), encoding="utf-8") as stream:
        entry = json.load(stream)
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(SCHEMA_PROPERTIES)
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]), key
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry.get("tier", 5) in (1, 3, 5) and entry.get("scm_type", "git") in ("git", "local")
    # The index asks that the repository's name contain "Slicer"; which repository it is: test_release.py.
    assert "slicer" in entry["scm_url"].removesuffix(".git").rsplit("/", 1)[-1].lower()


def test_shipped_terminology_is_generated_from_the_bundled_cards():
    """The .term.json holds exactly the codes of the cards (regenerated by `python -m Training export`)."""
    from MSDSegmentLib import modelcard, terminology

    with open(terminology.TERMINOLOGY_FILE, encoding="utf-8") as stream:
        assert stream.read() == terminology.context_text(modelcard.catalogue()), \
            "out of date: run terminology.write_context_file(modelcard.catalogue())"


def test_self_test_runs_each_test_once():
    names = selftests.TESTS + selftests.TRAINED_MODEL_TESTS
    assert len(names) == len(set(names)), "a test listed twice"
    assert all(callable(getattr(selftests, name)) for name in names)
    assert set(names) == {name for name in dir(selftests) if name.startswith("test_")}


def method_source(class_name, method_name, path=MODULE_SCRIPT):
    with open(path, encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    method = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == method_name)
    return ast.unparse(method)


def test_background_run_releases_its_process_and_cancel_closes_stdin():
    """Every signal connected to the QProcess is disconnected and the process deleted when it ends (or fails to
    start): PythonQt's connections would otherwise keep each run, its process and its input nodes alive. Stop
    closes the engine's standard input before killing the launcher (the engine, a child of the launcher, exits
    when its standard input closes)."""
    with open(APPLICATION_SCRIPT, encoding="utf-8") as stream:
        source = stream.read()
    connected = set(re.findall(r"self\.process\.connect\(([^)]*\))", source))
    disconnected = set(re.findall(r"self\.process\.disconnect\(([^)]*\))", source))
    assert connected and connected == disconnected
    release = method_source("EngineProcess", "release", APPLICATION_SCRIPT)
    assert "deleteLater()" in release and "self.process = None" in release
    assert "self.release()" in method_source("EngineProcess", "finished", APPLICATION_SCRIPT)
    assert "self.release()" in method_source("EngineProcess", "start", APPLICATION_SCRIPT)
    stop = method_source("EngineProcess", "stop", APPLICATION_SCRIPT)
    assert stop.index("closeWriteChannel()") < stop.index("kill()")


def test_failures_show_the_whole_output_and_the_table_is_cleared():
    finished = method_source("MSDSegmentWidget", "onFinished")
    assert "detailedText=" in finished and "outcome.report()" in finished and "logging.error" in finished
    assert "self.showVolumes(None)" in method_source("MSDSegmentWidget", "onSegmentButton")


def test_every_panel_run_goes_through_the_background_process():
    """The panel starts every run (one volume, a batch, every frame) with waitForCompletion=False: the engine
    and torch stay out of Slicer's process; nothing in the module segments in Slicer's process for the panel."""
    segment = method_source("MSDSegmentWidget", "onSegmentButton")
    calls = re.findall(r"self\.logic\.(segment\w*)\(", segment)
    assert sorted(calls) == ["segmentMany", "segmentSequence"]
    assert "waitForCompletion=False" in segment
    widget = ast.unparse(next(node for node in ast.parse(module_source()).body
                              if isinstance(node, ast.ClassDef) and node.name == "MSDSegmentWidget"))
    assert "mrml.segment" not in widget, "the panel segments in Slicer's process"
    assert "startInBackground" in method_source("MSDSegmentLogic", "segmentMany")
    assert "startInBackground" in method_source("MSDSegmentLogic", "segmentSequence")
    assert "self.segmentMany(" in method_source("MSDSegmentLogic", "segment")


def test_panel_state_is_never_read_from_widget_visibility():
    """What a click runs comes from the parameter node: no widget's visibility or enabled state is read."""
    tree = ast.parse(module_source())
    reads = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and node.attr in ("visible", "isVisible", "enabled", "isEnabled") and isinstance(node.ctx, ast.Load)]
    assert not reads, f"widget state read: {reads}"
    choice = method_source("MSDSegmentWidget", "panelChoice")
    assert "self.ui" not in choice and "node.allFrames" in choice and "mrml.PanelChoice(" in choice
    assert "self.panelChoice()" in method_source("MSDSegmentWidget", "onSegmentButton")
    assert "self.panelChoice()" in method_source("MSDSegmentWidget", "updateGUIFromParameterNode")


def test_a_task_that_takes_no_extra_volumes_disables_also_segment_and_says_why():
    """The widget shows what mrml.PanelChoice decides (tested on a real scene in MSDSegmentLogicTests)."""
    update = method_source("MSDSegmentWidget", "updateGUIFromParameterNode")
    assert "self.ui.batchVolumesLabel, self.ui.batchVolumesComboBox" in update
    assert "widget.enabled = not choice.batch_unavailable" in update
    assert "widget.toolTip = choice.batch_unavailable" in update
    segment = method_source("MSDSegmentWidget", "onSegmentButton")
    assert "[] if choice.batch_unavailable else" in segment and "node.batchVolumes" in segment
    assert "checkedNodes" not in segment, "the volumes to segment come from the parameter node"
    assert "list[vtkMRMLScalarVolumeNode]" in parameter_fields()["batchVolumes"]


def test_show_3d_follows_the_user_and_the_slider():
    """Show 3D reacts to the user's click only (restoring a scene sets the box: no surfaces are built), the slider
    rebuilds shown surfaces once it is let go, and a sequence has the option disabled with the reason."""
    setup = method_source("MSDSegmentWidget", "setup")
    assert "show3DCheckBox.connect('clicked(bool)', self.onShow3DClicked)" in setup and "toggled" not in setup
    assert "smoothingSliderWidget.connect('valueChanged(double)', self.onSmoothingChanged)" in setup
    assert "smoothingSliderWidget.tracking = False" in setup
    assert "updateSurfaceSmoothing" in method_source("MSDSegmentWidget", "onSmoothingChanged")
    update = method_source("MSDSegmentWidget", "updateGUIFromParameterNode")
    assert "self.ui.show3DCheckBox.enabled = not choice.surfaces_unavailable" in update
    assert "self.ui.show3DCheckBox.toolTip = choice.surfaces_unavailable" in update
    assert "is_sequence_output" in method_source("MSDSegmentWidget", "onFinished")


def test_reload_reloads_the_engine_package_in_dependency_order():
    """After Reload the modules share one copy of each error class (alphabetical order would re-execute
    `engine` before `errors`, and the engine's errors would escape their handlers). Run in another
    interpreter: reloading here would give this test session's modules new classes."""
    reload = method_source("MSDSegmentWidget", "onReload")
    assert "MSDSegmentLib.reload_modules()" in reload and "ScriptedLoadableModuleWidget.onReload(self)" in reload
    script = ("import sys, importlib; sys.path.insert(0, %r)\n"
              "import MSDSegmentLib\n"
              "from MSDSegmentLib import background, cli, engine, errors, imageio, worker\n"
              "def same():\n"
              "    m = sys.modules\n"
              "    return all(getattr(m[name], cls) is getattr(m['MSDSegmentLib.errors'], cls)\n"
              "               for name in ('MSDSegmentLib.engine', 'MSDSegmentLib.background', 'MSDSegmentLib.cli')\n"
              "               for cls in ('MSDSegmentError',)) and \\\n"
              "        m['MSDSegmentLib.engine'].Cancelled is m['MSDSegmentLib.errors'].Cancelled\n"
              "MSDSegmentLib.reload_modules()\n"
              "assert same(), 'dependency order'\n"
              "for name in sorted(n for n in sys.modules if n.startswith('MSDSegmentLib.')):\n"
              "    importlib.reload(sys.modules[name])\n"
              "print('alphabetical order keeps the classes:', same())\n") % MODULE
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "alphabetical order keeps the classes: False" in result.stdout, "the check cannot tell the orders apart"
def test_terminology_is_loaded_at_start_up():
    assert 'slicer.app.connect("startupCompleted()", application.load_terminology)' in module_source()
    with open(APPLICATION_SCRIPT, encoding="utf-8") as stream:
        assert "LoadTerminologyFromFile(terminology.TERMINOLOGY_FILE)" in stream.read()
