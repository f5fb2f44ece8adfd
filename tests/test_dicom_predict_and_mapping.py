"""``addiff predict --rtdose`` (the prediction back as an RTDOSE) and the import mapping file."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from addiff_core.case_io import load_case
from addiff_core.cli import main
from addiff_core.dicom.names import NameMapper, infer_tumour_site, site_from_text, target_dose_from_name
from addiff_core.dicom.writer import export_case
from helpers.dicom import edit


def test_predict_writes_an_rtdose_on_the_imported_case_frame_of_reference(tmp_path, make_case, capsys, tiny_model):
    from addiff_core.checkpoint import save_checkpoint
    from addiff_core.models import build_model

    export_case(make_case(tmp_path / "cases", name="pat1"), tmp_path / "tps" / "pat1")
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "imported")]) == 0
    case_dir = tmp_path / "imported" / "pat1"
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(tiny_model).state_dict(), tiny_model)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--case", str(case_dir), "--out", str(out), "--steps", "2",
                 "--rtdose", "--rtdose-grid", "ct", "--force"]) == 0  # --force: an untrained model need not be plausible
    assert f"rtdose: {out / 'rtdose.dcm'}" in capsys.readouterr().out
    ds = pydicom.dcmread(str(out / "rtdose.dcm"))
    info = yaml.safe_load((case_dir / "dicom.yaml").read_text())
    assert str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.481.2"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert ds.StudyInstanceUID == info["study"]["StudyInstanceUID"]
    assert ds.FrameOfReferenceUID == info["frame_of_reference_uid"]
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == info["rtplan"]["SOPInstanceUID"]
    assert ds.PatientID == "pat1" and ds.SeriesInstanceUID != info["ct_series"]["SeriesInstanceUID"]
    assert "PREDICTED" in ds.SeriesDescription and "PREDICTED" in ds.DoseComment
    ct = load_case(case_dir).ct
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(ct.GetOrigin(), abs=1e-3)
    assert (ds.Columns, ds.Rows, ds.NumberOfFrames) == ct.GetSize()
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.nii.gz")))
    gy = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    assert np.abs(gy - nifti).max() <= 1e-6 * max(1.0, float(nifti.max()))
    # the original plan's RTDOSE and the predicted one side by side: the importer still picks the plan dose
    # of the plan, and a viewer gets both on one frame of reference
    assert ds.FrameOfReferenceUID == pydicom.dcmread(str(tmp_path / "tps" / "pat1" / "rtdose.dcm")).FrameOfReferenceUID


def test_predicted_rtdose_for_a_case_not_from_dicom(tmp_path, make_case):
    from addiff_core.dicom.writer import write_predicted_rtdose

    case_dir = make_case(tmp_path, name="plain")
    dose = load_case(case_dir).dose
    path = write_predicted_rtdose(dose, case_dir, tmp_path / "rtdose.dcm")
    ds = pydicom.dcmread(str(path))
    assert ds.PatientID == "plain" and str(ds.StudyInstanceUID).startswith("2.25.")
    assert "ReferencedRTPlanSequence" not in ds  # no plan to refer to


# ---------------------------------------------------------------------------------------------
# names and the mapping file
# ---------------------------------------------------------------------------------------------
def test_default_name_map_covers_tg263_spellings():
    m = NameMapper(doses=(70.0, 50.4, 56.0))  # a unit-less number is a dose when the plan prescribes it
    for tps, ours in [("Parotid_L", "LeftParotid"), ("PAROTID_R", "RightParotid"), ("SpinalCord", "SpinalCord"),
                      ("Spinal Cord", "SpinalCord"), ("BrainStem", "Brainstem"), ("Bone_Mandible", "Mandible"),
                      ("Lung_L", "LeftLung"), ("Femur_Head_R", "RightFemoralHead"), ("External", "Body"),
                      ("Esophagus", "Esophagus"), ("PTV_70", "PTV70"), ("PTV70", "PTV70"), ("PTV_7000", "PTV70"),
                      ("PTV_50.4", "PTV50p4"), ("ptv 56", "PTV56")]:
        assert m(tps) == (ours, True), tps
    assert m("CTV High") == ("CTV_High", False)
    assert m("Skin", "ORGAN") == ("Body", True) and m("BODY_outline", "EXTERNAL") == ("Body", True)
    assert NameMapper({"Parotid Lt": "LeftParotid", "zOpt": None})("parotid_lt") == ("LeftParotid", True)
    assert NameMapper({"zOpt": None})("ZOPT") == (None, True)
    assert target_dose_from_name("PTV_High") is None
    assert infer_tumour_site({"LeftParotid", "SpinalCord"}) == "head_neck"
    assert infer_tumour_site({"SpinalCord"}) is None
    assert site_from_text("Head and neck") == "head_neck" and site_from_text("Prostate bed") == "prostate"
    assert site_from_text("Lung / prostate") is None


def _tps_style_patient(tmp_path, make_case):
    """A patient whose TPS uses its own names and whose plan carries no prescription, fractions or site."""
    from helpers.cases import default_arrays

    arr = default_arrays()
    case = make_case(tmp_path / "cases", name="tps1", masks={"Larynx": arr["masks"]["SpinalCord"]})
    export_case(case, tmp_path / "tps" / "tps1")
    renames = {"PTV70": "PTV_High", "SpinalCord": "Spinal_Cord", "Body": "Outline", "Larynx": "Kehlkopf"}

    def rename(ds):
        for roi in ds.StructureSetROISequence:
            roi.ROIName = renames.get(str(roi.ROIName), str(roi.ROIName))
        for obs in ds.RTROIObservationsSequence:
            obs.RTROIInterpretedType = "ORGAN"

    def strip_plan(ds):
        del ds.DoseReferenceSequence
        del ds.TreatmentSite
        ds.FractionGroupSequence[0].NumberOfFractionsPlanned = ""
    edit(tmp_path / "tps" / "tps1" / "rtstruct.dcm", rename)
    edit(tmp_path / "tps" / "tps1" / "rtplan.dcm", strip_plan)


def test_mapping_file_supplies_names_prescriptions_fractions_and_site(tmp_path, make_case, capsys):
    _tps_style_patient(tmp_path, make_case)
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "no prescription" in out and "--map" in out
    mapping = tmp_path / "map.yaml"
    mapping.write_text(yaml.safe_dump({
        "structure_names": {"Kehlkopf": "Larynx", "Outline": "Body"},
        "prescriptions": {"PTV_High": 70}, "fractions": 35,
        "patients": {"tps1": {"tumour_site": "head_neck"}}}))
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "out"), "--map", str(mapping)]) == 0
    out = capsys.readouterr().out
    case = load_case(tmp_path / "out" / "tps1")
    assert set(case.masks) == {"PTV_High", "SpinalCord", "Body", "Larynx"}
    assert (case.plan.prescriptions, case.plan.fractions, case.plan.tumour_site) == ({"PTV_High": 70.0}, 35, "head_neck")
    assert "prescriptions from the mapping file" in out
    info = yaml.safe_load((tmp_path / "out" / "tps1" / "dicom.yaml").read_text())
    assert info["structure_names"]["Larynx"] == "Kehlkopf"


def test_unknown_structure_names_are_kept_and_reported(tmp_path, make_case, capsys):
    _tps_style_patient(tmp_path, make_case)
    mapping = tmp_path / "map.yaml"
    mapping.write_text("prescriptions: {PTV_High: 70}\nfractions: 35\ntumour_site: head_neck\n")
    assert main(["data", "import-dicom", str(tmp_path / "tps"), str(tmp_path / "out"), "--map", str(mapping)]) == 0
    out = capsys.readouterr().out
    assert "structures kept under their own names (not used by the model): Kehlkopf" in out
    assert "Kehlkopf" in load_case(tmp_path / "out" / "tps1").masks


@pytest.mark.parametrize("text,needle", [
    ("colour: red\n", "unknown field(s) colour"),
    ("prescriptions: {PTV70: 7000}\n", "prescriptions.PTV70: must be a dose in Gy"),
    ("tumour_site: brain\n", "tumour_site: must be one of"),
    ("patients: {p1: {fractions: 0}}\n", "patients.p1.fractions: must be a positive integer"),
    ("structure_names: [a, b]\n", "structure_names: must map"),
])
def test_bad_mapping_file_is_one_line_naming_file_and_field(tmp_path, capsys, text, needle):
    (tmp_path / "src").mkdir()
    mapping = tmp_path / "map.yaml"
    mapping.write_text(text)
    assert main(["data", "import-dicom", str(tmp_path / "src"), str(tmp_path / "out"), "--map", str(mapping)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(mapping) in err and needle in err, err
