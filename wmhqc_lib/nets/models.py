"""Networks of the paper, written against Keras 3's backend-agnostic API.

No ``tf.*`` call appears here, so the same models run with TensorFlow (the default, fastest on
these CPUs) and with ``KERAS_BACKEND=jax`` on GPU nodes that have JAX but not TensorFlow.

The MC U-net follows the paper's code (Kayalibay et al. style): a first 3^3 convolution, encoder
blocks of a strided 1^3 convolution plus a residual 3^3 convolution with instance normalisation
and PReLU, transposed-convolution decoder, segmentation heads on three decoder scales that are
up-sampled and summed. Dropout after every convolution block stays on at inference (Monte Carlo
dropout); instance normalisation has no running statistics, so nothing else changes between
training and inference. Convolutions that feed an instance normalisation have no bias: the
normalisation subtracts any per-channel constant, so a bias would be a wasted pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops


@keras.saving.register_keras_serializable(package="wmhqc")
class MCDropout(layers.Dropout):
    """Dropout that is always on, also under ``model.predict``.

    ``Dropout(rate)(x, training=True)`` in a functional model is silently ignored by
    ``predict`` in Keras 3 (every MC sample comes out identical); forcing ``training`` inside
    ``call`` is what keeps Monte Carlo sampling alive. The mask is drawn from 16-bit random
    integers when the channel count is even (see ``call``), else by Keras' own dropout.
    """

    def call(self, inputs, training=None):
        channels = inputs.shape[-1]
        if not self.rate or channels is None or channels % 2:
            return super().call(inputs, training=True)
        # One 32-bit random word gives the keep decisions of two channels (its 16-bit halves):
        # half the random-number work of Keras' float mask, which is the largest elementwise
        # cost of MC inference on CPU. The drop rate is rounded to a multiple of 2**-16.
        shape = (*ops.shape(inputs)[:-1], channels // 2)
        words = keras.random.randint(shape, -(2**31), 2**31 - 1, dtype="int32",
                                     seed=self.seed_generator)
        keep = ops.view(words, "uint16") >= self.threshold16
        return inputs * ops.cast(keep, inputs.dtype) * (1.0 / (1.0 - self.rate))

    @property
    def threshold16(self) -> int:
        """A voxel is kept when its 16-bit random number is at least this."""
        return round(self.rate * 2**16)


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the U-net; the profile's ``mc_unet`` section fills it."""

    base_filters: int = 8
    encoder_filters: tuple[int, ...] = (16, 32, 64)
    dropout: float = 0.2
    in_channels: int = 2
    heads: int = 3  # decoder scales that carry a segmentation head

    def __post_init__(self):
        if not self.encoder_filters:
            raise ValueError("encoder_filters is empty: the U-net needs at least one level")
        if not 1 <= self.heads <= len(self.encoder_filters):
            raise ValueError(f"heads = {self.heads} must be between 1 and the number of "
                             f"encoder levels ({len(self.encoder_filters)}, from "
                             f"encoder_filters {list(self.encoder_filters)})")

    @classmethod
    def from_section(cls, section: dict, in_channels: int = 2) -> UNetConfig:
        return cls(base_filters=int(section["base_filters"]),
                   encoder_filters=tuple(int(f) for f in section["encoder_filters"]),
                   dropout=float(section.get("dropout", 0.2)), in_channels=in_channels,
                   heads=int(section.get("heads", 3)))

    @property
    def divisor(self) -> int:
        """Every spatial size must be a multiple of this (one halving per encoder block)."""
        return 2 ** len(self.encoder_filters)


