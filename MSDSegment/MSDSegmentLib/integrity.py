"""Whole input files only: each is checked before ITK reads it, and a compressed one is decompressed once.

ITK's readers let damaged files through: the NIfTI reader fills a file cut short with zeros and turns NaN and
infinite voxels into 0; none of the readers checks a gzip or zlib stream's checksum; GDCM leaves a DICOM file it
cannot parse out of its series. What can be told from a damaged file, and where it is checked:
- A compressed stream (.nii.gz, NRRD "encoding: gzip", MetaImage "CompressedData = True") ends with a checksum
  of its contents (CRC-32 and length for gzip, Adler-32 for zlib). A cut anywhere fails it, and so does a changed
  byte of the compressed data in all but a negligible share of cases. ISA-L's inflate (Python's zlib where ISA-L
  is not installed) decompresses the stream here, once, into a temporary uncompressed copy that ITK then reads,
  so the check costs no second decompression.
  (Bytes of a gzip header that hold no content, such as its time stamp, change nothing and are not checked.)
- An uncompressed file has no checksum. A cut shows as a file shorter than its header says: checked here for
  NIfTI, by ITK's readers for NRRD and MetaImage. A changed header byte is caught where it breaks the header (magic,
  dimension count, voxel type) or makes the data longer than the file; one in free text (a description, a
  comment) changes nothing that matters. A changed voxel byte cannot be told in general, since any bit pattern is
  a valid integer, except where it makes a float voxel NaN or infinite: those are refused in every format (the
  engine checks the voxels ITK decoded; NIfTI's raw voxels are checked here, since ITK's reader turns them into 0).
- DICOM: a file in the series folder that GDCM cannot parse refuses the whole series, which would otherwise miss a
  slice. A file that has lost both its "DICM" preamble and its .dcm name no longer looks like DICOM and is not
  noticed. Pixel data carry no checksum.
"""

import contextlib
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np

from .errors import InputError

try:  # ISA-L's inflate: zlib's streams, checks and interface, in about half of zlib's time
    from isal import isal_zlib as inflater
except ImportError:  # not installed (Slicer's requirements leave it out; a platform without its wheel)
    inflater = zlib

CHUNK_BYTES = 8 << 20  # compressed bytes read per step
OUTPUT_BYTES = 64 << 20  # at most this much decompressed per step, whatever the ratio (a file of zeros: ~1000:1)
ANY_ZLIB_HEADER = zlib.MAX_WBITS | 32  # gzip or zlib, told from the stream's own header
GZIP_MAGIC = b"\x1f\x8b"
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
# NIfTI-1 and NIfTI-2 single-file headers: the magic's offset, the magic, sizeof_hdr, and the (struct format,
# offset) of datatype, bitpix, dim[8] and vox_offset.
NIFTI_LAYOUTS = ((344, b"n+1\0", 348, (("h", 70), ("h", 72), ("8h", 40), ("f", 108))),
                 (4, b"n+2\0", 540, (("h", 12), ("h", 14), ("8q", 16), ("q", 168))))
NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
              1536: 128, 1792: 128, 2048: 256, 2304: 32}  # bits per voxel of each datatype code
METAIMAGE_BYTES = {"met_char": 1, "met_uchar": 1, "met_short": 2, "met_ushort": 2, "met_int": 4, "met_uint": 4,
                   "met_long": 4, "met_ulong": 4, "met_long_long": 8, "met_ulong_long": 8, "met_float": 4,
                   "met_double": 8}  # bytes per value of MetaIO's element types
DICOM_PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM file


def inflate(source, target, inflater=inflater):
    """Decompress the gzip or zlib stream(s) read from `source` into `target`, checking each stream's checksum.
    Returns False when the data end before the stream does (the file was cut); inflater.error on corrupt data.
    Consecutive gzip members (as bgzip writes them) are read in turn; bytes after the last one are ignored.
    Large steps, because the inflater lets go of Python's lock only inside each call: with many small ones, the thread
    importing PyTorch meanwhile made reading a CT four times slower."""
    stream = inflater.decompressobj(ANY_ZLIB_HEADER)
    data = source.read(CHUNK_BYTES)
    while data:
        target.write(stream.decompress(data, OUTPUT_BYTES))
        if not stream.eof:
            data = stream.unconsumed_tail or source.read(CHUNK_BYTES)
            continue
        data = stream.unused_data or source.read(CHUNK_BYTES)
        if not data.startswith(GZIP_MAGIC):
            return True
        stream = inflater.decompressobj(ANY_ZLIB_HEADER)
    target.write(stream.flush())  # output the inflater still held when the step's limit stopped it at the input's end
    return stream.eof


