"""The extension's own terminology context: every code the model cards use, in Slicer's .term.json format.

Slicer's "General Anatomy" list, which segments used to name, lacks Neoplasm (both tumour classes) and the
prostate zones: Slicer 5.8 then calls the entry invalid and DICOM SEG export drops its codes. So the
extension ships a context of its own, loaded into the Terminologies module at Slicer's start-up, and each
segment's entry names it. The codes come from the model cards (one place for each fact): the shipped file
is generated from the bundled cards, and a test checks that it is up to date.
"""

import json
import os

from .atomic import write_text

CONTEXT_NAME = "Segmentation category and type - MSDSegment"
REGION_CONTEXT_NAME = "Anatomic codes - DICOM master list"  # Slicer's own, loaded by default
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
TERMINOLOGY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                                "Terminology", "SegmentationCategoryTypeModifier-MSDSegment.term.json")


def entry_string(terminology):
    """Slicer's terminology entry string: context~category~type~modifier~region context~region~region modifier,
    each code as scheme^value^meaning (the same 7 fields on Slicer 5.8 to 5.12)."""
    def code(entry):
        return "^".join(entry) if entry else "^^"

    return "~".join([
        CONTEXT_NAME, code(terminology.get("category")), code(terminology.get("type")),
        code(terminology.get("modifier")), REGION_CONTEXT_NAME, code(terminology.get("region")),
        code(terminology.get("region_modifier")),
    ])


def coded(code):
    scheme, value, meaning = code
    return {"CodingSchemeDesignator": scheme, "CodeValue": value, "CodeMeaning": meaning}


def context_document(cards):
    """The .term.json document holding the category and type of every labelled segment of the cards."""
    categories = {}
    for card in cards.values():
        for label in card.trained_labels:
            if not label.terminology:
                continue
            category = categories.setdefault(tuple(label.terminology["category"]), {
                **coded(label.terminology["category"]), "showAnatomy": False, "Type": {}})
            # A region (the organ a tumour lies in) is chosen from the anatomic context: the type must allow it.
            category["showAnatomy"] = category["showAnatomy"] or bool(label.terminology.get("region"))
            category["Type"].setdefault(tuple(label.terminology["type"]), {
                **coded(label.terminology["type"]), "recommendedDisplayRGBValue": list(label.color),
                "3dSlicerLabel": label.terminology["type"][2].lower()})
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": SCHEMA,
        "SegmentationCodes": {"Category": [dict(category, Type=list(category["Type"].values()))
                                           for category in categories.values()]},
    }


def context_text(cards):
    return json.dumps(context_document(cards), indent=2) + "\n"


def write_context_file(cards, path=TERMINOLOGY_FILE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(context_text(cards), path)
