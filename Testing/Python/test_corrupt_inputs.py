"""Damaged input files: every format the engine reads (NIfTI .nii and .nii.gz, NRRD with gzip encoding, MetaImage
.mha, a DICOM series) cut at several points and with bytes changed in its header and its data. Each damage that
can be told from the file (see MSDSegmentLib/integrity.py for what can and cannot) gets its one-line error from the
command line, a non-zero exit and no output; the cases stop at the reader, before any network runs. Whole files
read exactly as ITK reads them, and NaN or infinite voxels are refused in every float format."""

import gzip
import io
import os
import shutil
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from images import synthetic_ct, write_dicom_series
from MSDSegmentLib.cli import main
from MSDSegmentLib.errors import InputError
from MSDSegmentLib.imageio import read_image
from MSDSegmentLib.integrity import inflate

FORMATS = (".nii", ".nii.gz", ".nrrd", ".mha")


def small_ct(pixel_type=sitk.sitkInt16):
    return sitk.Cast(synthetic_ct(size=(40, 32, 10)), pixel_type)


def written(image, folder, name):
    path = os.path.join(str(folder), name)
    sitk.WriteImage(image, path, useCompression=True)  # NRRD: gzip encoding; MetaImage: zlib
    return path


def header_end(data, suffix):
    """The offset of the first data byte of a file written by ITK."""
    if suffix == ".nii":
        return 352
    if suffix == ".nii.gz":
        return 10  # the gzip header: the NIfTI header is compressed with the voxels
    marker = b"\n\n" if suffix == ".nrrd" else b"ElementDataFile = LOCAL\n"
    return data.index(marker) + len(marker)


def value_of(data, key):
    """The offset of the first character of a text header field's value ("key: value" or "key = value")."""
    start = data.index(key) + len(key)
    while data[start:start + 1] in (b":", b"=", b" "):
        start += 1
    return start


def flipped(data, offset):
    changed = bytearray(data)
    changed[offset] ^= 0xFF
    return bytes(changed)


