"""sagan: Self-Attention GANs (Zhang et al., ICML 2019), faithful to the official code: train, inspect, evaluate.

`sagan.load(path, net="G_ema")` returns one network of any sagan checkpoint, trained or imported (`sagan-import`).

Sub-packages in the order the data flows, each importing only from those after it (an import-linter contract):
the commands (train, sample, fid, attention, ablate, import_weights, export, prepare); ablation and cli; training and
serving; evaluation, visualization and pretrained; checkpoint; config; models and data; utils.
"""

from sagan.checkpoint import load_network as load

__all__ = ["load"]
