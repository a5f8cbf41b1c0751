"""Evaluation: the one seeded sampler (sampling), the FID Inception network (inception), running feature moments
(moments), reference statistics and their cache (reference_stats), `.npz` statistics files (reference_files), what a
`ref=` names (references), FID/IS/KID/precision-recall (metrics), per-class FID (per_class), truncation curves
(curves), what `sagan-fid` evaluates (request, evaluate), and evaluation during training (in_training)."""
