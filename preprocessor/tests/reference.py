"""Reference readings for the preprocessor's tests: SimpleITK, nibabel and pydicom.

Reads a JSON list of jobs on stdin and prints a JSON list of results, one per job, so
that one Python process (one SimpleITK import) serves a whole test. Every job compares
a NIfTI written by radflow with what a reference tool makes of the same DICOM files:

- ``sitk_series``: SimpleITK's ImageSeriesReader (files sorted by GDCM), optionally
  resampled by ResampleImageFilter (linear) onto the grid radflow uses for a spacing:
  same origin and direction, ``round(n * old / new)`` voxels per axis;
- ``sitk_slices``: every file read alone by SimpleITK, stacked by position along the
  slice normal with the affine of the measured positions (sheared for a tilted
  gantry), then resampled by nibabel/scipy (linear) onto radflow's grid;
- ``nibabel_dicom``: nibabel's DICOM wrapper (enhanced multi-frame, Siemens mosaic);
- ``pydicom_pixels``: pydicom's pixel array of one file (rescale applied) against raw
  float32 values written by radflow;
- ``gap_planes``: SimpleITK's reading of a complete series against radflow's volume of
  the same series with slices missing: planes present must be equal, missing planes
  the mean of their neighbours.

Volumes are compared in nibabel's closest-canonical orientation, so that voxel order
conventions do not matter, only world geometry and values. Results: shapes, the largest
affine difference (mm), qform/sform differences of radflow's file, and absolute value
differences (mean, 99th percentile, max).

Other commands (``argv[1]``): ``paths`` prints where the packages keep their test
files; ``replicate SRC OUT N STEP`` writes N copies of one DICOM file as a series,
STEP mm apart along the slice normal; ``encode_j2k SRC OUT`` re-encodes a file as JPEG
2000 lossless with pydicom; ``encode_htj2k SRC OUT`` as High-Throughput JPEG 2000
lossless with OpenJPH's ``ojph_compress`` (the HTJ2K reference encoder), every file of
SRC into OUT when SRC is a folder.
"""

import gzip
import io
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_dicom(path):
    raw = open(path, "rb").read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return pydicom.dcmread(io.BytesIO(raw))


def sitk_affine(img):
    d = np.array(img.GetDirection()).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d * np.array(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ a


def sitk_array(img):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)


def canonical(data, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asanyarray(img.dataobj).astype(np.float64), img.affine


def padding_value(path):
    """Physical value of the Pixel Padding Value of a file, if it has one."""
    if path is None:
        return None
    ds = read_dicom(path)
    if "PixelPaddingValue" not in ds:
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    return float(ds.PixelPaddingValue) * slope + float(ds.get("RescaleIntercept", 0) or 0)


def compare(ours_path, ref_data, ref_affine, padding=None, domain=None):
    ours = nib.load(ours_path)
    out = {
        "qform_diff": float(np.abs(ours.get_qform() - ours.affine).max()),
        "sform_diff": float(np.abs(ours.get_sform() - ours.affine).max()),
        "qform_code": int(ours.header["qform_code"]),
        "sform_code": int(ours.header["sform_code"]),
    }
    a, aa = canonical(ours.get_fdata(dtype=np.float32), ours.affine)
    b, ba = canonical(ref_data, ref_affine)
    if domain is not None:
        domain = canonical(domain.astype(np.float32), ref_affine)[0] > 0.5
    out["shape"] = list(a.shape)
    out["ref_shape"] = list(b.shape)
    out["affine_diff"] = float(np.abs(aa - ba).max())
    if a.shape == b.shape:
        # Padding (pixels outside the scanned field) is masked by radflow and left as
        # stored by the references: compared apart.
        keep = np.ones(a.shape, bool) if padding is None else b != padding
        if domain is not None:
            # Only where values are interpolated, not extrapolated past the edge
            # voxels, where each tool has its own convention.
            out["extrapolated"] = int((~domain).sum())
            keep &= domain
        d = np.abs(a - b)[keep]
        out["mean_abs"] = float(d.mean())
        out["p99_abs"] = float(np.percentile(d, 99))
        out["max_abs"] = float(d.max())
        out["ref_mean"] = float(b.mean())
        if padding is not None:
            pad = b == padding
            out["padded"] = int(pad.sum())
            out["ours_at_padding"] = sorted({float(v) for v in np.unique(a[pad])[:5]})
    return out


def resample_size(size, spacing, target):
    return [max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in zip(size, spacing, target)]


def sitk_series(job):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(job["dicom"])
    reader.SetFileNames(names)
    img = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    domain = None
    if job.get("spacing"):
        target = [float(x) for x in job["spacing"]]
        size = resample_size(img.GetSize(), img.GetSpacing(), target)
        # Target voxels whose centres lie within the source's first and last centres.
        inside = [
            np.arange(m) * t / s <= n - 1 + 1e-6
            for m, t, s, n in zip(size, target, img.GetSpacing(), img.GetSize())
        ]
        domain = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        # Edge voxels extend outward, as radflow does for centres just past the edge.
        img = sitk.Resample(
            img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), target,
            img.GetDirection(), 0.0, sitk.sitkFloat32, True,
        )
    padding = None if job.get("spacing") else padding_value(names[0])
    out = compare(job["nifti"], sitk_array(img), sitk_affine(img), padding, domain)
    out["files"] = len(names)
    return out


