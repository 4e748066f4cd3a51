"""Data: from scans on disk to the arrays every later step reads.

In: the four public datasets' folder layouts, a synthetic cohort (``synth``), or a manifest
(``datasets`` reads them through one code path, ``io`` checks each NIfTI). Out: preprocessed
cases on the working grid with their native reference masks (``preprocess``), the 5-fold split
(``folds``) and the data step's artifacts (``cohort``).
"""
