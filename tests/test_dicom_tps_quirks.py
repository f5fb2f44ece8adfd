"""What real planning-system exports do that the shared real files do not show (issue #27), on
DICOM generated with pydicom: an exported phantom patient edited into a RayStation SRS plan, an
Eclipse plan with setup fields, a Gamma Knife plan, a duplicated RTPLAN, a water phantom, an
anonymised patient."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from addiff_core.case_io import load_case
from addiff_core.checks import check_case
from addiff_core.dicom.mapping import load_mapping
from addiff_core.dicom.names import NameMapper, infer_tumour_site, target_dose_from_name, unsupported_site
from addiff_core.dicom.objects import save
from addiff_core.dicom.reader import import_dicom
from addiff_core.dicom.validate import DicomWriteError
from addiff_core.dicom.writer import clinical_dose_grid, export_case, write_predicted_rtdose
from addiff_core.errors import UserError
from helpers.dicom import edit, synth_case_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One phantom head-and-neck patient (PTV70, PTV56, 7 beams) exported as DICOM-RT."""
    root = tmp_path_factory.mktemp("tps")
    export_case(synth_case_dir(root / "cases", "p1"), root / "dicom" / "p1")
    return root / "dicom" / "p1"


def _copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "src" / "p1"))


def _import(src_root: Path, out: Path, mapping: dict | None = None, tmp: Path | None = None):
    lines: list[str] = []
    m = None
    if mapping is not None:
        (tmp / "map.yaml").write_text(yaml.safe_dump(mapping))
        m = load_mapping(tmp / "map.yaml")
    summary = import_dicom(src_root, out, m, echo=lines.append)
    return summary, "\n".join(lines)


def _rename(mapping: dict[str, str]):
    def change(ds):
        for roi in ds.StructureSetROISequence:
            roi.ROIName = mapping.get(str(roi.ROIName), str(roi.ROIName))
    return change


