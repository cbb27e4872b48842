"""The one network family shared by the engine and `Training/`.

A U-Net with instance norm and leaky ReLU (MONAI's DynUNet, the nnU-Net design), built from the
`network` section of a model card so that the architecture is data (the plan), not code.
"""


def build_network(config):
    """Build the network described by a model card's `network` section.

    config keys: in_channels, out_channels, kernel_sizes (list of [k, k, k]), strides (list of
    [s, s, s], the first one [1, 1, 1]) and filters (one per level).
    """
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
