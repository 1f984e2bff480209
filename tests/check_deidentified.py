"""Checks the SEG and SR a de-identifying destination received against the objects as
radflow stored them, with pydicom; run by the de-identification test.

    check_deidentified.py KEY_FILE STORED_DIR RECEIVED_DIR

STORED_DIR holds seg.dcm and sr.dcm as written; RECEIVED_DIR the two objects as the
destination got them. Checked, walking both datasets side by side: every instance UID
was replaced by 2.25.<first 128 bits of HMAC-SHA-256(key, "uid" NUL uid)>, computed
here independently, so references (the SR to its SEG, both to the source images)
still resolve; the label map (Pixel Data, segments) and the SR's measurements are
unchanged; no private attribute is left; the profile's attributes say what was done.
Prints "OK ..." or the difference, exiting 1.
"""

import hashlib
import hmac
import os
import sys

import pydicom
from pydicom.tag import Tag

# Instance UIDs the check expects replaced (a subset of the profile's U attributes,
# those radflow's objects carry).
INSTANCE_UIDS = {
    Tag(0x0020, 0x000D),  # Study Instance UID
    Tag(0x0020, 0x000E),  # Series Instance UID
    Tag(0x0008, 0x0018),  # SOP Instance UID
    Tag(0x0008, 0x1155),  # Referenced SOP Instance UID
    Tag(0x0020, 0x0052),  # Frame of Reference UID
    Tag(0x0020, 0x9164),  # Dimension Organization UID
    Tag(0x0062, 0x0021),  # Tracking UID
    Tag(0x0040, 0xA124),  # UID
}
# Kept as they are.
KEPT = {
    Tag(0x0008, 0x0016),  # SOP Class UID
    Tag(0x0028, 0x0010),  # Rows
    Tag(0x0028, 0x0011),  # Columns
    Tag(0x0028, 0x0008),  # Number of Frames
    Tag(0x0062, 0x0005),  # Segment Label
    Tag(0x0062, 0x0004),  # Segment Number
    Tag(0x0040, 0xA30A),  # Numeric Value
    Tag(0x0040, 0xA040),  # Value Type
    Tag(0x0008, 0x0100),  # Code Value
    Tag(0x7FE0, 0x0010),  # Pixel Data
}

failures = []


def fail(message):
    failures.append(message)


def expected_uid(key, uid):
    digest = hmac.new(key, b"uid\0" + uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def walk(key, stored, received, path):
    """Compares one dataset of the stored object with its received counterpart."""
    counted = 0
    for elem in stored:
        where = f"{path}{elem.tag}"
        if elem.tag not in received:
            continue  # removed by the profile; the Rust test greps for leaks
        got = received[elem.tag]
        if elem.VR == "SQ":
            if len(got.value) not in (0, len(elem.value)):
                fail(f"{where}: {len(got.value)} items for {len(elem.value)}")
                continue
            for i, (a, b) in enumerate(zip(elem.value, got.value)):
                counted += walk(key, a, b, f"{where}[{i}]")
            continue
        if elem.tag in INSTANCE_UIDS and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            got_values = got.value if got.VM > 1 else [got.value]
            want = [expected_uid(key, str(u)) for u in values]
            if [str(u) for u in got_values] != want:
                fail(f"{where}: {got.value} is not the keyed replacement of {elem.value}")
            counted += len(values)
        elif elem.tag in KEPT and got.value != elem.value:
            fail(f"{where}: changed")
    for elem in received:
        if elem.tag.is_private:
            fail(f"{path}{elem.tag}: a private attribute is left")
    return counted


def referenced(ds, out):
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                referenced(item, out)
        elif elem.tag == Tag(0x0008, 0x1155):
            out.add(str(elem.value))
    return out


def main(key_file, stored_dir, received_dir):
    key = open(key_file, "rb").read().strip()
    stored = {
        ds.Modality: ds
        for ds in (pydicom.dcmread(os.path.join(stored_dir, f)) for f in ("seg.dcm", "sr.dcm"))
    }
    received = {}
    for name in sorted(os.listdir(received_dir)):
        ds = pydicom.dcmread(os.path.join(received_dir, name))
        received[ds.Modality] = ds
    if sorted(received) != ["SEG", "SR"]:
        print(f"received {sorted(received)}, not SEG and SR")
        return 1
    uids = 0
    for modality in ("SEG", "SR"):
        a, b = stored[modality], received[modality]
        uids += walk(key, a, b, f"{modality} ")
        if b.get("PatientIdentityRemoved") != "YES":
            fail(f"{modality}: Patient Identity Removed is {b.get('PatientIdentityRemoved')}")
        codes = [str(c.CodeValue) for c in b.get("DeidentificationMethodCodeSequence", [])]
        if "113100" not in codes:
            fail(f"{modality}: De-identification Method Code Sequence is {codes}")
        if str(b.file_meta.MediaStorageSOPInstanceUID) != str(b.SOPInstanceUID):
            fail(f"{modality}: the File Meta's SOP Instance UID is not the instance's")
        if str(b.PatientID) == str(a.PatientID) or str(b.PatientName) != str(b.PatientID):
            fail(f"{modality}: Patient ID/Name not replaced by the pseudonym")
    seg, sr = received["SEG"], received["SR"]
    if seg.PixelData != stored["SEG"].PixelData:
        fail("SEG: the label map changed")
    if (str(seg.StudyInstanceUID), str(seg.PatientID)) != (str(sr.StudyInstanceUID), str(sr.PatientID)):
        fail("SEG and SR disagree on study or patient")
    if str(seg.SOPInstanceUID) not in referenced(sr, set()):
        fail("the SR does not reference the received SEG")
    if failures:
        print("\n".join(failures))
        return 1
    print(f"OK: {uids} UIDs replaced consistently, label map and measurements unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