def header_lines(source, last):
    """The header lines of `source` up to and including the one `last(line)` accepts (None: no such line);
    `source` is then at the first data byte."""
    lines = []
    for line in iter(source.readline, b""):
        lines.append(line)
        if last(line):
            return lines
    return None


def field(line, separator):
    """(lower-case key, value) of a header line "key<separator>value"."""
    key, _, value = line.decode("latin-1").partition(separator)
    return key.strip().lower(), value.strip().lower()


def raw_nrrd_header(source):
    """The header of an NRRD file with gzip-compressed data in the same file, rewritten for raw data; None for any
    other NRRD (ITK reads it as it is)."""
    lines = header_lines(source, lambda line: not line.strip())
    if not lines:
        return None
    fields = dict(field(line, ":") for line in lines[1:] if b":" in line and not line.startswith(b"#"))
    detached_or_skipped = {"data file", "datafile", "line skip", "byte skip"} & set(fields)
    if fields.get("encoding") not in ("gzip", "gz") or detached_or_skipped:
        return None  # detached data, or skips whose meaning differs between compressed and raw data
    return b"".join(b"encoding: raw\n" if field(line, ":")[0] == "encoding" else line for line in lines)


def raw_metaimage_header(source):
    """The header of a MetaImage (.mha) whose zlib-compressed data follow it, rewritten for raw data; None for any
    other (ITK reads it as it is)."""
    lines = header_lines(source, lambda line: field(line, "=")[0] == "elementdatafile")
    if not lines or field(lines[-1], "=")[1] != "local":
        return None
    fields = dict(field(line, "=") for line in lines)
    if fields.get("compresseddata") != "true":
        return None
    kept = [line for line in lines if field(line, "=")[0] not in ("compresseddata", "compresseddatasize")]
    return b"CompressedData = False\n" + b"".join(kept)


def check_metaimage_length(path, name):
    """Refuse a MetaImage whose voxels, stored in the same file, are fewer than its header says: ITK refuses it too,
    but prints MetaIO's own complaint to the console and blames a missing file."""
    with open(path, "rb") as source:
        lines = header_lines(source, lambda line: field(line, "=")[0] == "elementdatafile")
        start = source.tell()
    fields = dict(field(line, "=") for line in lines or [])
    if fields.get("elementdatafile") != "local" or fields.get("compresseddata") == "true":
        return
    try:
        values = int(np.prod([int(size) for size in fields["dimsize"].split()], dtype=np.int64))
        size = values * int(fields.get("elementnumberofchannels", "1")) * METAIMAGE_BYTES[fields["elementtype"]]
    except (KeyError, ValueError):
        return  # a header ITK will refuse by itself
    if os.path.getsize(path) - start < size:
        raise InputError(f"Cannot read image {name}: it is cut short ({os.path.getsize(path) - start:,} of "
                         f"{size:,} data bytes)")


def decompressed_copy(path, folder):
    """An uncompressed copy of `path` in `folder`, with its checksums verified, or None if `path` is not compressed
    (or compressed in a way left to ITK: detached data)."""
    lower = path.lower()
    with open(path, "rb") as source:
        if lower.endswith(".nii.gz"):
            header, name = b"", "image.nii"
        elif lower.endswith(".nrrd"):
            header, name = raw_nrrd_header(source), "image.nrrd"
        elif lower.endswith(".mha"):
            header, name = raw_metaimage_header(source), "image.mha"
        else:
            return None
        if header is None:
            return None
        copy = os.path.join(folder, name)
        with open(copy, "wb") as target:
            target.write(header)
            try:
                whole = inflate(source, target)
            except inflater.error as error:
                raise InputError(f"Cannot read image {path}: its compressed data are corrupt ({error})") from None
        if not whole:
            raise InputError(f"Cannot read image {path}: its compressed data are cut short (an incomplete file)")
    return copy


