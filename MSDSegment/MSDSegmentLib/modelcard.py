"""Model cards: the JSON file beside each model's weights that says everything about the model.

One card per task in `MSDSegment/Resources/Models/<task>.json`. A card lists the labels the task
outputs (MSD values, names, colours, SNOMED-CT codes) and one or more network stages; each stage
names its weights file, sha256, network config, spacing, patch size, normalisation and the classes
its output channels mean. With several stages (a cascade) each later stage segments a region of
interest around what the previous one found, and the last stage's output is the result. Several
tasks may share one weights file (one abdominal cascade serves the liver, spleen and pancreas tasks)
and each task picks the classes it needs by name.
"""

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from .errors import ModelError

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Models")
TASKS = ("liver", "spleen", "pancreas", "abdomen", "organs", "prostate")


@dataclass(frozen=True)
class Setting:
    default: object
    meaning: str


# How a stage runs, each setting declared once with its one default. Training/models.py sets them per model, the
# training plan and the model card store them under these names, and the engine reads them (Stage).
STAGE_SETTINGS = {
    "roi": Setting({}, "a cascade's later stage sees only the box around the previous stage's `classes` plus "
                       "`margin_mm` per axis (with `cluster_gap_mm`: around their largest cluster only); empty: "
                       "the whole image"),
    "overlap": Setting(0.5, "sliding-window overlap, a fraction of the patch"),
    "blend_previous": Setting(0.0, "weight of the previous stage's probabilities (for this stage's classes, on "
                                   "this stage's grid) in an average with this stage's; 0: this stage's alone"),
    "tumour_blend_previous": Setting(None, "with it, that weight for how the organ splits into organ and tumour "
                                           "(engine.blend_previous); None: the tumour is averaged like every class"),
}

# A single task's post-processing rules, declared once: export writes them into the card (Training/tasks.py sets
# them per task), the engine reads them (ModelCard.postprocessing_setting).
POSTPROCESSING_SETTINGS = {
    "keep_largest": Setting(True, "keep only the largest cluster of each organ's components"),
    # 0.5 mL is a sphere of 10 mm diameter: RECIST's smallest measurable lesion, and about 40 voxels of the fine
    # stage's 2 x 2 x 3 mm grid; smaller components are one or two of its voxels thick.
    "min_tumour_ml": Setting(0.5, "tumour components smaller than this become organ"),
    "min_tumour_confidence": Setting(0.0, "tumour components whose mean probability is below this become organ"),
    "min_tumour_peak": Setting(0.0, "tumour components whose largest probability is below this become organ"),
    "max_tumour_elongation": Setting(None, "tumour components more elongated than this become organ; None: any"),
}


def settings_from(source, schema):
    """Each setting of `schema` (STAGE_SETTINGS, POSTPROCESSING_SETTINGS) as `source` (a dict: a model's
    definition, a plan, a task) gives it, or its default: a fresh copy under the schema's names."""
    return {name: copy.deepcopy(source.get(name, setting.default)) for name, setting in schema.items()}


@dataclass
class Label:
    value: int
    name: str
    color: list
    source_class: str
    kind: str = "organ"            # "organ" or "tumour" (post-processing differs)
    organ: str = ""                # for a tumour: the name of the organ label it must touch
    terminology: dict = field(default_factory=dict)
    trained: bool = True
    note: str = ""                 # what a user must know about this label (how it was learnt, its limits)
    component_gap_mm: float = 0.0  # for an organ: pieces closer than this are kept together (post-processing)
    # For an organ: where it lies relative to another organ, learnt from the training labels (`python -m Training
    # locations`): {"relative_to": organ class, "mean_mm", "covariance_mm2", "max_distance", ...}. Post-processing
    # keeps the largest piece that lies within max_distance (Mahalanobis) of there, not a larger one elsewhere.
    location: dict = field(default_factory=dict)
    volume_ml: list = field(default_factory=list)  # for an organ: [smallest, largest] in the training labels

    @property
    def color_float(self):
        return [c / 255.0 for c in self.color]


