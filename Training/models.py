"""What each trainable model is: its classes, where they come from in a dataset, and which tasks it serves.

Classes are matched by name against a dataset's `dataset.json` labels, so the same model trains on
the MSD's own tasks and on BTCV (spleen = 1, liver = 6, pancreas = 11) without code changes.
"""

from .tasks import FRAGMENT_GAP_MM, PANCREAS_GAP_MM

# Every organ BTCV labels, by its dataset.json name. Trained with `--neighbours`, those a model does not segment
# become its context classes: learnt so that its own organs end where they begin (the pancreas against the
# duodenum's neighbours, the veins, the stomach), output by no task (the engine counts them as background).
ABDOMINAL_ORGANS = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
                    "left adrenal gland"]

MODELS = {
    "abdomen": {
        "description": "Spleen, liver and pancreas in contrast-enhanced abdominal CT.",
        "modality": "CT",
        "channels": ["CT"],
        "classes": ["background", "spleen", "liver", "pancreas"],
        # class -> dataset label names (case-insensitive) it is read from. The tumour entries name the
        # MSD Task03/Task07 tumour labels ("cancer") for the tasks' tumour labels: evaluation reads them
        # (into the organ while the model has no tumour class), training only reads the model's classes.
        "sources": {"spleen": ["spleen"], "liver": ["liver"], "pancreas": ["pancreas"],
                    "liver tumour": ["liver tumour", "liver tumor", "cancer", "tumour", "tumor"],
                    "pancreatic tumour": ["pancreatic tumour", "pancreas tumour", "pancreatic tumor", "cancer",
                                          "tumour", "tumor"]},
        "mirror_axes": [],           # no flips: left-right and cranio-caudal anatomy are not symmetric
        "spacing_rule": "coarse",
        "patch_size": [64, 64, 64],
        "filters": [8, 16, 32, 64, 128],
        "default_data": "../shared/data/BTCV-Abdomen",
        "exclude": [],
        "neighbours": ABDOMINAL_ORGANS,
    },
    "prostate": {
        "description": "Prostate peripheral and transition zones in T2-weighted + ADC MR.",
        "modality": "MR",
        "channels": ["T2", "ADC"],
        "classes": ["background", "PZ", "TZ"],
        "sources": {"PZ": ["pz", "peripheral zone"], "TZ": ["tz", "transition zone"]},
        "mirror_axes": [0],          # the gland is left-right symmetric
        "spacing_rule": "median",
        "patch_size": [128, 128, 16],
        "filters": [8, 16, 32, 64, 128],
        "default_data": "../shared/data/Task05_Prostate",
        # Upstream labelling quirk: the whole gland is labelled PZ and there is no TZ: never validated, but it
        # trains the gland's outline through a loss on PZ + TZ merged (as do pseudo-labelled cases).
        "exclude": ["prostate_18"],
        "merged_classes": ["PZ", "TZ"],
        "merged_cases": ["prostate_18"],
    },
}

# The second, fine stage of the abdominal cascade: the coarse `abdomen` network finds the organs on
# the whole CT; this one segments a crop around them at about 2 mm, where the pancreas is several
# voxels thick. It also has tumour classes learnt from synthetic lesions (BTCV has no tumour labels):
# each synthetic class names the organ its lesions are painted into and the lesion preset.
MODELS["abdomen-fine"] = dict(
    MODELS["abdomen"],
    description="Spleen, liver, pancreas and their tumours (learnt from synthetic lesions) in abdominal CT, "
                "on a crop around the organs the coarse stage found.",
    classes=["background", "spleen", "liver", "liver tumour", "pancreas", "pancreatic tumour"],
    # centred_weight: the pancreas is chosen twice as often as the liver for lesion-centred patches,
    # because its thin lesions give 7x fewer tumour voxels per patch and that class had not started to learn.
    synthetic_lesions={"liver tumour": {"organ": "liver", "preset": "liver", "centred_weight": 1},
                       "pancreatic tumour": {"organ": "pancreas", "preset": "pancreas", "centred_weight": 2}},
    lesion_probability=0.5,
    # Patches centred on a lesion, not only where a painted organ falls into the patch (at 0.33 with
    # equal weights, on the BTCV cache: liver tumour voxels per patch 0.31 % -> 0.50 %, pancreatic 0.04 % -> 0.07 %).
    lesion_centred_fraction=0.45,
    # A mass beside the liver or pressing into it (background), in this share of the patches that hold liver
    # (Training/masses.py).
    neighbour_masses={"liver": 0.3},
    spacing_rule="fine",
    min_spacing_mm=2.0,          # finer costs 3-8x more per CT on a CPU
    patch_size=[80, 80, 48],
    # Region of interest from the previous stage: the box around these classes plus a margin. In BTCV the
    # pancreas reaches up to 56 mm beyond the liver+spleen box cranio-caudally (never in-plane), so the
    # region still holds it when the coarse stage misses the pancreas.
    roi={"after": "abdomen", "classes": ["spleen", "liver", "pancreas"], "margin_mm": [20, 20, 60]},
    # The region holds about 50 windows at half overlap, 5x the coarse stage's work: a quarter overlap
    # keeps one CT within the 30 s CPU target.
    overlap=0.25,
)


