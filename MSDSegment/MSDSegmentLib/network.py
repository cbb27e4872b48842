"""The one network family shared by the engine and `Training/`.

A U-Net with instance norm and leaky ReLU (MONAI's DynUNet, the nnU-Net design), built from the
`network` section of a model card so that the architecture is data (the plan), not code.
"""

import importlib.abc
import sys
import threading

# What MONAI imports only through its optional imports, for parts the engine does not use: plots, scientific
# routines (the engine's own post-processing imports scipy.ndimage itself, once the networks are loaded), image
# readers (DICOM, NIfTI, TIFF, 2-D), bundle schemas and configs, downloads and cache locks. MONAI's __init__ imports
# every one of its submodules, and with them whichever of these are installed: on the project's machine 0.8 s of the
# 1.5 s MONAI took to import in a fresh process, and 0.2-0.4 s for SciPy's ndimage before the first network could start.
MONAI_EXTRAS = ("matplotlib", "scipy", "pydicom", "skimage", "nibabel", "PIL", "tifffile", "jsonschema", "yaml",
                "requests", "filelock")
_monai_extras_wanted = True


def leave_out_monai_extras():
    """In this process, import MONAI (when it is first needed) with MONAI_EXTRAS absent, as its optional imports
    allow: for the engine's own processes (the command line, the panel's engine process), whose only use of MONAI is
    the network and the sliding window. Not for a shared interpreter (Slicer's, a notebook's), where MONAI's readers
    and plots may be wanted later. The packages stay importable by everything else."""
    global _monai_extras_wanted
    _monai_extras_wanted = False


def import_monai():
    """Import MONAI as this process asked (leave_out_monai_extras)."""
    if not _monai_extras_wanted and "monai" not in sys.modules:
        import_monai_without_extras()
    import monai  # noqa: F401


class AbsentInThisThread(importlib.abc.MetaPathFinder):
    """Makes packages (and their modules not imported yet) absent to the thread that created it, as an import
    system finder placed first: every other thread imports them as usual meanwhile. The engine's main thread
    prepares the input, with SciPy among others, while its loader thread imports MONAI."""

    def __init__(self, packages):
        self.packages = tuple(packages)
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and name.split(".")[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None  # the next finder looks for it


def import_monai_without_extras():
    """Import MONAI with MONAI_EXTRAS absent to this thread. A MONAI release that needs one of them to import is
    left unimported, for import_monai to import whole, with none of the modules it imported of itself: those would
    keep believing the extras absent."""
    absent = AbsentInThisThread(MONAI_EXTRAS)
    sys.meta_path.insert(0, absent)
    try:
        import monai  # noqa: F401
    except ImportError:
        for name in [name for name in sys.modules if name.split(".")[0] == "monai"]:
            del sys.modules[name]
    finally:
        sys.meta_path.remove(absent)


def build_network(config):
    """Build the network described by a model card's `network` section.

    config keys: in_channels, out_channels, kernel_sizes (list of [k, k, k]), strides (list of
    [s, s, s], the first one [1, 1, 1]) and filters (one per level).
    """
    import_monai()
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=3,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        kernel_size=config["kernel_sizes"],
        strides=config["strides"],
        upsample_kernel_size=config["strides"][1:],
        filters=config["filters"],
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=False,
        res_block=False,
    )


def topology_for_patch(patch_size, spacing, max_levels=5, min_edge=4):
    """Kernel sizes and strides for a patch, following nnU-Net's rule.

    An axis is downsampled while its feature map stays at least `min_edge` voxels and its spacing
    is not more than twice the finest spacing (so thick-slice axes wait until the others catch up);
    axes that are not downsampled yet use in-plane 3x3x1 kernels.
    """
    sizes = list(patch_size)
    current_spacing = list(spacing)
    kernels, strides = [], [[1, 1, 1]]
    for _level in range(max_levels - 1):
        finest = min(current_spacing)
        stride = [2 if (s <= 2 * finest and n // 2 >= min_edge) else 1
                  for s, n in zip(current_spacing, sizes)]
        kernels.append([3 if s <= 2 * finest else 1 for s in current_spacing])
        if stride == [1, 1, 1]:
            break
        strides.append(stride)
        sizes = [n // st for n, st in zip(sizes, stride)]
        current_spacing = [s * st for s, st in zip(current_spacing, stride)]
    kernels.append([3 if s <= 2 * min(current_spacing) else 1 for s in current_spacing])
    kernels = kernels[:len(strides)]
    return kernels, strides


def divisibility(strides):
    """Per-axis factor every input size must be a multiple of for these strides."""
    factor = [1, 1, 1]
    for stride in strides:
        factor = [f * s for f, s in zip(factor, stride)]
    return factor
