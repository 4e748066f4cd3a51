"""The networks on Keras' JAX backend (GPU nodes often carry JAX and not TensorFlow).

Keras fixes its backend at import, so the checks run in one fresh interpreter with
``KERAS_BACKEND=jax`` and TensorFlow hidden, as on a node that has only JAX (one JAX start-up
for all of them), on the smallest networks that still train: each check reports ``ok`` or its
error, and each test reads its own line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECKS = '''
import sys
sys.modules["tensorflow"] = None  # as on a GPU node: no TensorFlow (Keras would import it)
import json, traceback
import numpy as np, keras
assert keras.backend.backend() == "jax", keras.backend.backend()
from wmhqc_lib.nets.models import UNetConfig, build_dice_regressor, build_mc_unet, build_rec_unet
from wmhqc_lib.nets.training import make_loss
from wmhqc_lib.qc.reconstruction import make_ssim_loss, ssim
from wmhqc_lib.qc.uncertainty import mc_samples

TINY = UNetConfig(base_filters=2, encoder_filters=(4, 8), heads=2)  # 8^3 inputs


def mc_unet():
    keras.utils.set_random_seed(0)
    model = build_mc_unet(None, TINY)
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss=make_loss("dice_bce"))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 8, 2)).astype("float32")
    y = np.zeros((2, 8, 8, 8, 2), "float32"); y[:, 2:5, 2:5, 2:5, 0] = 1
    first = float(model.train_on_batch(x, y))
    for _ in range(10):
        last = float(model.train_on_batch(x, y))
    assert last < first, (first, last)
    s = mc_samples(model, np.moveaxis(x[0], -1, 0), 4, 2)
    assert s.shape == (4, 8, 8, 8) and not np.allclose(s[0], s[1])  # dropout stays on


def rec_unet_and_regressor():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((2, 8, 8, 8, 1)).astype("float32")
    assert np.allclose(np.asarray(ssim(x, x, window=3)), 1.0, atol=1e-5)
    model = build_rec_unet(None, TINY)
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss=make_ssim_loss(3, 1.5, "3d"))
    first = float(model.train_on_batch(x * (x > 0.2), x))
    for _ in range(6):
        last = float(model.train_on_batch(x * (x > 0.2), x))
    assert last < first, (first, last)
    out = model.predict(x, verbose=0)
    assert out.shape == x.shape and (out >= 0).all()
    reg = build_dice_regressor((16, 16, 16), 2, (2, 2, 2, 2))
    assert reg.predict(np.zeros((1, 16, 16, 16, 2), "float32"), verbose=0).shape == (1, 1)


results = {}
for check in (mc_unet, rec_unet_and_regressor):
    try:
        check()
        results[check.__name__] = "ok"
    except Exception:
        results[check.__name__] = traceback.format_exc()
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def jax_results() -> dict[str, str]:
    pytest.importorskip("jax")
    # XLA's lowest optimisation level: these checks are about results, and compiling at the
    # default level takes most of their time on a CPU
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    import json

    return json.loads(line.removeprefix("RESULTS "))


def test_mc_unet_trains_and_draws_distinct_samples_on_jax(jax_results):
    assert jax_results["mc_unet"] == "ok", jax_results["mc_unet"]


def test_rec_unet_trains_and_the_regressor_predicts_on_jax(jax_results):
    assert jax_results["rec_unet_and_regressor"] == "ok", jax_results["rec_unet_and_regressor"]
