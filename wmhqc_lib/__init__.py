"""wmhqc: quality control of white matter hyperintensity segmentation.

The library in the order data flows through it: ``data`` (scans to preprocessed cases and
folds), ``nets`` (the three networks and their training), ``qc`` (scores without the
annotation, and the evaluation framework), ``study`` (the per-fold steps, the reproduce chain
and the book) and ``deploy`` (export a finished study, triage new scans); ``config`` holds the
profiles and ``cli`` the ``wmhqc`` command.

Environment defaults are set here, before any submodule imports Keras or TensorFlow: the Keras
backend is TensorFlow when it is installed, else JAX (GPU nodes often carry JAX alone); quiet
C++ logs; and oneDNN kernels on, which TensorFlow enables by default only on Intel CPUs (on
the AMD CPUs measured here they make the U-net's 3D convolutions about 2.7x faster). Each can
be overridden by setting the variable before importing wmhqc_lib.
"""

import os
from importlib.util import find_spec

if "KERAS_BACKEND" not in os.environ and find_spec("tensorflow") is None \
        and find_spec("jax") is not None:
    os.environ["KERAS_BACKEND"] = "jax"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