@dataclass
class Stage:
    weights: str                   # file name, relative to the card's folder
    sha256: str
    network: dict
    spacing: list                  # mm, along the canonical (L, P, S) axes
    patch_size: list
    normalisation: dict
    classes: list                  # name of each output channel, channel 0 = background
    # Classes learnt only so that the task's organs end where these begin (neighbouring organs): no task outputs
    # them, and a task counts them, like every class it does not take, as background.
    context_classes: list = field(default_factory=list)
    mirror_axes: list = field(default_factory=list)
    model: str = ""                # the trained model these weights are (Training's name for it)
    steps: int = None              # training steps of these weights
    # STAGE_SETTINGS, with their defaults there
    roi: dict = field(default_factory=lambda: copy.deepcopy(STAGE_SETTINGS["roi"].default))
    overlap: float = STAGE_SETTINGS["overlap"].default
    blend_previous: float = STAGE_SETTINGS["blend_previous"].default
    tumour_blend_previous: float = STAGE_SETTINGS["tumour_blend_previous"].default
    folder: str = MODELS_DIR

    @property
    def weights_path(self):
        return os.path.join(self.folder, self.weights)


@dataclass
class ModelCard:
    task: str
    title: str
    description: str
    modality: str                  # "CT" or "MR"
    channels: list                 # input channel names, e.g. ["T2", "ADC"]
    labels: list
    stages: list
    postprocessing: dict
    training: dict
    validation: dict
    licence: str
    path: str = ""
    # Validation Dice of the whole cascade under each precision ({"fp32": {label: dice}, "bf16": ..., plus
    # "tolerance", "cases", "data"}), measured by `python -m Training precision`. `auto` uses a reduced
    # precision only where it is measured here within the tolerance of fp32 for every label.
    precision: dict = field(default_factory=dict)
    # A combined task (e.g. abdomen): the single tasks it runs, each with its label values in this card, in the
    # order that decides a voxel two of them claim (the first keeps it). Empty for a single task.
    parts: list = field(default_factory=list)
    # The quality flag's calibration ({"min_confidence", "calibration"}), written by `python -m Training quality`.
    quality: dict = field(default_factory=dict)

    @property
    def trained_labels(self):
        return [label for label in self.labels if label.trained]

    def postprocessing_setting(self, name):
        """A post-processing rule of this card (POSTPROCESSING_SETTINGS), its default where the card does not
        set it."""
        return self.postprocessing.get(name, POSTPROCESSING_SETTINGS[name].default)

    def label(self, value):
        return next(label for label in self.labels if label.value == value)

    def organ_of(self, tumour):
        """The organ label a tumour label belongs to (its `organ`), or None."""
        return next((label for label in self.labels if label.name == tumour.organ), None)

    def summary(self):
        """One line for menus and `tasks`: title and the measured validation Dice."""
        dice = self.validation.get("dice", {})
        figures = ", ".join(f"{name} {value:.2f}" for name, value in dice.items()) or "not yet measured"
        return f"{self.title} - validation Dice: {figures}"

    def auto_precisions(self):
        """The reduced precisions (bf16, fp16) measured to change no label's mean validation Dice by more than
        the recorded tolerance against fp32 (for a combined task: in every task it combines)."""
        if self.parts:
            return [name for name in ("bf16", "fp16") if all(name in part.card.auto_precisions() for part in self.parts)]
        reference = self.precision.get("fp32", {})
        tolerance = self.precision.get("tolerance", 0.0)

        def keeps_dice(measured):
            return bool(reference) and all(label in measured and abs(measured[label] - dice) <= tolerance
                                           for label, dice in reference.items())

        return [name for name in ("bf16", "fp16") if keeps_dice(self.precision.get(name, {}))]

    def notes(self):
        """What a user must know about the labels: untrained ones, and how the others were learnt."""
        untrained = [label.name for label in self.labels if not label.trained]
        lines = [f"{label.name}: {label.note}" for label in self.trained_labels if label.note]
        return lines + ([f"not trained yet: {', '.join(untrained)}"] if untrained else [])


@dataclass
class Part:
    """One single task of a combined task, and where its label values go in the combined label map."""
    card: ModelCard
    values: dict                   # the single task's label value -> the combined card's


