"""Evaluation: quality of quantized models against their 16-bit originals.

``svdquant.eval.real_weights``: validation on real pretrained weights (all-MiniLM-L6-v2).
"""
