"""Deploy: a finished study applied to new scans.

In: a study's results folder, then new scans (BIDS, a manifest or one FLAIR/T1 pair). Out: a
checksummed model bundle with its model card (``bundle``), per-scan segmentations, maps and QC
verdicts written as a BIDS derivative dataset (``triage``, one record per scan: ``records``)
and their HTML reports with reviewer-verdict controls (``report``). Back from review: verdict
files checked line by line (``verdicts``), realised per-site figures and site thresholds
(``calibrate``) written as a checksummed layer over the bundle (``layer``); triage as a SLURM
job array (``cluster``).
"""
