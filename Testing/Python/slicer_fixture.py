"""A real MRML scene outside the Slicer application (slicer-core), for the module's logic tests.

`SlicerSession` builds a vtkMRMLScene, a vtkSlicerApplicationLogic and the module logics the module
uses, registers them the way Slicer does, keeps Python references to all of them (VTK objects die
with their last reference), and publishes `slicer.mrmlScene` and `slicer.modules.<name>.logic()`
so that slicer.util helpers work. Only the non-Qt part of Slicer exists here: nothing creates
subject hierarchy items for new nodes automatically, and no .term.json terminology files ship.
"""

import shutil
import tempfile
import types

import pytest


class SlicerSession:
    LOGICS = (  # (module name, logic class name); Colors first (Volumes asks the application for it)
        ("Colors", "vtkSlicerColorLogic"),
        ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
        ("Volumes", "vtkSlicerVolumesLogic"),
        ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
        ("Sequences", "vtkSlicerSequencesLogic"),
    )

    def __init__(self):
        import slicer

        self.slicer = slicer
        self.share = tempfile.mkdtemp(prefix="slicer-share-")  # empty: no default colour files to load
        self.scene = slicer.vtkMRMLScene()
        self.application = slicer.vtkSlicerApplicationLogic()
        self.application.SetHomeDirectory(self.share)
        self.application.SetShareDirectory(self.share)
        self.application.SetTemporaryPath(self.share)
        self.application.SetMRMLScene(self.scene)
        self.logics = {}
        for name, class_name in self.LOGICS:
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.application)
            self.application.SetModuleLogic(name, logic)
            logic.SetMRMLScene(self.scene)  # registers the module's node classes in the scene
            self.logics[name] = logic
        # Terminologies: used to parse entries only; attaching it to a scene would look for .term.json files.
        self.logics["Terminologies"] = slicer.vtkSlicerTerminologiesModuleLogic()

    def publish(self):
        """Make this the scene and the modules that `slicer.util` sees."""
        self.slicer.mrmlScene = self.scene
        self.slicer.modules = types.SimpleNamespace(**{
            name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in self.logics.items()
        })
        return self

    def load_volume(self, path, name):
        node = self.logics["Volumes"].AddArchetypeVolume(path, name, 0)
        if node is None:
            raise RuntimeError(f"Slicer could not load {path}")
        return node

    def close(self):
        self.scene.Clear(1)
        for logic in self.logics.values():
            if logic.GetMRMLScene() is not None:
                logic.SetMRMLScene(None)
        self.application.SetMRMLScene(None)
        shutil.rmtree(self.share, ignore_errors=True)


@pytest.fixture
def slicer_session():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    session = SlicerSession().publish()
    yield session
    session.close()


@pytest.fixture
def new_slicer_scene():
    """A factory of further, independent scenes (for reloading saved files into a fresh scene)."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    sessions = []

    def make():
        sessions.append(SlicerSession())
        return sessions[-1].scene

    yield make
    for session in sessions:
        session.close()
