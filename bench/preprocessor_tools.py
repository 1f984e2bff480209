"""The reference pipelines of bench/preprocessor.py, one per process so that each one's
peak RSS is measured alone: the same steps as `radflow volume --preset demo-tissue`
(read, decode, build the volume, resample to 1.5 mm, CT window [-1000, 1000] to
[0, 1], write .nii.gz).

    python3 preprocessor_tools.py sitk SERIES_DIR OUT.nii.gz
    python3 preprocessor_tools.py dicom2nifti SERIES_DIR OUT.nii.gz
    python3 preprocessor_tools.py compare A.nii.gz B.nii.gz
"""

import math
import os
import sys
import tempfile

SPACING = (1.5, 1.5, 1.5)


def sitk_pipeline(src, out):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(src))
    img = reader.Execute()
    # radflow's grid: same origin and direction, round(n * old / new) voxels per axis.
    size = [max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), SPACING)]
    res = sitk.ResampleImageFilter()
    res.SetSize(size)
    res.SetOutputOrigin(img.GetOrigin())
    res.SetOutputSpacing(SPACING)
    res.SetOutputDirection(img.GetDirection())
    res.SetInterpolator(sitk.sitkLinear)
    res.SetOutputPixelType(sitk.sitkFloat32)
    res.SetUseNearestNeighborExtrapolator(True)
    vol = res.Execute(img)
    vol = sitk.Clamp((vol + 1000.0) / 2000.0, sitk.sitkFloat32, 0.0, 1.0)
    sitk.WriteImage(vol, out, useCompression=True)


def dicom2nifti_pipeline(src, out):
    import dicom2nifti
    import nibabel as nib
    import numpy as np
    from nibabel.processing import resample_to_output

    with tempfile.TemporaryDirectory() as tmp:
        converted = dicom2nifti.dicom_series_to_nifti(
            src, os.path.join(tmp, "series.nii"), reorient_nifti=False
        )
        img = nib.load(converted["NII_FILE"])
        res = resample_to_output(img, SPACING, order=1, mode="nearest")
        data = np.clip((res.get_fdata(dtype=np.float32) + 1000.0) / 2000.0, 0.0, 1.0)
        nib.save(nib.Nifti1Image(data, res.affine), out)


def compare(a, b):
    """Mean and 99th percentile of |a - b| in HU (window width 2000) on b's grid."""
    import nibabel as nib
    import numpy as np

    x = nib.as_closest_canonical(nib.load(a))
    y = nib.as_closest_canonical(nib.load(b))
    if x.shape != y.shape or not np.allclose(x.affine, y.affine, atol=1e-3):
        print(f"grids differ: {x.shape} vs {y.shape}")
        return
    d = np.abs(x.get_fdata(dtype=np.float32) - y.get_fdata(dtype=np.float32)) * 2000.0
    print(f"{d.mean():.3f} {np.percentile(d, 99):.3f} {x.shape}")


if __name__ == "__main__":
    cmd, a, b = sys.argv[1:4]
    {"sitk": sitk_pipeline, "dicom2nifti": dicom2nifti_pipeline, "compare": compare}[cmd](a, b)
