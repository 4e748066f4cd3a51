"""Quality control: scores computed without the annotation, and the framework that judges them.

In: trained networks and preprocessed cases. Out: Monte Carlo uncertainty maps and scores
(``uncertainty``), reconstruction error maps (``reconstruction``), predicted Dice
(``regression``), all cached per case (``case_cache``); then failure detection, ranking,
risk-coverage and bootstrap intervals per fold (``evaluation``, ``metrics``) and the
threshold explorer (``explorer``).
"""
