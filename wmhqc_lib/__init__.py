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

One import is skipped: ``rfc3987_syntax``, which jsonschema loads only to check the ``iri``
string formats, builds about 35 Earley parsers when imported (3 s here, up to 8 s when both
cores are busy). Plotly imports nbformat and so jsonschema in every notebook kernel, and no
notebook or book schema uses those formats (python-jsonschema/jsonschema#1428). A process that
imported jsonschema before wmhqc_lib keeps its iri checks; one that needs them after should
import ``rfc3987_syntax`` first.
"""

import os
import sys
from importlib.util import find_spec

sys.modules.setdefault("rfc3987_syntax", None)  # an ImportError for jsonschema: skipped

if "KERAS_BACKEND" not in os.environ and find_spec("tensorflow") is None \
        and find_spec("jax") is not None:
    os.environ["KERAS_BACKEND"] = "jax"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
