"""sagan: Self-Attention GANs (Zhang et al., ICML 2019), faithful to the official code: train, inspect, evaluate.

`sagan.load(path, net="G_ema")` returns one network of any sagan checkpoint, trained or imported (`sagan-import`).
"""

from sagan.checkpoint import load_network as load

__all__ = ["load"]
