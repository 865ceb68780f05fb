"""Pruning: structured channel pruning, 2:4 structured sparsity, unstructured magnitude pruning.

All three are lossy and need no data. ``prune-channels`` makes the model smaller *and* faster on
any runtime (fewer channels, smaller dense kernels); ``sparsify-2to4`` makes eligible layers faster
only on GPUs with sparse tensor cores when the TensorRT engine is built with sparsity enabled;
``prune-magnitude`` only makes weights compressible.

Channel pruning rests on **channel groups** (``find_channel_groups``): the channels that must be
removed together because one layer writes them and others read them::

    Conv_a --> BN --> Relu --+--> Conv_c        group {a, b}: a's and b's output channels,
                             |                   the BN's parameters, Conv_c's and Conv_d's
    Conv_b --> Mul(k) --> Add --> Conv_d         input channels, the per-channel constant k

Residual Adds tie their branches into one group; Concat lays the groups of its inputs side by side
(channel ranges at offsets); depthwise convs pass channels through; Flatten (or a Reshape that
flattens) maps each channel to a block of H*W columns of the next Gemm/MatMul. Anything not
understood blocks the groups that reach it, with a reason.

The package, one module per job:

- ``groups``: ``ChannelAnalysis`` and ``find_channel_groups``, the channel groups of a graph;
  ``layers`` (how Conv/ConvTranspose/Gemm/MatMul produce and consume groups) and ``ops`` (the
  op -> handler table for everything between layers) are its per-op handlers; ``maps`` the
  channel maps they propagate.
- ``edits``: what pruning a group changes: weights, biases and per-channel constants sliced,
  removed constant channels folded into biases.
- ``channels``: the ``prune-channels`` pass: importance, ratios, the pruning record.
- ``sparsity``: ``sparsify-2to4`` and ``prune-magnitude``.
- ``common``: what they all share (the verification tolerance, float types, layer ops).
"""
