"""Convolution and pooling on NCHW arrays, with PyTorch's semantics.

``convolution`` and ``pooling`` validate the public calls (argument rules in ``_nchw``);
``_conv`` runs conv2d forward and backward as im2col (``_im2col``) plus the GEMM in
workspace-capped chunks; ``_pooling`` holds the pooling kernels.
"""
from microtile.conv.convolution import col2im, conv2d, conv2d_backward, im2col
from microtile.conv.pooling import (avg_pool2d, avg_pool2d_backward, max_pool2d,
                                    max_pool2d_backward)

__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im", "max_pool2d",
           "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"]