def nifti_header(path, name):
    """(byte order, datatype, voxel count, data offset) of a NIfTI-1 or NIfTI-2 file, read here rather than
    by ITK: without its magic ITK reads the file as Analyze 7.5 on a made-up grid, and NIfTI's C library prints
    its own complaints about a damaged header to the console. InputError (one line) for a damaged header."""
    with open(path, "rb") as stream:
        head = stream.read(552)

    def damaged(what):
        return InputError(f"Cannot read image {name}: {what} (a damaged file)")

    for magic_at, magic, header_size, fields in NIFTI_LAYOUTS:
        if head[magic_at:magic_at + len(magic)] != magic:
            continue
        if len(head) < header_size:
            raise damaged("it is cut short inside its header")
        order = next((order for order in "<>" if struct.unpack(order + "i", head[:4])[0] == header_size), None)
        if order is None:
            raise damaged("its header size is not NIfTI's")
        datatype, bitpix, dims, offset = (struct.unpack_from(order + kind, head, at) for kind, at in fields)
        datatype, bitpix, offset = datatype[0], bitpix[0], int(offset[0])
        if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1:
            raise damaged(f"its header has impossible dimensions {list(dims)}")
        if NIFTI_BITS.get(datatype) != bitpix:
            raise damaged(f"its header has an unknown voxel type ({datatype}, {bitpix} bits)")
        if offset < header_size + 4:
            raise damaged(f"its header puts the voxels at byte {offset}, inside the header")
        voxels = int(np.prod(dims[1:dims[0] + 1], dtype=np.int64))
        return order, datatype, voxels, offset
    raise damaged("its header has no NIfTI magic")


def check_nifti(path, name):
    """Refuse a NIfTI file (uncompressed, at `path`; `name` for messages) whose header is damaged, whose data are
    shorter than its header says, or that stores NaN or infinite voxels (ITK's reader turns them into 0)."""
    order, datatype, voxels, offset = nifti_header(path, name)
    size = voxels * NIFTI_BITS[datatype] // 8
    if os.path.getsize(path) < offset + size:
        raise InputError(f"Cannot read image {name}: it is cut short ({max(os.path.getsize(path) - offset, 0):,} "
                         f"of {size:,} data bytes)")
    if datatype in NIFTI_FLOAT_TYPES and not finite_voxels(path, offset, voxels,
                                                          np.dtype(order + NIFTI_FLOAT_TYPES[datatype])):
        raise InputError(f"{name} contains NaN or infinite voxels (a NIfTI reader would turn them into 0 and "
                         "segment made-up values): replace them first")


def finite_voxels(path, offset, voxels, dtype):
    """Whether the `voxels` floats of `dtype` stored from `offset` on are all finite, read a slab at a time."""
    with open(path, "rb") as stream:
        stream.seek(offset)
        remaining = voxels
        while remaining:
            count = min(remaining, (64 << 20) // dtype.itemsize)
            if not np.isfinite(np.frombuffer(stream.read(count * dtype.itemsize), dtype)).all():
                return False
            remaining -= count
    return True


@contextlib.contextmanager
def readable_copy(path):
    """The path ITK should read for the input `path` once it is known to be whole: `path` itself, or a verified
    uncompressed copy in a temporary folder removed afterwards. InputError (one line) for a damaged file."""
    if os.path.isdir(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="msdsegment-")
    try:
        try:
            readable = decompressed_copy(path, folder) or path
        except OSError as error:  # the input unreadable, or no room for the copy
            raise InputError(f"Cannot read image {path}: {error.strerror or error}") from None
        if readable.lower().endswith(".nii"):
            check_nifti(readable, path)
        elif readable.lower().endswith(".mha"):
            check_metaimage_length(readable, path)
        yield readable
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def looks_like_dicom(path):
    """A .dcm file, or one with the DICOM "DICM" marker."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(DICOM_PREAMBLE)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def unparsed_dicom_files(folder, listed):
    """The files of `folder` that look like DICOM but are in none of its series (`listed`): GDCM could not parse
    them. A DICOMDIR is an index, not an image."""
    listed = {os.path.normpath(path) for path in listed}
    paths = (os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.upper() != "DICOMDIR")
    return [path for path in paths if os.path.isfile(path) and os.path.normpath(path) not in listed
            and looks_like_dicom(path)]
