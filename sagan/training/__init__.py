"""Training: the losses, DiffAugment, one step of D and G (step), the optimizers and their learning-rate scale, G_ema
and its BatchNorm statistics, spectral-norm and BatchNorm helpers, the run's assembly (run), the loop and its schedule
(loop), what is logged (monitoring, run_logger), pre-emption, and the run-directory lock."""
