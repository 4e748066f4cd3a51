"""Networks: the paper's three Keras models and how they are trained.

In: preprocessed cases and a profile's sizes. Out: the MC-dropout U-net, the reconstruction
U-net and the Dice regressor (``models``, backend-agnostic Keras 3), fitted with patch
sampling, augmentation, whole-volume validation and resumable checkpoints (``training``).
"""