def sitk_slices(job):
    import SimpleITK as sitk
    from nibabel.processing import resample_from_to

    slices = []
    for name in sorted(os.listdir(job["dicom"])):
        img = sitk.ReadImage(os.path.join(job["dicom"], name), sitk.sitkFloat32)
        slices.append(img)
    d = np.array(slices[0].GetDirection()).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    slices.sort(key=lambda s: float(np.dot(normal, s.GetOrigin())))
    first, last = np.array(slices[0].GetOrigin()), np.array(slices[-1].GetOrigin())
    spacing = slices[0].GetSpacing()
    a = np.eye(4)
    a[:3, 0] = d[:, 0] * spacing[0]
    a[:3, 1] = d[:, 1] * spacing[1]
    a[:3, 2] = (last - first) / (len(slices) - 1)
    a[:3, 3] = first
    stack = np.stack([sitk_array(s)[:, :, 0] for s in slices], axis=2)
    ref = nib.Nifti1Image(stack, LPS_TO_RAS @ a)
    ours = nib.load(job["nifti"])
    on_ours = resample_from_to(ref, (ours.shape, ours.affine), order=1, mode="nearest")
    out = compare(job["nifti"], np.asanyarray(on_ours.dataobj), ours.affine)
    # The stack's own affine against radflow's, when radflow kept the native grid.
    out["native_affine_diff"] = float(np.abs(ours.affine - ref.affine).max())
    return out


def nibabel_dicom(job):
    from nibabel.nicom import dicomwrappers

    ds = read_dicom(job["dicom"])
    if "PerFrameFunctionalGroupsSequence" in ds:
        # nibabel only picks this wrapper itself for Enhanced MR.
        w = dicomwrappers.MultiframeWrapper(ds)
    else:
        w = dicomwrappers.wrapper_from_data(ds)
    data = np.asarray(w.get_data(), np.float32)
    # nibabel's wrapper indexes (row, column, slice) in LPS; radflow (column, row, slice).
    affine = w.affine.copy()
    affine[:, [0, 1]] = affine[:, [1, 0]]
    out = compare(job["nifti"], data.transpose(1, 0, 2), LPS_TO_RAS @ affine)
    if "PerFrameFunctionalGroupsSequence" in ds:
        # Independently of any reader: every frame's own position must be the centre
        # of a voxel (0, 0, k) of radflow's grid.
        ours = nib.load(job["nifti"]).affine
        inv = np.linalg.inv(ours)
        dev = 0.0
        for frame in ds.PerFrameFunctionalGroupsSequence:
            p = [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient]
            p = LPS_TO_RAS @ np.array(p + [1.0])
            k = round(float((inv @ p)[2]))
            dev = max(dev, float(np.linalg.norm((ours @ [0, 0, k, 1] - p)[:3])))
        out["frame_position_dev"] = dev
    return out


