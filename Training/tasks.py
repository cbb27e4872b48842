"""The extension's tasks: MSD label values, names, colours and SNOMED-CT codes, and which trained models
(and which of their classes) serve each: `models` lists the stages of its cascade, coarse first. `export`
writes these into the model cards; nothing else defines them."""

ANATOMY = ["SCT", "123037004", "Anatomical Structure"]
ALTERED = ["SCT", "49755003", "Morphologically Altered Structure"]
NEOPLASM = ["SCT", "108369006", "Neoplasm"]
LIVER = ["SCT", "10200004", "Liver"]
PANCREAS = ["SCT", "15776009", "Pancreas"]


# Pieces of a thin organ the networks break up (the pancreas, the peripheral zone) less than this apart count
# as one piece: chosen on the held-back cases (docs/models.md). The pancreas stage's region uses it too.
FRAGMENT_GAP_MM = 10
# The pancreas's networks that learnt its neighbours break some pancreases at the veins between head and body, into
# pieces up to about 24 mm apart (BTCV btcv_06: with 10 mm one was dropped, pancreas Dice 0.36; with 20 mm 0.57).
PANCREAS_GAP_MM = 2 * FRAGMENT_GAP_MM


def organ(value, name, color, code, source_class, component_gap_mm=0):
    """component_gap_mm: post-processing keeps pieces of this organ closer than this together, for organs the
    network tends to break up (measured on the held-back cases: see docs/models.md)."""
    return {"value": value, "name": name, "color": color, "source_class": source_class, "kind": "organ",
            "terminology": {"category": ANATOMY, "type": code}, "component_gap_mm": component_gap_mm}


def tumour(value, name, color, region, organ_name):
    return {"value": value, "name": name, "color": color, "source_class": name.lower(), "kind": "tumour",
            "organ": organ_name, "terminology": {"category": ALTERED, "type": NEOPLASM, "region": region}}


# Colours follow Slicer's GenericAnatomyColors where it has the structure.
TASKS = {
    "liver": {
        "title": "Liver and liver tumour (CT)",
        "description": "Liver (1) and liver tumour (2) in contrast-enhanced abdominal CT, MSD Task03 labels.",
        "models": ["abdomen", "abdomen-fine", "liver-fine"],
        # Liver tumours under 1 mL are dropped: measured on the 5 held-back CT with 3 rounds of synthetic lesions,
        # cuts of 0.1 / 0.25 / 0.5 / 1 mL found 14 / 14 / 13 / 13 of the 24 lesions of 0.5 mL or more and marked
        # 3.07 / 2.20 / 1.47 / 1.00 false lesions per CT (docs/models.md).
        "min_tumour_ml": 1.0,
        # Lesions more elongated than 3 (longest over shortest principal axis) become liver: most false lesions in
        # the held-back healthy livers are vessel- or rim-like (elongation 2.8-5.5), lesions compact. Measured on
        # those 5 CT, maxima of none / 4 / 3 / 2.5 kept 10 / 9 / 8 / 8 of the 30 measurable synthetic lesions and
        # left 1.80 / 1.20 / 0.80 / 0.60 false lesions per healthy liver: 3 is the largest with at most one.
        "max_tumour_elongation": 3.0,
        "labels": [organ(1, "Liver", [221, 130, 101], LIVER, "liver"),
                   tumour(2, "Liver tumour", [144, 238, 144], LIVER, "Liver")],
    },
    "spleen": {
        "title": "Spleen (CT)",
        "description": "Spleen (1) in contrast-enhanced abdominal CT, MSD Task09 labels.",
        "models": ["abdomen", "abdomen-fine"],
        "labels": [organ(1, "Spleen", [157, 108, 162], ["SCT", "78961009", "Spleen"], "spleen")],
    },
    "pancreas": {
        "title": "Pancreas and pancreatic tumour (CT)",
        "description": "Pancreas (1) and pancreatic tumour (2) in contrast-enhanced abdominal CT, MSD Task07 labels.",
        "models": ["abdomen", "abdomen-neighbours", "pancreas-wide", "pancreas-fine"],
        # 0.5 mL: of the same cuts, the one that finds the most measurable lesions (6 of 17) with at most one false
        # lesion per CT (0.60; 0.25 mL found 8 with 1.27, 1 mL 5 with 0.47), measured with the stages before these.
        "min_tumour_ml": 0.5,
        # Lesions whose most confident voxel is below 0.7 become pancreas: with the neighbour-aware stages, on the 5
        # held-back CT with 3 rounds of synthetic lesions, peaks of none / 0.7 / 0.8 found 8 / 7 / 5 of 13 lesions
        # with 0.93 / 0.47 / 0.27 false lesions per CT, and left 1.00 / 0.60 / 0.40 per healthy pancreas.
        "min_tumour_peak": 0.7,
        "labels": [organ(1, "Pancreas", [249, 180, 111], PANCREAS, "pancreas", component_gap_mm=PANCREAS_GAP_MM),
                   tumour(2, "Pancreatic tumour", [255, 90, 90], PANCREAS, "Pancreas")],
    },
    # The organs besides the liver, spleen and pancreas that the wide fine stage learnt as context classes, offered
    # where their mean Dice on the held-back CT reaches 0.80 (docs/models.md): the inferior vena cava (0.67), the
    # portal and splenic vein, the adrenals, the oesophagus and the gallbladder do not.
    "organs": {
        "title": "Kidneys, aorta and stomach (CT)",
        "description": "Right kidney (1), left kidney (2), aorta (3) and stomach (4) in contrast-enhanced abdominal CT, "
                       "within the upper abdomen around the liver, spleen and pancreas.",
        "models": ["abdomen", "abdomen-wide"],
        "labels": [organ(1, "Right kidney", [185, 102, 83], ["SCT", "9846003", "Right kidney"], "right kidney"),
                   organ(2, "Left kidney", [185, 102, 83], ["SCT", "18639004", "Left kidney"], "left kidney"),
                   organ(3, "Aorta", [224, 97, 76], ["SCT", "15825003", "Aorta"], "aorta"),
                   organ(4, "Stomach", [216, 132, 105], ["SCT", "69695003", "Stomach"], "stomach")],
    },
    "prostate": {
        "title": "Prostate zones (MR T2 + ADC)",
        "description": "Prostate peripheral zone (1) and transition zone (2) in T2-weighted and ADC MR, MSD Task05 labels.",
        "models": ["prostate"],
        "labels": [organ(1, "Peripheral zone", [230, 158, 140], ["SCT", "279706003", "Peripheral zone of prostate"], "PZ",
                         component_gap_mm=FRAGMENT_GAP_MM),
                   organ(2, "Transition zone", [128, 174, 128], ["SCT", "399384005", "Transition zone of prostate"], "TZ")],
    },
}

DATA_CREDITS = {
    "BTCV-Abdomen": {"licence": "BTCV research use; cite Landman et al., MICCAI 2015 Multi-Atlas Labeling "
                                "Beyond the Cranial Vault workshop and challenge",
                     "source": "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, MICCAI 2015), 24 labelled CT"},
    "PROSTATE": {"licence": "CC BY-SA 4.0 (Medical Segmentation Decathlon Task05, Radboud University Nijmegen "
                            "Medical Centre)",
                 "source": "Medical Segmentation Decathlon Task05_Prostate"},
}
