"""Draw the Slicer extension's pictures: the module icon and a picture of the module panel.

    python scripts/slicer_pictures.py icon    # MSDSegment/Resources/Icons/MSDSegment.png (Pillow)
    python scripts/slicer_pictures.py panel   # Resources/Screenshots/MSDSegment-panel.png (PySide6)
    python scripts/slicer_pictures.py result --ct CT.nii.gz --labels liver=liver.nii.gz spleen=spleen.nii.gz

A development tool only (nothing imports it). The icon's organ colours come from Training/tasks.py and
the panel's task list from the model cards, so the pictures follow the project's single sources.
The panel is the real MSDSegment.ui rendered off-screen by Qt, with Slicer's custom widgets replaced
by their closest plain Qt equivalents (collapsible button -> group box, node selector -> combo box).
"""

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPOSITORY, "MSDSegment"), REPOSITORY]

ICON = os.path.join(REPOSITORY, "MSDSegment", "Resources", "Icons", "MSDSegment.png")
UI = os.path.join(REPOSITORY, "MSDSegment", "Resources", "UI", "MSDSegment.ui")
PANEL = os.path.join(REPOSITORY, "Resources", "Screenshots", "MSDSegment-panel.png")
RESULT = os.path.join(REPOSITORY, "Resources", "Screenshots", "MSDSegment-result.png")


def organ_colour(task):
    from Training.tasks import TASKS

    return tuple(TASKS[task]["labels"][0]["color"])


def draw_icon(path, size=128, scale=4):
    """An axial slice of the upper abdomen (viewer's left = patient's right): liver, spleen, pancreas."""
    from PIL import Image, ImageDraw

    def points(*xy):  # coordinates on a 128-pixel canvas
        return [(x * size * scale / 128, y * size * scale / 128) for x, y in zip(xy[::2], xy[1::2])]

    image = Image.new("RGBA", (size * scale, size * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse(points(6, 22, 122, 110), fill=(70, 70, 76, 255), outline=(240, 240, 240, 255), width=3 * scale)
    draw.polygon(points(16, 56, 22, 40, 38, 32, 58, 32, 72, 38, 74, 48, 62, 58, 48, 70, 32, 80, 20, 74),
                 fill=organ_colour("liver"))
    draw.ellipse(points(92, 46, 112, 84), fill=organ_colour("spleen"))
    draw.line(points(50, 76, 62, 70, 76, 66, 90, 68), fill=organ_colour("pancreas"), width=8 * scale,
              joint="curve")
    for x, y in points(50, 76, 90, 68):  # round the band's ends
        radius = 4 * scale
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=organ_colour("pancreas"))
    draw.ellipse(points(72, 76, 80, 84), fill=(210, 70, 70, 255))    # aorta
    draw.ellipse(points(54, 84, 74, 102), fill=(238, 236, 226, 255))  # vertebral body
    image = image.resize((size, size), Image.LANCZOS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, optimize=True)
    return path


# Plain Qt stand-ins for Slicer's custom widgets, so that QUiLoader can build the panel.
STAND_INS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox",
             "qMRMLCheckableNodeComboBox": "QComboBox", "ctkSliderWidget": "QDoubleSpinBox"}
SLICER_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
                          "renameEnabled", "noneDisplay", "SlicerParameterName"}


def plain_qt_ui(path):
    tree = ElementTree.parse(path)
    root = tree.getroot()
    for widget in root.iter("widget"):
        original = widget.get("class")
        if original in STAND_INS:
            widget.set("class", STAND_INS[original])
        for prop in list(widget.findall("property")):
            if prop.get("name") in SLICER_ONLY_PROPERTIES:
                widget.remove(prop)
            elif original == "ctkCollapsibleButton" and prop.get("name") == "text":
                prop.set("name", "title")
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    return ElementTree.tostring(root, encoding="utf-8")


