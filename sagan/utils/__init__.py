"""What every layer may use and that knows nothing of GANs: processes and devices (processes), files written whole
(atomic_files), one writing process per directory (directory_lock), progress lines (progress), full-precision blocks
(full_precision), one-line errors (errors)."""
