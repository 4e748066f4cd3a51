"""Quality control: scores computed without the annotation, and the framework that judges them.

In: trained networks and preprocessed cases. Out: Monte Carlo uncertainty maps and scores
(``uncertainty``), reconstruction error maps (``reconstruction``), predicted Dice
(``regression``), all cached per case (``case_cache``); then failure detection, ranking,
risk-coverage and bootstrap intervals per fold (``evaluation``, ``metrics``), the threshold
explorer (``explorer``), and thresholds with a finite-sample recall guarantee, with what they
cost and how often they keep their promise (``guarantee``).
"""