def draw_panel(path, models_dir=None, result_json=None):
    """The panel as it looks after a liver run (segment names and colours from the liver card).

    result_json: the summary the command line wrote for a real liver run (`<output>.json`); its volumes
    fill the table. Without it the volume column shows a dash.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QColor
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QTableWidgetItem, QWidget

    from MSDSegmentLib import modelcard
    from MSDSegmentLib.mrml import quality_text

    application = QApplication.instance() or QApplication(sys.argv)
    data = QByteArray(plain_qt_ui(UI))  # kept referenced while Qt reads it
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    child = lambda name: panel.findChild(QWidget, name)  # noqa: E731
    cards = modelcard.catalogue(models_dir or modelcard.MODELS_DIR)
    card = cards.get("liver")
    task = child("taskComboBox")
    for task_id in modelcard.TASKS:
        task.addItem(cards[task_id].summary() if task_id in cards else f"{task_id} (model not installed)")
    task.setCurrentIndex(list(modelcard.TASKS).index("liver"))
    child("taskDescriptionLabel").setText(card.description if card else "")
    child("inputVolumeSelector").addItem("CT abdomen")
    child("outputSegmentationSelector").addItem("CT abdomen liver segmentation")
    child("deviceComboBox").addItems(["Auto (GPU if available)", "GPU (CUDA)", "CPU"])
    child("precisionComboBox").addItems(["Auto (fastest that keeps the model's accuracy)", "fp32 (full)",
                                         "bf16 (CPUs with AMX or AVX-512 BF16)", "fp16 (GPU)"])
    child("batchVolumesComboBox").addItem("(none checked)")
    child("smoothingSliderWidget").setValue(0.5)
    child("smoothingSliderWidget").setEnabled(False)
    for name in ("adcVolumeLabel", "adcVolumeSelector", "allFramesCheckBox", "progressBar"):
        child(name).hide()
    child("segmentButton").setEnabled(True)
    child("statusLabel").setText("Done.")
    table = child("volumesTable")
    labels = card.trained_labels if card else []
    volumes, quality = {}, {}
    if result_json:
        with open(result_json, encoding="utf-8") as stream:
            summary = json.load(stream)
        volumes, quality = summary["volumes_ml"], summary.get("quality", {})
    table.setRowCount(len(labels))
    for row, label in enumerate(labels):
        item = QTableWidgetItem(label.name)
        item.setData(Qt.DecorationRole, QColor(*label.color))
        table.setItem(row, 0, item)
        volume = volumes.get(label.name)
        table.setItem(row, 1, QTableWidgetItem("-" if volume is None else f"{volume:.1f}"))
        check = QTableWidgetItem(quality_text(quality.get(label.name)))
        if quality.get(label.name, {}).get("check"):
            check.setForeground(QColor("darkorange"))
        table.setItem(row, 2, check)
    table.setFixedHeight(28 + 30 * max(1, len(labels)))
    panel.resize(480, panel.sizeHint().height())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not panel.grab().save(path):
        raise RuntimeError(f"could not write {path}")
    application.processEvents()
    return path


def draw_result(path, ct_path, results):
    """Axial and coronal CT slices through the segmented organs, each task's labels in its card's colours.

    results: [(task, label map file written by the command line for ct_path)].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    from MSDSegmentLib import modelcard

    ct = sitk.DICOMOrient(sitk.ReadImage(ct_path), "LPS")  # rows anterior to posterior, columns right to left
    voxels = sitk.GetArrayFromImage(ct).astype(float)       # (z, y, x)
    overlay = np.zeros(voxels.shape + (4,))
    for task, label_path in results:
        card = modelcard.find_card(task)
        labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(label_path), "LPS"))
        for label in card.trained_labels:
            overlay[labels == label.value] = list(np.array(label.color) / 255.0) + [0.45]
    centre = np.argwhere(overlay[..., 3] > 0).mean(axis=0).round().astype(int)
    spacing = ct.GetSpacing()
    figure, axes = plt.subplots(1, 2, figsize=(8, 4), facecolor="black")
    views = [(voxels[centre[0]], overlay[centre[0]], spacing[1] / spacing[0], "axial"),
             (voxels[::-1, centre[1]], overlay[::-1, centre[1]], spacing[2] / spacing[0], "coronal")]
    for axis, (grey, colour, aspect, name) in zip(axes, views):
        axis.imshow(grey, cmap="gray", vmin=-160, vmax=240, aspect=aspect)
        axis.imshow(colour, aspect=aspect)
        axis.set_title(name, color="white", fontsize=9)
        axis.axis("off")
    names = ", ".join(label.name for task, _ in results for label in modelcard.find_card(task).trained_labels)
    figure.suptitle(f"MSDSegment: {names}", color="white", fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from PIL import Image
    from MSDSegmentLib.atomic import atomic_output

    with atomic_output(path, ".png") as temporary:
        figure.savefig(temporary, dpi=100, facecolor="black")
        with Image.open(temporary) as picture:  # a 256-colour palette keeps the repository small
            picture.convert("RGB").quantize(256).save(temporary, optimize=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("picture", choices=["icon", "panel", "result"])
    parser.add_argument("--out", help="output PNG (default: the file the extension uses)")
    parser.add_argument("--models-dir", help="model cards for the panel's task list (default: the bundled ones)")
    parser.add_argument("--result-json", help="panel: the command line's summary of a liver run, for the volumes")
    parser.add_argument("--ct", help="result: the CT that was segmented")
    parser.add_argument("--labels", nargs="*", default=[], metavar="TASK=FILE",
                        help="result: label maps the command line wrote for --ct, e.g. liver=out.nii.gz")
    args = parser.parse_args(argv)
    if args.picture == "icon":
        print(draw_icon(args.out or ICON))
    elif args.picture == "result":
        results = [tuple(item.split("=", 1)) for item in args.labels]
        print(draw_result(args.out or RESULT, args.ct, results))
    else:
        print(draw_panel(args.out or PANEL, args.models_dir, args.result_json))


if __name__ == "__main__":
    main()
