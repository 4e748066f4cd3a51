"""Deploy: a finished study applied to new scans.

In: a study's results folder, then new scans (BIDS, a manifest or one FLAIR/T1 pair). Out: a
checksummed model bundle with its model card (``bundle``), per-scan segmentations, maps and QC
verdicts written as a BIDS derivative dataset (``triage``) and their HTML reports (``report``).
"""
