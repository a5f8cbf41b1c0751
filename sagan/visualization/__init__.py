"""What attention looks like: figures of attention maps and sample grids (figures), the attention explorer page
(explorer, explorer.html), and what a run draws every logger.image_every steps (snapshots)."""
