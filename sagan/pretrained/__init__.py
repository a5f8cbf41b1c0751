"""Other codebases' published weights in sagan's networks: PyTorch-StudioGAN's checkpoints (studiogan)."""