def pydicom_pixels(job):
    ds = read_dicom(job["dicom"])
    ref = ds.pixel_array.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    ref = ref * slope + float(ds.get("RescaleIntercept", 0) or 0)
    ours = np.fromfile(job["raw"], dtype="<f4").astype(np.float64).reshape(ref.shape)
    padding = padding_value(job["dicom"])
    keep = np.ones(ref.shape, bool) if padding is None else ref != padding
    d = np.abs(ours - ref)[keep]
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "ref_min": float(ref[keep].min()),
        "ref_max": float(ref[keep].max()),
        "padded": int((~keep).sum()),
        "ours_at_padding": sorted({float(v) for v in np.unique(ours[~keep])[:5]}),
    }


def gap_planes(job):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(job["complete"]))
    full = reader.Execute()
    ref = sitk_array(full).astype(np.float64)
    missing = set(job["missing"])
    for k in missing:
        ref[:, :, k] = 0.5 * (ref[:, :, k - 1] + ref[:, :, k + 1])
    return compare(job["nifti"], ref, sitk_affine(full))


def replicate(src, out, n, step):
    ds = read_dicom(src)
    os.makedirs(out, exist_ok=True)
    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([float(x) for x in ds.ImagePositionPatient])
    series = pydicom.uid.generate_uid()
    for k in range(n):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + k * step * normal]
        # Written in reverse order so that file order is not slice order.
        ds.save_as(os.path.join(out, f"{n - k:03d}.dcm"), enforce_file_format=True)


def encode_j2k(src, out):
    from pydicom.uid import JPEG2000Lossless

    ds = read_dicom(src)
    ds.compress(JPEG2000Lossless)
    ds.save_as(out, enforce_file_format=True)


def encode_htj2k(src, out):
    import subprocess
    import tempfile

    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = read_dicom(src)
    signed = ds.PixelRepresentation == 1
    # The stored samples, not the rescaled values: what a modality would compress.
    raw = ds.pixel_array.astype("<i2" if signed else "<u2")
    with tempfile.TemporaryDirectory() as tmp:
        yuv, j2c = os.path.join(tmp, "in.yuv"), os.path.join(tmp, "out.j2c")
        raw.tofile(yuv)
        subprocess.run(
            [
                "ojph_compress", "-i", yuv, "-o", j2c, "-reversible", "true",
                "-dims", f"{{{ds.Columns},{ds.Rows}}}", "-num_comps", "1",
                "-signed", "true" if signed else "false",
                "-bit_depth", str(ds.BitsStored), "-downsamp", "{1,1}",
            ],
            check=True,
            capture_output=True,
        )
        with open(j2c, "rb") as f:
            stream = f.read()
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(out, enforce_file_format=True)


JOBS = {
    "sitk_series": sitk_series,
    "sitk_slices": sitk_slices,
    "nibabel_dicom": nibabel_dicom,
    "pydicom_pixels": pydicom_pixels,
    "gap_planes": gap_planes,
}


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "jobs"
    if cmd == "paths":
        import pydicom.data

        print(json.dumps({
            "pydicom": os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")),
            "nibabel": os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data"),
        }))
    elif cmd == "encode_htj2k":
        src, out = sys.argv[2], sys.argv[3]
        if os.path.isdir(src):
            # A folder: every file, in one process (the preprocessor benchmark).
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(src)):
                encode_htj2k(os.path.join(src, name), os.path.join(out, name))
        else:
            encode_htj2k(src, out)
    elif cmd == "replicate":
        replicate(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif cmd == "encode_j2k":
        encode_j2k(sys.argv[2], sys.argv[3])
    else:
        jobs = json.load(sys.stdin)
        results = []
        for job in jobs:
            try:
                r = JOBS[job["kind"]](job)
            except Exception as e:  # reported to the test, which fails with it
                r = {"error": f"{type(e).__name__}: {e}"}
            r["name"] = job.get("name", job["kind"])
            results.append(r)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
