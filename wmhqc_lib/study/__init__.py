"""Study: the cross-validated reproduction, fold by fold, and the book that reports it.

In: a profile and a data root. Out: each fold's artifacts under one results folder
(``steps``, the per-fold work each notebook calls; ``out_of_fold`` for the optional inner-fold
Dice-regression inputs), the chain of notebooks and the built book (``pipeline``, ``slurm``
for clusters), the evaluation chapter's tables and figures (``report``, ``plots``) and the
profile's cost at full size (``scale``).
"""
