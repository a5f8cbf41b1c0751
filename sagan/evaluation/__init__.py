"""Evaluation: the one seeded sampler (sampling), the FID Inception network (inception), reference statistics and
their cache (reference_stats), FID/IS/KID/precision-recall (metrics), what `sagan-fid` evaluates (request, evaluate),
and evaluation during training (in_training)."""
