"""Networks of the paper, written against Keras 3's backend-agnostic API.

No ``tf.*`` call appears here, so the same models run with TensorFlow (the default, fastest on
these CPUs) and with ``KERAS_BACKEND=jax`` on GPU nodes that have JAX but not TensorFlow.

The MC U-net follows the paper's code (Kayalibay et al. style): a first 3^3 convolution, encoder
blocks of a strided 1^3 convolution plus a residual 3^3 convolution with instance normalisation
and PReLU, transposed-convolution decoder, segmentation heads on three decoder scales that are
up-sampled and summed. Dropout after every convolution block stays on at inference (Monte Carlo
dropout); instance normalisation has no running statistics, so nothing else changes between
training and inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="wmhqc")
class MCDropout(layers.Dropout):
    """Dropout that is always on, also under ``model.predict``.

    ``Dropout(rate)(x, training=True)`` in a functional model is silently ignored by
    ``predict`` in Keras 3 (every MC sample comes out identical); forcing ``training`` inside
    ``call`` is what keeps Monte Carlo sampling alive.
    """

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the U-net; the profile's ``mc_unet`` section fills it."""

    base_filters: int = 8
    encoder_filters: tuple[int, ...] = (16, 32, 64)
    dropout: float = 0.2
    in_channels: int = 2
    heads: int = 3  # decoder scales that carry a segmentation head

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
    max(x, 0) + a * min(x, 0): two passes instead of Keras' four."""

    def build(self, input_shape):
        shape = (1,) * (len(input_shape) - 2) + (input_shape[-1],)
        self.alpha = self.add_weight(shape=shape, initializer="zeros", name="alpha")

    def call(self, x):
        return ops.maximum(x, 0.0) + self.alpha * ops.minimum(x, 0.0)


def _norm_act(x, name: str):
    x = InstanceNormalization(epsilon=1e-5, name=f"{name}_in")(x)
    return ChannelPReLU(name=f"{name}_prelu")(x)


def _dropout(x, rate: float, name: str, mc: bool):
    if rate <= 0:
        return x
    return (MCDropout if mc else layers.Dropout)(rate, name=f"{name}_drop")(x)


def encoder_block(x, filters: int, dropout: float, name: str, mc: bool = True):
    """Strided 1^3 convolution (down-sampling) plus a residual 3^3 convolution."""
    down = layers.Conv3D(filters, 1, strides=2, name=f"{name}_down")(x)
    down = _norm_act(down, f"{name}_down")
    res = layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv")(down)
    res = _norm_act(res, f"{name}_conv")
    x = layers.Add(name=f"{name}_add")([down, res])
    return _dropout(x, dropout, name, mc)


def decoder_block(x, skip, filters: int, dropout: float, name: str, mc: bool = True):
    """Transposed-convolution up-sampling, concatenation with the skip, one 3^3 convolution."""
    up = layers.Conv3DTranspose(filters, 2, strides=2, name=f"{name}_up")(x)
    up = _norm_act(up, f"{name}_up")
    x = layers.Concatenate(name=f"{name}_cat")([up, skip])
    x = layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv")(x)
    x = _norm_act(x, f"{name}_conv")
    return _dropout(x, dropout, name, mc)


def _unet_trunk(inputs, cfg: UNetConfig, mc: bool):
    """Shared encoder-decoder; returns the decoder outputs from coarse to fine."""
    x = layers.Conv3D(cfg.base_filters, 3, padding="same", name="stem_conv")(inputs)
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
    """Multiply-add FLOPs (x2) of the model's convolutions for one input of ``spatial`` size,
    for reporting achieved GFLOP/s next to the machine's matrix-product rate."""
    total = 0.0
    convs = [layer for layer in model.layers
             if isinstance(layer, layers.Conv3D | layers.Conv3DTranspose)]
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    shapes = probe.compute_output_shape((1, *spatial, model.inputs[0].shape[-1]))
    for layer, out_shape in zip(convs, shapes, strict=True):
        kernel = layer.kernel.shape  # (k, k, k, in, out) for both kinds
        k_vol = kernel[0] * kernel[1] * kernel[2]
        if isinstance(layer, layers.Conv3DTranspose):
            in_voxels = 1
            for s in out_shape[1:4]:
                in_voxels *= s
            in_voxels /= 8  # stride 2 in three axes
            total += 2.0 * k_vol * kernel[3] * kernel[4] * in_voxels
        else:
            voxels = out_shape[1] * out_shape[2] * out_shape[3]
            total += 2.0 * k_vol * kernel[3] * kernel[4] * voxels
    return total


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
