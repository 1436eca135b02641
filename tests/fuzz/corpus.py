"""A corpus of bad inputs for ``medseg segment``, each in its own folder under one input folder, beside a
few good cases. Every entry is built from seeded synthetic data (no file is stored in the repository).

:func:`build_corpus` returns the :class:`Entry` list: its name (also its folder, ``<root>/<name>``), what
it is, and whether it is a good case. :data:`VANISHING` names the entry whose file the test deletes
between discovery and reading.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom

from pipeline.io.dicom_write import write_dicom_series
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case

SHAPE = (24, 24, 12)
SPACING = (1.0, 1.0, 2.5)
VANISHING = "vanishes_after_discovery"


@dataclass
class Entry:
    name: str
    what: str
    good: bool = False
    tolerated: str = ""  # why a `done` row is right for this odd input (the format defines it)


def _image(seed: int = 0, dtype=np.float32) -> np.ndarray:
    return ct_case(SHAPE, seed=seed)[0].astype(dtype)


def _affine(spacing=SPACING) -> np.ndarray:
    return make_affine("LPS", spacing=spacing)


def _nifti(folder: Path, name: str = "scan.nii.gz", array=None, affine=None) -> Path:
    return save_nifti(_image() if array is None else array, _affine() if affine is None else affine, folder / name)


def _nifti_sform(folder: Path, affine: np.ndarray) -> Path:
    """A NIfTI whose sform is ``affine`` as given (nibabel cannot make a qform of a degenerate one)."""
    image = nib.Nifti1Image(_image(), None)
    image.header.set_sform(affine, code=1)
    image.header["qform_code"] = 0
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(folder / "scan.nii.gz"))
    return folder / "scan.nii.gz"


def _flip(path: Path, offsets, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _itk(folder: Path, name: str, array=None, spacing=SPACING, direction=None, compress=False) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray((_image() if array is None else array).T))
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        if direction is not None:
            image.SetDirection(direction)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(image, str(path), compress)
    return path


def _edit_mha_header(path: Path, key: str, value: str) -> None:
    """Replace one line of an MHA text header (the header is ASCII, the pixels follow)."""
    data = path.read_bytes()
    end = data.index(b"ElementDataFile")
    lines = data[:end].decode().splitlines(keepends=True)
    lines = [f"{key} = {value}\n" if line.startswith(key) else line for line in lines]
    path.write_bytes("".join(lines).encode() + data[end:])


def _series(folder: Path, seed: int = 2) -> list[Path]:
    return write_dicom_series(_image(seed, np.int16), _affine(), folder)


def _edit_dicom(paths, edit: Callable[[pydicom.Dataset, int], None]) -> None:
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(str(path))
        edit(ds, k)
        ds.save_as(str(path))


# --- the entries ---------------------------------------------------------------------------------------


def _good_nifti(d: Path):
    _nifti(d, "scan.nii.gz", _image(1))


def _good_dicom(d: Path):
    _series(d, seed=2)


def _good_nrrd(d: Path):
    _itk(d, "scan.nrrd", _image(3))


def _nifti_truncated_gz(d):
    _truncate(_nifti(d), 400)


def _nifti_truncated_half_gz(d):
    path = _nifti(d)
    _truncate(path, path.stat().st_size // 2)


def _nifti_truncated_raw(d):
    path = _nifti(d, "scan.nii")
    _truncate(path, path.stat().st_size - 1000)


def _nifti_header_only(d):
    _truncate(_nifti(d, "scan.nii"), 352)


def _nifti_bitflip_gz(d):
    path = _nifti(d)
    _flip(path, range(path.stat().st_size // 2, path.stat().st_size // 2 + 64, 7))


def _nifti_bitflip_datatype(d):
    _flip(_nifti(d, "scan.nii"), [70])  # datatype 16 (float32) -> 239: no such type


def _nifti_bitflip_dims(d):
    _flip(_nifti(d, "scan.nii"), [43], 0x40)  # dim[1]'s high byte: 24 -> 16408 voxels along i


def _nifti_wrong_magic(d):
    path = _nifti(d, "scan.nii")
    data = bytearray(path.read_bytes())
    data[344:348] = b"XXX\x00"
    path.write_bytes(bytes(data))


def _nifti_empty_file(d):
    d.mkdir(parents=True)
    (d / "scan.nii.gz").write_bytes(b"")


def _nifti_random_bytes(d):
    d.mkdir(parents=True)
    (d / "scan.nii.gz").write_bytes(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _nifti_zero_voxels(d):
    _nifti(d, array=np.zeros((24, 24, 0), np.float32))


def _nifti_one_voxel(d):
    _nifti(d, array=np.full((1, 1, 1), 40.0, np.float32))


def _nifti_nan(d):
    image = _image()
    image[3:6, 4:7, 2] = np.nan
    _nifti(d, array=image)


def _nifti_inf_uncompressed(d):
    image = _image()
    image[5, 5, 5], image[6, 6, 6] = np.inf, -np.inf
    _nifti(d, "scan.nii", array=image)


def _nifti_all_nan(d):
    _nifti(d, array=np.full(SHAPE, np.nan, np.float32))


def _nifti_2d(d):
    _nifti(d, array=_image()[:, :, 0:1].reshape(24, 24))


def _nifti_4d(d):
    _nifti(d, array=np.stack([_image(), _image(1), _image(2)], axis=-1))


def _nifti_5d(d):
    _nifti(d, array=_image()[..., None, None].repeat(2, axis=4))


def _nifti_spacing_zero(d):
    _nifti_sform(d, _affine((0.0, 0.0, 0.0)))


def _nifti_spacing_negative_pixdim(d):
    path = _nifti(d, "scan.nii")
    image = nib.load(str(path), mmap=False)  # the file is rewritten below
    header = image.header.copy()
    header.set_sform(None, code=0)
    header["pixdim"][1:4] = [-1.0, -1.0, -2.5]
    header["qform_code"] = 1
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj).copy(), None, header), str(path))


def _nifti_spacing_huge(d):
    _nifti(d, affine=_affine((1e6, 1e6, 1e6)))


def _nifti_direction_singular(d):
    affine = _affine()
    affine[:3, 2] = affine[:3, 0]  # k along i: no volume
    _nifti_sform(d, affine)


def _nifti_affine_nan(d):
    affine = _affine()
    affine[0, 3] = np.nan
    _nifti_sform(d, affine)


def _nrrd_truncated(d):
    path = _itk(d, "scan.nrrd")
    _truncate(path, path.stat().st_size // 2)


def _nrrd_bitflip_gz(d):
    path = _itk(d, "scan.nrrd", compress=True)
    size = path.stat().st_size
    _flip(path, range(size // 2, size // 2 + 64, 5))


def _nrrd_wrong_magic(d):
    path = _itk(d, "scan.nrrd")
    data = bytearray(path.read_bytes())
    data[:4] = b"XRRD"
    path.write_bytes(bytes(data))


def _nrrd_nan(d):
    image = _image()
    image[0, 0, 0] = np.nan
    _itk(d, "scan.nrrd", image)


def _nrrd_2d(d):
    _itk(d, "scan.nrrd", _image()[:, :, 0])


def _nrrd_4d(d):
    _itk(d, "scan.nrrd", np.stack([_image(), _image(1)], axis=-1))


def _mha_spacing_zero(d):
    _edit_mha_header(_itk(d, "scan.mha"), "ElementSpacing", "0 0 0")


def _mha_spacing_negative(d):
    _edit_mha_header(_itk(d, "scan.mha"), "ElementSpacing", "-1 -1 -2.5")


def _mha_spacing_huge(d):
    _edit_mha_header(_itk(d, "scan.mha"), "ElementSpacing", "1e6 1e6 1e6")


def _mha_direction_non_orthogonal(d):
    _edit_mha_header(_itk(d, "scan.mha"), "TransformMatrix", "1 0 0 0.7 0.7 0 0 0 1")


def _mha_direction_singular(d):
    _edit_mha_header(_itk(d, "scan.mha"), "TransformMatrix", "1 0 0 1 0 0 0 0 1")


def _mha_truncated(d):
    path = _itk(d, "scan.mha")
    _truncate(path, path.stat().st_size - 2000)


def _mhd_missing_raw(d):
    import SimpleITK as sitk

    d.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(_image().T.copy()), str(d / "scan.mhd"))
    (d / "scan.raw").unlink()


def _dicom_truncated_slice(d):
    files = _series(d)
    _truncate(files[5], files[5].stat().st_size // 2)


def _dicom_bitflip_header(d):
    files = _series(d)
    _flip(files[4], range(300, 360, 3))


def _dicom_wrong_magic(d):
    for path in _series(d):
        data = bytearray(path.read_bytes())
        data[128:132] = b"XXXX"
        data[132:134] = b"\x99\x99"
        path.write_bytes(bytes(data))


def _dicom_missing_iop(d):
    _edit_dicom(_series(d), lambda ds, k: delattr(ds, "ImageOrientationPatient"))


def _dicom_missing_ipp(d):
    _edit_dicom(_series(d), lambda ds, k: delattr(ds, "ImagePositionPatient"))


def _dicom_mixed_orientation(d):
    def edit(ds, k):
        if k % 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    _edit_dicom(_series(d), edit)


def _dicom_mixed_sizes(d):
    files = _series(d)
    _edit_dicom(files[6:7], lambda ds, k: _shrink(ds))


def _shrink(ds: pydicom.Dataset) -> None:
    pixels = ds.pixel_array[:12, :12].copy()
    ds.Rows, ds.Columns = 12, 12
    ds.PixelData = pixels.tobytes()


def _dicom_duplicate_positions(d):
    files = _series(d)

    def edit(ds, k):
        if k == 7:
            ds.ImagePositionPatient = pydicom.dcmread(str(files[6])).ImagePositionPatient

    _edit_dicom(files, edit)


def _dicom_no_pixel_data(d):
    _edit_dicom(_series(d), lambda ds, k: delattr(ds, "PixelData"))


def _dicom_single_slice(d):
    files = _series(d)
    for path in files[1:]:
        path.unlink()


def _symlink_loop(d):
    d.mkdir(parents=True)
    os.symlink(".", d / "self")  # a folder that contains itself
    os.symlink("b.nii.gz", d / "a.nii.gz")
    os.symlink("a.nii.gz", d / "b.nii.gz")  # a file link loop
    os.symlink("missing.nii.gz", d / "dangling.nii.gz")


def _vanishes(d):
    _nifti(d, "scan.nii.gz", _image(4))


def _unreadable_chmod(d):
    path = _nifti(d)
    path.chmod(0)


def _unreadable_fifo_scan(d):
    d.mkdir(parents=True)
    os.mkfifo(d / "scan.nii.gz")  # open() blocks until a writer comes: a read must never get here


def _unreadable_fifo_other(d):
    d.mkdir(parents=True)
    os.mkfifo(d / "IM0001")  # no extension: discovery would sniff it for DICOM content


def _folder_named_like_a_scan(d):
    (d / "scan.nii.gz").mkdir(parents=True)  # a folder where a file is expected, and empty


def _ten_thousand_files(d):
    d.mkdir(parents=True)
    for k in range(10_000):
        (d / f"note_{k:05d}.txt").write_bytes(b"x")


def _gzip_of_nothing_like_nifti(d):
    d.mkdir(parents=True)
    (d / "scan.nii.gz").write_bytes(gzip.compress(b"hello" * 100))


ENTRIES: list[tuple[Entry, Callable[[Path], None]]] = [
    (Entry("good_nifti", "a good NIfTI", good=True), _good_nifti),
    (Entry("good_dicom", "a good DICOM series", good=True), _good_dicom),
    (Entry("good_nrrd", "a good NRRD", good=True), _good_nrrd),
    (Entry("nifti_truncated_gz", ".nii.gz cut to 400 bytes"), _nifti_truncated_gz),
    (Entry("nifti_truncated_half_gz", ".nii.gz cut in half"), _nifti_truncated_half_gz),
    (Entry("nifti_truncated_raw", ".nii missing its last 1000 bytes"), _nifti_truncated_raw),
    (Entry("nifti_header_only", ".nii of its header only"), _nifti_header_only),
    (Entry("nifti_bitflip_gz", ".nii.gz with bytes flipped mid-stream"), _nifti_bitflip_gz),
    (Entry("nifti_bitflip_datatype", ".nii with its datatype byte flipped"), _nifti_bitflip_datatype),
    (Entry("nifti_bitflip_dims", ".nii with a dim flipped (24 -> 16408)"), _nifti_bitflip_dims),
    (Entry("nifti_wrong_magic", ".nii with magic XXX"), _nifti_wrong_magic),
    (Entry("nifti_empty_file", "0-byte .nii.gz"), _nifti_empty_file),
    (Entry("nifti_random_bytes", "random bytes named .nii.gz"), _nifti_random_bytes),
    (Entry("nifti_gzip_not_nifti", "a gzip of text named .nii.gz"), _gzip_of_nothing_like_nifti),
    (Entry("nifti_zero_voxels", "24x24x0 volume"), _nifti_zero_voxels),
    (Entry("nifti_one_voxel", "1x1x1 volume"), _nifti_one_voxel),
    (Entry("nifti_nan", "float32 .nii.gz with 9 NaN voxels"), _nifti_nan),
    (Entry("nifti_inf_uncompressed", "float32 .nii with +Inf and -Inf"), _nifti_inf_uncompressed),
    (Entry("nifti_all_nan", "float32 .nii.gz, every voxel NaN"), _nifti_all_nan),
    (Entry("nifti_2d", "2D 24x24 image"), _nifti_2d),
    (Entry("nifti_4d", "4D 24x24x12x3"), _nifti_4d),
    (Entry("nifti_5d", "5D 24x24x12x1x2"), _nifti_5d),
    (Entry("nifti_spacing_zero", "affine of zero spacing"), _nifti_spacing_zero),
    (Entry("nifti_spacing_negative_pixdim", "qform-only with negative pixdim",
           tolerated="NIfTI takes |pixdim| (the sign of an axis is qfac's); nibabel and ITK agree"), _nifti_spacing_negative_pixdim),
    (Entry("nifti_spacing_huge", "spacing 1e6 mm"), _nifti_spacing_huge),
    (Entry("nifti_direction_singular", "affine with k along i (singular)"), _nifti_direction_singular),
    (Entry("nifti_affine_nan", "affine with a NaN origin"), _nifti_affine_nan),
    (Entry("nrrd_truncated", "raw NRRD cut in half"), _nrrd_truncated),
    (Entry("nrrd_bitflip_gz", "gzip NRRD with bytes flipped"), _nrrd_bitflip_gz),
    (Entry("nrrd_wrong_magic", "NRRD with magic XRRD"), _nrrd_wrong_magic),
    (Entry("nrrd_nan", "float NRRD with a NaN"), _nrrd_nan),
    (Entry("nrrd_2d", "2D NRRD"), _nrrd_2d),
    (Entry("nrrd_4d", "4D NRRD"), _nrrd_4d),
    (Entry("mha_spacing_zero", "MHA ElementSpacing 0 0 0"), _mha_spacing_zero),
    (Entry("mha_spacing_negative", "MHA ElementSpacing -1 -1 -2.5",
           tolerated="ITK's MetaImage reader folds the signs into the direction (spacing 1, 1, 2.5)"), _mha_spacing_negative),
    (Entry("mha_spacing_huge", "MHA ElementSpacing 1e6"), _mha_spacing_huge),
    (Entry("mha_direction_non_orthogonal", "MHA TransformMatrix with a 45° shear"), _mha_direction_non_orthogonal),
    (Entry("mha_direction_singular", "MHA TransformMatrix with two equal rows"), _mha_direction_singular),
    (Entry("mha_truncated", "MHA missing 2000 bytes"), _mha_truncated),
    (Entry("mhd_missing_raw", ".mhd whose .raw is gone"), _mhd_missing_raw),
    (Entry("dicom_truncated_slice", "series with one slice cut in half"), _dicom_truncated_slice),
    (Entry("dicom_bitflip_header", "series with one slice's header bytes flipped"), _dicom_bitflip_header),
    (Entry("dicom_wrong_magic", "series without the DICM marker"), _dicom_wrong_magic),
    (Entry("dicom_missing_iop", "series without ImageOrientationPatient"), _dicom_missing_iop),
    (Entry("dicom_missing_ipp", "series without ImagePositionPatient"), _dicom_missing_ipp),
    (Entry("dicom_mixed_orientation", "series alternating two orientations",
           tolerated="split by orientation: the 6 axial slices are a sound volume"), _dicom_mixed_orientation),
    (Entry("dicom_mixed_sizes", "series with one 12x12 slice",
           tolerated="split by size: the lone 12x12 slice is a one-slice scan; the rest has a gap"), _dicom_mixed_sizes),
    (Entry("dicom_duplicate_positions", "series with two slices at one position"), _dicom_duplicate_positions),
    (Entry("dicom_no_pixel_data", "series without PixelData"), _dicom_no_pixel_data),
    (Entry("dicom_single_slice", "a series of one slice",
           tolerated="a one-slice series is a 2D scan (input.min_slices sets a minimum)"), _dicom_single_slice),
    (Entry("symlink_loop", "folder linking to itself, a.nii.gz <-> b.nii.gz, a dangling link"), _symlink_loop),
    (Entry(VANISHING, "a NIfTI deleted between discovery and reading"), _vanishes),
    (Entry("unreadable_chmod_000", "a NIfTI with mode 000"), _unreadable_chmod),
    (Entry("unreadable_fifo_scan", "a FIFO named scan.nii.gz"), _unreadable_fifo_scan),
    (Entry("unreadable_fifo_other", "a FIFO named IM0001"), _unreadable_fifo_other),
    (Entry("folder_named_like_a_scan", "an empty folder named scan.nii.gz"), _folder_named_like_a_scan),
    (Entry("ten_thousand_files", "10,000 one-byte .txt files"), _ten_thousand_files),
]


def build_corpus(root: Path) -> list[Entry]:
    """Every entry under ``root/<name>``; the good cases first."""
    root.mkdir(parents=True, exist_ok=True)
    for entry, build in ENTRIES:
        build(root / entry.name)
    entries = [replace(entry) for entry, _ in ENTRIES]
    for entry in entries:
        if entry.name == "unreadable_chmod_000" and not is_unreadable(root / entry.name / "scan.nii.gz"):
            entry.tolerated = "mode 000 does not stop root from reading: the FIFO and folder entries stand in"
    return entries


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def is_unreadable(path: Path) -> bool:
    """Whether mode 000 stops reads here (it does not for root)."""
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True
    except OSError:
        return not stat.S_ISREG(path.stat().st_mode)
