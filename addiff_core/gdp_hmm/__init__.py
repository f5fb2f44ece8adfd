"""The GDP-HMM data of the AAPM 2025 challenge (the ADDiff-Dose paper's data): its plans imported
as case folders grouped into site files (``importer``; one plan dict -> a case: ``convert``; the
files beside the plans: ``sources``), read without running pickled code (``safe_npz``), and scored
with the challenge's MAE (``metric``). See docs/GDP_HMM.md.
"""