def damaged_versions(data, suffix):
    """{case: damaged bytes} of one file: cuts in the header, in the data and in the last bytes, and changed bytes
    where they can be told: anywhere in compressed data (the checksum), in the header fields that say how to read
    the voxels. (A changed byte in uncompressed integer voxels, or in a header's free text, cannot be told.)"""
    start, size = header_end(data, suffix), len(data)
    cases = {f"cut at {at}": data[:at] for at in (start // 2, start + 7, (start + size) // 2, size - 4, size - 1)
             if 0 < at < size}
    compressed = suffix != ".nii"
    if compressed:
        for name, at in (("a byte of the data", (start + size) // 2), ("a byte near the start of the data", start + 3),
                         ("the checksum", size - 6)):
            cases[f"{name} changed"] = flipped(data, at)
    if suffix == ".nii":
        for name, at in (("sizeof_hdr", 0), ("dim[0]", 40), ("datatype", 70), ("bitpix", 72), ("magic", 344)):
            cases[f"header {name} changed"] = flipped(data, at)
    elif suffix == ".nii.gz":  # the NIfTI header is in the compressed stream ("near the start of the data")
        for name, at in (("gzip magic", 0), ("gzip compression method", 2)):
            cases[f"{name} changed"] = flipped(data, at)
    elif suffix == ".nrrd":
        for key in (b"type", b"dimension", b"sizes", b"encoding"):
            cases[f"header {key.decode()} changed"] = flipped(data, value_of(data, key))
    else:
        for key in (b"NDims", b"DimSize", b"ElementType", b"CompressedData"):
            cases[f"header {key.decode()} changed"] = flipped(data, value_of(data, key))
    return cases


def assert_refused(argv, folder, capsys, pattern=""):
    """The command line's one-line error, a non-zero exit and nothing written beside the input."""
    before = sorted(os.listdir(folder))
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("msdsegment: error: "), err
    assert "Traceback" not in err and pattern in lines[0], lines[0]
    assert sorted(os.listdir(folder)) == before


def segment_argv(path, folder, models):
    return ["segment", "--task", "spleen", "--device", "cpu", "--models-dir", models, "--output",
            os.path.join(str(folder), "out.nii.gz"), path]


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_whole_file_reads_as_itk_reads_it(tmp_path, suffix):
    """The checked, decompressed-once path gives ITK's voxels and grid exactly."""
    image = small_ct(sitk.sitkFloat32)
    path = written(image, tmp_path, "ct" + suffix)
    read = read_image(path)
    reference = sitk.ReadImage(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(reference))
    assert (read.GetOrigin(), read.GetSpacing(), read.GetDirection()) == \
        (reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    assert sorted(os.listdir(tmp_path)) == ["ct" + suffix]  # the temporary copy is gone


def test_a_whole_4d_mr_reads_as_itk_reads_it(tmp_path):
    from images import synthetic_mr
    path = written(synthetic_mr(), tmp_path, "mr.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)),
                                  sitk.GetArrayFromImage(sitk.ReadImage(path)))


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_damaged_file_is_refused_with_one_line_and_no_output(tmp_path, suffix, tiny_models_dir, capsys):
    source = written(small_ct(), tmp_path, "source" + suffix)
    with open(source, "rb") as stream:
        data = stream.read()
    cases = damaged_versions(data, suffix)
    assert len(cases) >= 10
    for case, damaged in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        path = os.path.join(str(folder), "ct" + suffix)
        with open(path, "wb") as stream:
            stream.write(damaged)
        with pytest.raises(InputError) as refused:
            read_image(path)
        assert "\n" not in str(refused.value) and path in str(refused.value), (case, str(refused.value))
        assert_refused(segment_argv(path, folder, tiny_models_dir), str(folder), capsys)
        with open(path, "rb") as stream:
            assert stream.read() == damaged, case  # the input is left as it was


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_an_uncompressed_nrrd_or_metaimage_cut_short_is_refused(tmp_path, suffix, tiny_models_dir, capsys):
    path = str(tmp_path / ("ct" + suffix))
    sitk.WriteImage(small_ct(), path, useCompression=False)
    with open(path, "rb") as stream:
        data = stream.read()
    for at in (header_end(data, suffix) + 7, len(data) // 2, len(data) - 1):
        with open(path, "wb") as stream:
            stream.write(data[:at])
        with pytest.raises(InputError):
            read_image(path)
        assert_refused(segment_argv(path, tmp_path, tiny_models_dir), str(tmp_path), capsys)


def test_a_half_nii_gz_is_refused_not_segmented_with_zeros(tmp_path, tiny_models_dir, capsys):
    """The measured defect: half a .nii.gz was read with the missing half as zeros and segmented."""
    path = written(small_ct(), tmp_path, "ct.nii.gz")
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:
        stream.write(data[:len(data) // 2])
    assert_refused(segment_argv(path, tmp_path, tiny_models_dir), str(tmp_path), capsys, "cut short")


def inflated(data, inflater):
    """(verdict, output) of integrity.inflate with `inflater`: "whole", "cut short" or "corrupt"."""
    target = io.BytesIO()
    try:
        whole = inflate(io.BytesIO(data), target, inflater)
    except inflater.error:
        return "corrupt", None
    return ("whole" if whole else "cut short"), target.getvalue()


def test_isa_l_and_zlib_inflate_every_stream_alike():
    """The installed inflater (ISA-L) and Python's zlib, the fallback, give the same bytes for whole gzip and zlib
    streams (two gzip members and bytes after them, as bgzip writes) and the same verdict on each damaged one."""
    isal_zlib = pytest.importorskip("isal.isal_zlib", reason="needs ISA-L (pip install isal)")
    voxels = sitk.GetArrayFromImage(small_ct()).tobytes()
    streams = {"gzip": (gzip.compress(voxels), b""), "zlib": (zlib.compress(voxels), b""),
               "two gzip members and a byte after them": (gzip.compress(voxels[:999]) + gzip.compress(voxels[999:]),
                                                          b"x")}
    for name, (data, after) in streams.items():
        assert inflated(data + after, isal_zlib) == inflated(data + after, zlib) == ("whole", voxels), name
        start, size = (10 if data[:2] == b"\x1f\x8b" else 2), len(data)
        damaged = {f"cut at {at}": data[:at] for at in (start + 7, size // 2, size - 4, size - 1)}
        damaged.update({f"byte {at} changed": flipped(data, at) + after for at in (start + 3, size // 2, size - 6)})
        for case, version in damaged.items():
            verdict = inflated(version, isal_zlib)[0]
            assert verdict == inflated(version, zlib)[0] and verdict != "whole", (name, case)


def test_what_cannot_be_told_is_read(tmp_path):
    """A changed byte in uncompressed integer voxels, or in a header's free text, is any other valid file: read."""
    path = written(small_ct(), tmp_path, "ct.nii")
    with open(path, "rb") as stream:
        data = stream.read()
    for at in (150, len(data) // 2):  # `descrip` (free text), a voxel
        with open(path, "wb") as stream:
            stream.write(flipped(data, at))
        read_image(path)


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_voxels_are_refused_in_every_float_format(tmp_path, suffix, value, tiny_models_dir, capsys):
    voxels = sitk.GetArrayFromImage(small_ct(sitk.sitkFloat32))
    voxels[5, 10, 20] = value
    image = sitk.GetImageFromArray(voxels)
    image.CopyInformation(small_ct())
    path = written(image, tmp_path, "ct" + suffix)
    assert_refused(segment_argv(path, tmp_path, tiny_models_dir), str(tmp_path), capsys, "NaN or infinite voxels")


def test_a_changed_byte_that_makes_a_float_voxel_nan_is_refused_in_either_byte_order(tmp_path, tiny_models_dir,
                                                                                        capsys):
    voxels = sitk.GetArrayFromImage(small_ct(sitk.sitkFloat32)).transpose(2, 1, 0)
    for order in "<>":
        path = str(tmp_path / "ct.nii")
        header = nib.Nifti1Header(endianness=order)
        header.set_data_dtype(np.float32)
        nib.save(nib.Nifti1Image(voxels, np.eye(4), header=header), path)
        assert np.isfinite(sitk.GetArrayFromImage(read_image(path))).all()
        with open(path, "r+b") as stream:
            stream.seek(352 + 4 * 1000 + (2 if order == "<" else 0))  # the exponent's bytes of voxel 1000
            stream.write(b"\xc0\x7f" if order == "<" else b"\x7f\xc0")
        assert_refused(segment_argv(path, tmp_path, tiny_models_dir), str(tmp_path), capsys, "NaN or infinite")
        os.remove(path)


def test_a_dicom_series_with_a_damaged_slice_is_refused(tmp_path, tiny_models_dir, capsys):
    """A slice cut (anywhere) or without its DICM marker would leave the volume a slice short: the series is
    refused, naming the file. A changed pixel byte cannot be told (DICOM pixel data carry no checksum)."""
    source = str(tmp_path / "source")
    write_dicom_series(small_ct(), source)
    whole = sitk.GetArrayFromImage(read_image(source))
    with open(os.path.join(source, "slice004.dcm"), "rb") as stream:
        data = stream.read()
    cases = {f"cut at {at}": data[:at] for at in (100, 300, len(data) // 2, len(data) - 1)}
    cases["DICM marker changed"] = flipped(data, 128)
    for case, damaged in cases.items():
        folder = str(tmp_path / case.replace(" ", "_"))
        shutil.copytree(source, folder)
        with open(os.path.join(folder, "slice004.dcm"), "wb") as stream:
            stream.write(damaged)
        assert_refused(segment_argv(folder, tmp_path, tiny_models_dir), str(tmp_path), capsys, "slice004.dcm")
    folder = str(tmp_path / "pixel_changed")
    shutil.copytree(source, folder)
    with open(os.path.join(folder, "slice004.dcm"), "wb") as stream:
        stream.write(flipped(data, len(data) - 10))
    assert not np.array_equal(sitk.GetArrayFromImage(read_image(folder)), whole)


def test_a_dicom_series_missing_a_slice_is_refused(tmp_path, tiny_models_dir, capsys):
    """A slice file without the .dcm name, cut before its DICM marker, no longer looks like DICOM; deleted, it is
    not there at all. Either way the series has a gap, which ITK would close without a word (every slice after it
    misplaced): refused."""
    source = str(tmp_path / "source")
    write_dicom_series(small_ct(), source, suffix="")
    for case in ("cut before the DICM marker", "deleted"):
        folder = str(tmp_path / case.replace(" ", "_"))
        shutil.copytree(source, folder)
        path = os.path.join(folder, "slice004")
        if case == "deleted":
            os.remove(path)
        else:
            with open(path, "r+b") as stream:
                stream.truncate(100)
        assert_refused(segment_argv(folder, tmp_path, tiny_models_dir), str(tmp_path), capsys, "a slice is missing")