@keras.saving.register_keras_serializable(package="wmhqc")
class InstanceNormalization(layers.Layer):
    """Per-sample, per-channel normalisation over the spatial axes with a learned scale and shift.

    The maths of ``GroupNormalization(groups=-1)``, computed with one pass for the statistics
    (E[x^2] - E[x]^2, clipped at 0) and one fused multiply-add. Normalisation is a third of
    MC inference time on CPU; this form cuts that share roughly in half
    (``benchmarks/bench_mc.py``). A test checks it against Keras' layer on offset inputs.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        axes = tuple(range(1, len(x.shape) - 1))
        mean = ops.mean(x, axis=axes, keepdims=True)
        mean_sq = ops.mean(ops.square(x), axis=axes, keepdims=True)
        var = ops.maximum(mean_sq - ops.square(mean), 0.0)
        scale = self.gamma * ops.rsqrt(var + self.epsilon)
        return x * scale + (self.beta - mean * scale)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="wmhqc")
class ChannelPReLU(layers.Layer):
    """PReLU with one slope per channel (Keras' ``PReLU(shared_axes=spatial)``), written as
    max(x, a * x): two passes instead of Keras' four. That form needs a slope of at most 1, so
    the slope is min(alpha, 1); PReLU slopes start at 0 and stay well below 1 in practice."""

    def build(self, input_shape):
        shape = (1,) * (len(input_shape) - 2) + (input_shape[-1],)
        self.alpha = self.add_weight(shape=shape, initializer="zeros", name="alpha")

    def call(self, x):
        return ops.maximum(x, x * ops.minimum(self.alpha, 1.0))


def _norm_act(x, name: str):
    x = InstanceNormalization(epsilon=1e-5, name=f"{name}_in")(x)
    return ChannelPReLU(name=f"{name}_prelu")(x)


def _dropout(x, rate: float, name: str, mc: bool):
    if rate <= 0:
        return x
    return (MCDropout if mc else layers.Dropout)(rate, name=f"{name}_drop")(x)


def encoder_block(x, filters: int, dropout: float, name: str, mc: bool = True):
    """Strided 1^3 convolution (down-sampling) plus a residual 3^3 convolution."""
    down = layers.Conv3D(filters, 1, strides=2, use_bias=False, name=f"{name}_down")(x)
    down = _norm_act(down, f"{name}_down")
    res = layers.Conv3D(filters, 3, padding="same", use_bias=False,
                        name=f"{name}_conv")(down)
    res = _norm_act(res, f"{name}_conv")
    x = layers.Add(name=f"{name}_add")([down, res])
    return _dropout(x, dropout, name, mc)


def decoder_block(x, skip, filters: int, dropout: float, name: str, mc: bool = True):
    """Transposed-convolution up-sampling, concatenation with the skip, one 3^3 convolution."""
    up = layers.Conv3DTranspose(filters, 2, strides=2, use_bias=False,
                                name=f"{name}_up")(x)
    up = _norm_act(up, f"{name}_up")
    x = layers.Concatenate(name=f"{name}_cat")([up, skip])
    x = layers.Conv3D(filters, 3, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = _norm_act(x, f"{name}_conv")
    return _dropout(x, dropout, name, mc)


def _unet_trunk(inputs, cfg: UNetConfig, mc: bool):
    """Shared encoder-decoder; returns the decoder outputs from coarse to fine."""
    x = layers.Conv3D(cfg.base_filters, 3, padding="same", use_bias=False,
                      name="stem_conv")(inputs)
    x = _norm_act(x, "stem")
    x = _dropout(x, cfg.dropout, "stem", mc)
    skips = [x]
    for i, f in enumerate(cfg.encoder_filters):
        x = encoder_block(x, f, cfg.dropout, f"enc{i + 1}", mc)
        skips.append(x)
    decoder_filters = list(reversed([cfg.base_filters, *cfg.encoder_filters[:-1]]))
    outputs = []
    for i, (f, skip) in enumerate(zip(decoder_filters, reversed(skips[:-1]), strict=True)):
        x = decoder_block(x, skip, f, cfg.dropout, f"dec{i + 1}", mc)
        outputs.append(x)
    return outputs


def _summed_heads(decoded: list, heads: int):
    """1x1 heads on the last ``heads`` decoder scales, each up-sampled and added to the next
    finer one (Kayalibay et al.): one output channel at full resolution, before activation."""
    out = None
    for i, x in enumerate(decoded[-heads:]):
        head = layers.Conv3D(1, 1, name=f"head{i + 1}")(x)
        out = head if out is None else layers.Add(name=f"head_sum{i}")([out, head])
        if i < heads - 1:
            out = layers.UpSampling3D(2, name=f"head_up{i + 1}")(out)
    return out


def build_mc_unet(shape: Sequence[int] | None, cfg: UNetConfig) -> keras.Model:
    """MC-dropout U-net; output: foreground (lesion) probability, one channel.

    ``shape=None`` builds a fully convolutional model that accepts any spatial size divisible
    by ``cfg.divisor`` (training on patches, inference on whole volumes).
    """
    spatial = tuple(shape) if shape is not None else (None, None, None)
    inputs = keras.Input((*spatial, cfg.in_channels), name="image")
    logits = _summed_heads(_unet_trunk(inputs, cfg, mc=True), cfg.heads)
    probs = layers.Activation("sigmoid", dtype="float32", name="lesion_prob")(logits)
    return keras.Model(inputs, probs, name="mc_unet")


def conv_flops(model: keras.Model, spatial: Sequence[int]) -> float:
    """Multiply-add FLOPs (x2) of the model's convolutions for one call on one input of
    ``spatial`` size (a Monte Carlo sampler's call yields many samples), for reporting achieved
    GFLOP/s next to the machine's matrix-product rate."""
    total = 0.0

    def count(layer, *args, **kwargs):
        nonlocal total
        out = layer(*args, **kwargs)
        if isinstance(layer, layers.Conv3D | layers.Conv3DTranspose):
            kernel = layer.kernel.shape  # (k, k, k, in, out) for both kinds
            positions = float(np.prod(out.shape[:4]))  # batch x output voxels
            if isinstance(layer, layers.Conv3DTranspose):
                positions /= float(np.prod(layer.strides))  # one kernel per input voxel
            total += 2.0 * float(np.prod(kernel)) * positions
        return out

    # Re-trace the graph on a concrete one-case input, counting each convolution as it runs
    # (works for models that share layers, such as a Monte Carlo sampler).
    probe = keras.Input(batch_shape=(1, *spatial, model.inputs[0].shape[-1]))
    retrace(model, count, inputs=[probe])
    return total


def retrace(model: keras.Model, call_function, inputs: list | None = None) -> keras.Model:
    """``model``'s graph traced again, each layer called through
    ``call_function(layer, *args, **kwargs)``; the new model shares the layers and weights.
    ``inputs`` replace the input tensors. The model's compile state is left behind (its loss
    may not be deserialisable)."""
    graph = keras.Model(model.inputs, model.outputs)
    return keras.models.clone_model(graph, input_tensors=inputs,
                                    clone_function=lambda layer: layer,
                                    call_function=call_function)


def without_dropout(model: keras.Model) -> keras.Model:
    """``model`` with every :class:`MCDropout` skipped, sharing its layers and weights.

    Dropout scales kept activations by ``1 / (1 - rate)``, so skipping it gives each layer the
    expected input of the MC passes: one deterministic pass that approximates the MC mean.
    Checkpoint selection uses it (``benchmarks/checkpoint_selection.py`` compares the
    rankings it gives with those of the MC mean and of one stochastic pass).
    """
    def call_function(layer, *args, **kwargs):
        if isinstance(layer, MCDropout):
            return args[0]
        return layer(*args, **kwargs)

    return retrace(model, call_function)


# ---------------------------------------------------------------------------------------------
# Reconstruction U-net and Dice regressor (the paper's second and third QC families)


def build_rec_unet(shape: Sequence[int] | None, cfg: UNetConfig) -> keras.Model:
    """Reconstruction U-net: the MC U-net's encoder-decoder and summed multi-scale heads,
    without dropout, ending in one ReLU channel (the reconstructed FLAIR, never negative).

    Input: one channel, the case's FLAIR scaled to [0, 1] with the lesion region set to 0.
    ``cfg.in_channels`` and ``cfg.dropout`` are ignored (always 1 and 0).
    """
    from dataclasses import replace

    cfg = replace(cfg, dropout=0.0, in_channels=1)
    spatial = tuple(shape) if shape is not None else (None, None, None)
    inputs = keras.Input((*spatial, 1), name="flair_zeroed")
    out = _summed_heads(_unet_trunk(inputs, cfg, mc=False), cfg.heads)
    flair = layers.Activation("relu", dtype="float32", name="flair_rec")(out)
    return keras.Model(inputs, flair, name="rec_unet")


def build_dice_regressor(shape: Sequence[int], in_channels: int = 2,
                         filters: Sequence[int] = (16, 32, 64, 128), input_pool: int = 1,
                         negative_slope: float = 0.3) -> keras.Model:
    """The paper's Dice regressor: four blocks of 3^3 convolution, LeakyReLU and 2^3 max-pool
    (16/32/64/128 filters), flatten, one dense unit with linear output (the predicted Dice).

    ``input_pool`` > 1 average-pools the input first (a coarser view for CPU profiles; the
    paper used 1). The input shape must be fixed: the dense layer sees every position.
    """
    smallest = min(int(s) for s in shape) // max(int(input_pool), 1) // 2 ** len(filters)
    if smallest < 1:
        raise ValueError(f"input {list(shape)} with input_pool {input_pool} is too small for "
                         f"{len(filters)} max-pools: lower input_pool or use fewer blocks")
    inputs = keras.Input((*tuple(shape), in_channels), name="pair")
    x = inputs
    if input_pool > 1:
        x = layers.AveragePooling3D(input_pool, name="input_pool")(x)
    for i, f in enumerate(filters):
        x = layers.Conv3D(int(f), 3, padding="same", name=f"block{i + 1}_conv")(x)
        x = layers.LeakyReLU(negative_slope=negative_slope, name=f"block{i + 1}_lrelu")(x)
        x = layers.MaxPooling3D(2, name=f"block{i + 1}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(1, activation="linear", dtype="float32", name="dice")(x)
    return keras.Model(inputs, out, name="dice_regressor")