# ---- 1: every written object is valid, whatever the contour size ------------------------------
def test_an_element_over_64_kb_is_written_implicit_vr_and_an_invalid_value_is_refused(tmp_path, exported):
    ds = pydicom.dcmread(exported / "rtstruct.dcm")
    item = ds.ROIContourSequence[0].ContourSequence[0]
    item.ContourData = [f"{v:.2f}" for v in np.linspace(-250.0, 250.0, 3 * 9000)]  # ~200 KB of DS text
    item.NumberOfContourPoints = 9000
    out = save(ds, tmp_path / "big.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = pydicom.dcmread(out)
    elem = back.ROIContourSequence[0].ContourSequence[0]["ContourData"]
    assert elem.VR == "DS" and len(elem.value) == 27000 and float(elem.value[-1]) == 250.0
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns on the assignment; save() refuses it
        ds.PatientBirthDate = "a9f3c2d1e0"  # an anonymiser's hash: not a date
    with pytest.raises(DicomWriteError, match=r"not written, invalid value: \(0010,0030\) PatientBirthDate"):
        save(ds, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()


# ---- 2: numbered targets are not doses --------------------------------------------------------
def test_a_number_in_a_target_name_is_a_dose_only_with_a_unit_or_the_plans_prescription():
    assert target_dose_from_name("PTV_1") is None and target_dose_from_name("PTV_70") is None
    assert target_dose_from_name("PTV_70Gy") == 70 and target_dose_from_name("PTV 5040cGy") == pytest.approx(50.4)
    assert target_dose_from_name("PTV_Gy60") == 60
    assert target_dose_from_name("PTV_7000", [70.0]) == 70 and target_dose_from_name("PTV_1", [20.0]) is None
    assert NameMapper()("PTV_3") == ("PTV_3", False)


def test_raystation_numbered_srs_targets_take_their_doses_from_the_rtplan(tmp_path, exported):
    src = _copy(exported, tmp_path)
    edit(src / "rtstruct.dcm", _rename({"PTV70": "PTV_1", "PTV56": "PTV_2"}))
    summary, out = _import(src.parent, tmp_path / "out")
    case = load_case(summary.imported[0].case_dir)
    assert case.plan.prescriptions == {"PTV_1": 70.0, "PTV_2": 56.0}  # not 1 and 2 Gy
    assert "(RTPLAN)" in out and "looks like cGy" not in out

    def unlink(ds):  # the dose references tied to no ROI: which target gets which dose is unknown
        for dr in ds.DoseReferenceSequence:
            del dr.ReferencedROINumber
            dr.DoseReferenceDescription = "Brain mets"
    edit(src / "rtplan.dcm", unlink)
    summary, out = _import(src.parent, tmp_path / "out2")
    assert not summary.imported
    line = next(ln for ln in out.splitlines() if "SKIPPED" in ln)
    assert "rtplan.dcm: no prescription tied to a target structure" in line
    assert "target names (PTV_2, PTV_1) carry no dose with a unit" in line
    assert "70 Gy 'Brain mets'" in line and "--map" in line
    notes = out.splitlines()[out.splitlines().index(line) + 1:]  # what was found is printed on skip too (#27.5)
    assert "    note: prescription 70 Gy (dose reference 'Brain mets', VOLUME) is tied to no structure: ignored" in notes


@pytest.mark.parametrize("kind,expected", [("VOLUME", {"Boost": 70.0}), ("SITE", None)])
def test_a_dose_reference_without_roi_names_its_structure_only_as_a_volume(tmp_path, exported, kind, expected):
    """Without a plan dose to tell which target receives it, a VOLUME reference's description names
    its structure; a SITE's names the treated site (Eclipse's "Breast" is not the ROI "Breast")."""
    src = _copy(exported, tmp_path)
    (src / "rtdose.dcm").unlink()
    edit(src / "rtstruct.dcm", _rename({"PTV70": "Boost"}))

    def unlink(ds):
        ds.DoseReferenceSequence = Sequence([ds.DoseReferenceSequence[0]])
        dr = ds.DoseReferenceSequence[0]
        del dr.ReferencedROINumber
        dr.DoseReferenceStructureType, dr.DoseReferenceDescription = kind, "Boost"
    edit(src / "rtplan.dcm", unlink)
    summary, out = _import(src.parent, tmp_path / "out")
    if expected is None:
        assert not summary.imported and "70 Gy 'Boost' (SITE)" in out and "--map" in out
    else:
        assert load_case(summary.imported[0].case_dir).plan.prescriptions == expected
        assert "prescription 70 Gy (dose reference 'Boost', VOLUME) assigned to Boost (its name)" in out


# ---- 3: setup and imaging fields are not treatment beams ----------------------------------------
def test_setup_and_imaging_fields_without_meterset_are_not_beams(tmp_path, exported):
    src = _copy(exported, tmp_path)

    def eclipse(ds):
        group = ds.FractionGroupSequence[0]
        for ref in group.ReferencedBeamSequence:
            ref.BeamMeterset, ref.BeamDose = "120.5", "0.2"
        for n, (name, mu) in enumerate([("AP SETUP", "0"), ("RL SETUP", None), ("CBCT", None)], start=100):
            beam = Dataset()
            beam.update(ds.BeamSequence[0])
            beam.BeamNumber, beam.BeamName, beam.TreatmentDeliveryType = n, name, "TREATMENT"
            ds.BeamSequence.append(beam)
            if mu is not None:
                ref = Dataset()
                ref.ReferencedBeamNumber, ref.BeamMeterset = n, mu
                group.ReferencedBeamSequence.append(ref)
    edit(src / "rtplan.dcm", eclipse)
    summary, out = _import(src.parent, tmp_path / "out")
    assert len(load_case(summary.imported[0].case_dir).plan.beams) == 7  # not 10
    assert "beam AP SETUP: no BeamMeterset (a setup or imaging field): left out" in out
    assert "beam RL SETUP: not in the fraction group" in out and "beam CBCT: not in the fraction group" in out
    assert "7 IMRT beam(s)" in out


def test_beams_of_a_second_fraction_group_count(tmp_path, exported):
    src = _copy(exported, tmp_path)

    def two_groups(ds):  # a sequential boost: beams 1-4 in group 1, 5-7 in group 2
        first = ds.FractionGroupSequence[0]
        second = Dataset()
        second.update(first)
        refs = list(first.ReferencedBeamSequence)
        for r in refs:
            r.BeamMeterset = "100"
        first.ReferencedBeamSequence, second.ReferencedBeamSequence = Sequence(refs[:4]), Sequence(refs[4:])
        second.FractionGroupNumber, second.NumberOfFractionsPlanned = 2, 5
        ds.FractionGroupSequence.append(second)
    edit(src / "rtplan.dcm", two_groups)
    summary, out = _import(src.parent, tmp_path / "out")
    case = load_case(summary.imported[0].case_dir)
    assert (len(case.plan.beams), case.plan.fractions) == (7, 35)
    assert "2 fraction groups: fractions taken from the first (35)" in out


# ---- 6: mapping keys by the TPS's name or the imported one -------------------------------------
@pytest.mark.parametrize("key", ["Tumor Bed", "Tumor_Bed", "tumor bed"])
def test_mapping_prescriptions_accept_the_tps_name_and_the_cleaned_name(tmp_path, exported, key):
    src = _copy(exported, tmp_path)
    edit(src / "rtstruct.dcm", _rename({"PTV70": "Tumor Bed", "PTV56": "Boost Area"}))
    edit(src / "rtplan.dcm", lambda ds: ds.__delattr__("DoseReferenceSequence"))
    summary, out = _import(src.parent, tmp_path / "out", {"prescriptions": {key: 66}}, tmp_path)
    assert summary.imported, out
    assert load_case(summary.imported[0].case_dir).plan.prescriptions == {"Tumor_Bed": 66.0}


# ---- 7: the same RTPLAN twice ------------------------------------------------------------------
def test_two_copies_of_one_rtplan_are_one_plan(tmp_path, exported):
    src = _copy(exported, tmp_path)
    (src / "copy").mkdir()
    shutil.copy(src / "rtplan.dcm", src / "copy" / "rtplan.dcm")
    summary, out = _import(src.parent, tmp_path / "out")
    assert summary.imported and not summary.skipped, out
    assert "the same RTPLAN as rtplan.dcm" in out and "copy left out" in out


# ---- 8: plans the model cannot represent ------------------------------------------------------
def _gamma_knife(ds):
    for b in ds.BeamSequence:
        b.TreatmentMachineName = "Gamma Knife Icon"  # SH: 16 characters at most


def _brachy(ds):
    ds.BrachyTreatmentType = "HDR"
    ds.ApplicationSetupSequence = Sequence([Dataset()])


def _ion(ds):
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.8"


@pytest.mark.parametrize("change,needle", [(_gamma_knife, "Gamma Knife plan ('Gamma Knife Icon')"),
                                           (_brachy, "brachytherapy plan"), (_ion, "ion (proton) plan")])
def test_gamma_knife_brachytherapy_and_ion_plans_are_refused_in_one_line(tmp_path, exported, change, needle):
    src = _copy(exported, tmp_path)
    edit(src / "rtplan.dcm", change)
    summary, out = _import(src.parent, tmp_path / "out")
    assert not summary.imported
    skipped = [ln for ln in out.splitlines() if "SKIPPED" in ln]
    assert len(skipped) == 1 and f"rtplan.dcm: {needle}" in skipped[0], out


# ---- 9: the HU check on a water phantom -------------------------------------------------------
def test_a_water_phantom_in_hu_is_not_called_an_offset_ct(tmp_path, make_case):
    rng = np.random.default_rng(0)
    water = np.clip(rng.normal(0.0, 8.0, (24, 24, 24)), 0, None).astype(np.int16)  # HU, rescale applied; min 0
    assert not [p for p in check_case(make_case(tmp_path, name="water", ct=water)) if "1024" in p.message]
    raw = water + 1024  # the same phantom in raw CT numbers is an offset CT, as a patient is
    raw[:, :4] = 0  # air around it
    assert [p for p in check_case(make_case(tmp_path, name="raw", ct=raw)) if "subtract 1024" in p.message]


# ---- 10: sites, names, dose grid, anonymised fields -------------------------------------------
def test_breast_and_brain_are_not_guessed_as_lung_or_head_and_neck():
    assert unsupported_site(["BODY", "Heart", "Lt Lung", "Breast"])[0] == "breast"
    assert unsupported_site(["Brain", "Brainstem", "Chiasm"])[0] == "brain"
    assert unsupported_site(["Brainstem", "Parotid_L"]) is None and unsupported_site(["Heart"], "Lung") is None
    assert unsupported_site(["PTV"], "Whole brain")[0] == "brain"
    assert infer_tumour_site({"Heart", "LeftLung"}) == "lung"  # still the guess for a lung plan


def test_export_writes_the_tps_roi_names_kept_in_the_case(tmp_path, exported):
    src = _copy(exported, tmp_path)
    edit(src / "rtstruct.dcm", _rename({"SpinalCord": "Spinal Cord", "Larynx": "Kehlkopf 1"}))
    summary, _ = _import(src.parent, tmp_path / "out")
    case_dir = summary.imported[0].case_dir
    assert {"SpinalCord", "Kehlkopf_1"} <= set(load_case(case_dir).masks)
    written = export_case(case_dir, tmp_path / "again")
    names = {str(r.ROIName) for r in pydicom.dcmread(written["rtstruct"]).StructureSetROISequence}
    assert {"Spinal Cord", "Kehlkopf 1", "PTV70"} <= names and "Kehlkopf_1" not in names


def test_predicted_rtdose_is_written_on_a_clinical_dose_grid_unless_the_ct_grid_is_asked(tmp_path, make_case):
    ct = sitk.Image(160, 160, 40, sitk.sitkFloat32)
    ct.SetSpacing((1.0, 1.0, 3.0))
    ct.SetOrigin((-80.0, -80.0, -60.0))
    z, y, x = np.mgrid[0:40, 0:160, 0:160]
    gy = 60.0 * np.exp(-(((x - 80) / 30.0) ** 2 + ((y - 80) / 30.0) ** 2 + ((z - 20) / 8.0) ** 2))
    gy[gy < 1.0] = 0.0
    dose = sitk.GetImageFromArray(gy.astype(np.float32))
    dose.CopyInformation(ct)
    case_dir = make_case(tmp_path, name="plain")
    small = write_predicted_rtdose(dose, case_dir, tmp_path / "grid.dcm")
    full = write_predicted_rtdose(dose, case_dir, tmp_path / "ct.dcm", grid_mm=None)
    ds = pydicom.dcmread(small)
    assert [float(v) for v in ds.PixelSpacing] == [2.5, 2.5] and float(ds.GridFrameOffsetVector[1]) == 2.5
    assert small.stat().st_size < 0.2 * full.stat().st_size
    back = sitk.Resample(clinical_dose_grid(dose, 2.5), dose, sitk.Transform(), sitk.sitkLinear, 0.0)
    inner = gy > 30.0
    assert np.abs(sitk.GetArrayFromImage(back)[inner] - gy[inner]).max() < 0.03 * 60.0
    with pytest.raises(UserError, match="--rtdose-grid"):
        from addiff_core.dicom.writer import dose_grid_option
        dose_grid_option("fine")


def test_hashed_patient_fields_are_dropped_not_copied(tmp_path, exported):
    src = _copy(exported, tmp_path)
    summary, _ = _import(src.parent, tmp_path / "out")
    case_dir = summary.imported[0].case_dir
    info = yaml.safe_load((case_dir / "dicom.yaml").read_text())
    info["patient"].update(PatientBirthDate="9f86d081884c", PatientSex="XX", PatientID="h" * 80)
    info["study"].update(StudyTime="not a time")
    (case_dir / "dicom.yaml").write_text(yaml.safe_dump(info))
    dose = load_case(case_dir).dose
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns on invalid values when writing or reading
        path = write_predicted_rtdose(dose, case_dir, tmp_path / "rtdose.dcm")
        ds = pydicom.dcmread(path)
        assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyTime) == ("", "", "")
        assert ds.PatientID == case_dir.name  # an ID over 64 characters is not an LO