def combined_card(data, path, cards):
    """A task that runs several single tasks at once (their shared stages once) and merges their labels.

    `data`: {"task", "title", "description", "combines": [{"task", "values": {label name: value}}], "overlap":
    [task, ...]}. Names, colours, codes, notes and validation figures come from the single tasks' cards."""
    parts, labels, stages = {}, [], []
    for entry in data["combines"]:
        if entry["task"] not in cards:
            raise ModelError(f"Model card {path} combines task '{entry['task']}', which has no model card")
        card = cards[entry["task"]]
        by_name = {label.name: label for label in card.trained_labels}
        values = {}
        for name, value in entry["values"].items():
            if name not in by_name:
                raise ModelError(f"Model card {path}: task '{card.task}' has no trained label '{name}'")
            labels.append(dataclasses.replace(by_name[name], value=int(value)))
            values[by_name[name].value] = int(value)
        parts[card.task] = Part(card, values)
        stages += [stage for stage in card.stages if stage.weights not in {s.weights for s in stages}]
    first = next(iter(parts.values())).card
    if any((part.card.modality, part.card.channels) != (first.modality, first.channels) for part in parts.values()):
        raise ModelError(f"Model card {path} combines tasks with different inputs")
    if sorted(data["overlap"]) != sorted(parts):
        raise ModelError(f"Model card {path}: 'overlap' must order exactly the combined tasks {sorted(parts)}")
    dice = {label.name: part.card.validation.get("dice", {}).get(label.name) for part in parts.values()
            for label in part.card.trained_labels}
    validation = {"dice": {name: value for name, value in dice.items() if value is not None},
                  "data": "; ".join(f"{task}: {part.card.validation.get('data', 'not measured')}"
                                    for task, part in parts.items())}
    return ModelCard(task=data["task"], title=data["title"], description=data["description"],
                     modality=first.modality, channels=first.channels, labels=sorted(labels, key=lambda l: l.value),
                     stages=stages, training={"data": first.training.get("data", "")},
                     postprocessing={"overlap": data["overlap"], "overlap_rule": data.get("overlap_rule", "")},
                     validation=validation, licence=first.licence, path=os.path.abspath(path),
                     parts=[parts[task] for task in data["overlap"]])


def read_json(path):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise ModelError(f"Model card not found: {path}") from None
    except ValueError as error:
        raise ModelError(f"Model card {path} is invalid: {error}") from None


def load_card(path, cards=None):
    """A model card; a combined task's card needs the catalogue of single-task cards it combines (`cards`)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        data = read_json(path)
        if "combines" in data:
            return combined_card(data, path, cards or {})
        labels = [Label(**label) for label in data.pop("labels")]
        stages = [Stage(folder=folder, **stage) for stage in data.pop("stages")]
        return ModelCard(labels=labels, stages=stages, path=os.path.abspath(path), **data)
    except (ValueError, TypeError, KeyError) as error:
        raise ModelError(f"Model card {path} is invalid: {error}") from None


def catalogue(models_dir=MODELS_DIR):
    """All model cards in a folder, keyed by task id, in the catalogue's task order."""
    cards, combined = {}, {}
    if os.path.isdir(models_dir):
        for name in sorted(os.listdir(models_dir)):
            if name.endswith(".json"):
                path = os.path.join(models_dir, name)
                data = read_json(path)
                if "combines" in data:
                    combined[path] = [entry.get("task") for entry in data["combines"]]
                else:
                    card = load_card(path)
                    cards[card.task] = card
        for path, tasks in combined.items():
            if all(task in cards for task in tasks):  # a combined task is offered only with all its parts
                card = load_card(path, cards)
                cards[card.task] = card
    order = {task: index for index, task in enumerate(TASKS)}
    return dict(sorted(cards.items(), key=lambda item: order.get(item[0], len(order))))


def find_card(task, models_dir=MODELS_DIR):
    cards = catalogue(models_dir)
    if task not in cards:
        known = ", ".join(cards) or "none"
        raise ModelError(f"No model for task '{task}' in {models_dir} (available: {known}).")
    return cards[task]


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_weights(card):
    """Weights files a card names that are not on disk."""
    return [stage.weights_path for stage in card.stages if not os.path.isfile(stage.weights_path)]


def load_stage_network(stage, device="cpu"):
    """Check the weights' sha256, then load them (weights only) into a freshly built network."""
    import torch
    from .network import build_network

    path = stage.weights_path
    if not os.path.isfile(path):
        raise ModelError(f"Model weights missing: {path}")
    if sha256_of(path) != stage.sha256:
        raise ModelError(f"Model weights corrupted (sha256 mismatch): {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file with the right hash that torch cannot read is still a bad model
        raise ModelError(f"Cannot read model weights {path}: {error}") from None
    network = build_network(stage.network)
    network.load_state_dict({key: value.float() for key, value in state.items()})
    return network.to(device).eval()