# The fine stage with every BTCV organ learnt as its own class (trained with `--neighbours`) and twice the feature
# maps: the organs the other tasks leave as background (kidneys, aorta, stomach) come from it. At the fine stage's
# width the context classes were not learnt; at twice it, 9 of the 10 reached Dice 0.5 (docs/models.md). Its spleen
# is worse than the fine stage's on one held-back CT, so it serves only the organs task.
MODELS["abdomen-wide"] = dict(
    MODELS["abdomen-fine"],
    description="Every BTCV organ (and the liver's and pancreas's synthetic tumours) in abdominal CT, on a crop "
                "around the organs the coarse stage found.",
    filters=[16, 32, 64, 128, 256],
)


# The pancreas task's last stage: the pancreas and its tumour at 1.5 mm in-plane on a crop around the pancreas
# the stage before it found. At 2 mm the all-organ fine stage plateaued at pancreas Dice 0.48-0.53 (training
# validation from step 4800 to 9000) and its 8 last-level features never separated pancreatic tumour from
# pancreas; here every one of them serves only these two classes, and lesions fill more of a patch.
# Same topology as the fine stage, so `--init-from` its weights starts every layer but the output one.
MODELS["pancreas-fine"] = dict(
    MODELS["abdomen-fine"],
    description="Pancreas and pancreatic tumour (learnt from synthetic lesions) on a crop around the pancreas "
                "the wide pancreas stage found.",
    classes=["background", "pancreas", "pancreatic tumour"],
    synthetic_lesions={"pancreatic tumour": {"organ": "pancreas", "preset": "pancreas", "centred_weight": 1}},
    neighbour_masses={},
    min_spacing_mm=1.5,
    patch_size=[96, 96, 32],
    # cluster_gap_mm: the box is drawn around the previous stage's largest cluster of pancreas pieces (the
    # post-processing rule), not around false blobs in the bowel or pelvis it also labelled.
    roi={"after": "pancreas-wide", "classes": ["pancreas", "pancreatic tumour"], "margin_mm": [30, 30, 24],
         "cluster_gap_mm": FRAGMENT_GAP_MM},
    overlap=0.5,
    # It decides only how the wide pancreas stage's outline splits into pancreas and tumour (at 3 to 1, as the
    # liver stage does): it finds the most synthetic lesions, but its own outline, averaged in even at half, brings
    # back the run into the veins on CT from elsewhere (docs/models.md).
    blend_previous=1.0,
    tumour_blend_previous=0.25,
)


# The same third stage for the liver task: liver and liver tumour at 1.5 mm in-plane on a crop around the
# liver the fine stage found. At 2 mm the all-organ fine stage found 13 of 24 synthetic liver lesions with
# tumour Dice 0.20; here all features serve the liver and its lesions, and small lesions span more voxels.
MODELS["liver-fine"] = dict(
    MODELS["pancreas-fine"],
    description="Liver and liver tumour (learnt from synthetic lesions) on a crop around the liver the fine "
                "stage found.",
    classes=["background", "liver", "liver tumour"],
    synthetic_lesions={"liver tumour": {"organ": "liver", "preset": "liver", "centred_weight": 1}},
    neighbour_masses={"liver": 0.3},
    roi={"after": "abdomen-fine", "classes": ["liver", "liver tumour"], "margin_mm": [15, 15, 12],
         "cluster_gap_mm": FRAGMENT_GAP_MM},
    # The liver's box is 3-4x the pancreas's: at half overlap one CT took 29.2 s on 2 cores, at a quarter 25.3 s.
    overlap=0.25,
    # Weight of the fine stage. 0.7 while this stage learnt from the first lesion synthesis (0.5 doubled the false
    # lesions then). Retrained on lesions like real metastases (many small ones), at 0.7 it changed nothing
    # (the same synthetic lesions found); at 0.5, on BTCV fold 0 with synthetic lesions, 15 of 26 lesions found
    # against 11, 1.67 false lesions per CT against 1.27 (docs/models.md).
    blend_previous=0.5,
    # ... but the fine stage, at 2 mm, misses small lesions this stage sees: averaged with its zero, a lesion this
    # stage is sure of sits at 0.5 and loses to the liver. So within the liver this stage's split decides the
    # tumour at 3 to 1. On BTCV fold 0 with synthetic lesions: 10 of 26 found against 9, false lesions unchanged
    # (0.60 per CT, healthy livers 0.60); at 0 11 of 26, but 0.93 and 1.00 (docs/models.md).
    tumour_blend_previous=0.25,
)


# The pancreas task's cascade learns the pancreas against its neighbours (docs/models.md, "The pancreas learnt
# against its neighbours"). Stages that knew only the spleen, liver and pancreas let the pancreas run into the
# veins beside it on CT from elsewhere (agreement with TotalSegmentator's 0.21); with every BTCV organ a class it
# stops at them (0.59).
#
# The fine stage at its own width, every BTCV organ a class (trained with `--neighbours`, from random weights: taught
# from the fine stage's weights the context classes never learnt). Its spleen is worse than the fine stage's, so it
# serves only the pancreas task.
MODELS["abdomen-neighbours"] = dict(
    MODELS["abdomen-fine"],
    description="Every BTCV organ (and the liver's and pancreas's synthetic tumours) in abdominal CT, on a crop "
                "around the organs the coarse stage found, at the fine stage's width.",
)

# The pancreas stage with every BTCV organ a class and twice the feature maps, on a crop around the pancreas the
# stage above found. It trained on with lesions in more patches (0.8 of them, 0.7 centred on one), without which
# its tumour class did not learn.
MODELS["pancreas-wide"] = dict(
    MODELS["pancreas-fine"],
    description="Pancreas and pancreatic tumour (learnt from synthetic lesions), every other BTCV organ a class, on "
                "a crop around the pancreas the all-organ fine stage found.",
    filters=[16, 32, 64, 128, 256],
    lesion_probability=0.8,
    lesion_centred_fraction=0.7,
    # The box holds the pieces post-processing keeps together: with 10 mm it held one of btcv_06's two (22.5 of its
    # 40.6 mL of pancreas).
    roi={"after": "abdomen-neighbours", "classes": ["pancreas", "pancreatic tumour"], "margin_mm": [30, 30, 24],
         "cluster_gap_mm": PANCREAS_GAP_MM},
    blend_previous=0.5,
    tumour_blend_previous=0.25,
)


class LabelMappingError(ValueError):
    """A dataset's labels cannot be matched to a model's classes (or a --label-map is malformed)."""


def find_label(aliases, dataset_labels):
    """The dataset label value whose name (case-insensitive) is the first alias found, or None."""
    names = {str(name).lower(): int(value) for value, name in dataset_labels.items()}
    return next((names[alias.lower()] for alias in aliases if alias.lower() in names), None)


def with_neighbours(model_name, model, dataset_labels):
    """The model with each of its neighbours that the dataset labels and the model does not segment appended to
    its classes, as its `context_classes`."""
    context = [name for name in model.get("neighbours", []) if name not in model["classes"] and
               find_label(model["sources"].get(name, [name]), dataset_labels) is not None]
    if not context:
        raise LabelMappingError(f"model '{model_name}' has no neighbour class that the dataset labels "
                                f"(it lists {model.get('neighbours', [])})")
    return dict(model, classes=model["classes"] + context, context_classes=context)


def label_mapping(model, dataset_labels, overrides=None, targets=None, optional=()):
    """Dataset label value -> target, matched by name through the model's `sources` (or given as overrides).

    targets: {class name: target value}; by default every foreground class of the model -> its index
    (what training needs). Evaluation asks for a task's classes -> the task's label values instead.
    optional: class names the dataset may lack; any other missing class is an error.
    Dataset labels not matched are background.
    """
    if overrides:
        return dict(overrides)
    if targets is None:
        targets = {name: index for index, name in enumerate(model["classes"][1:], start=1)}
    mapping = {}
    for class_name, target in targets.items():
        aliases = model["sources"].get(class_name, [class_name])
        value = find_label(aliases, dataset_labels)
        if value is not None:
            mapping.setdefault(value, target)
        elif class_name not in optional:
            raise LabelMappingError(f"dataset has no label for class '{class_name}' (looked for {aliases} among "
                                    f"{sorted(dataset_labels.values())}); give --label-map")
    return mapping


def parse_label_map(text):
    """'1:1,6:2,11:3' -> {1: 1, 6: 2, 11: 3} (dataset value : model class)."""
    if not text:
        return None
    try:
        return {int(src): int(dst) for src, dst in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise LabelMappingError(f"--label-map must be value:class pairs such as 1:1,6:2, got '{text}'") from None
