"""The images a run trains on and is evaluated against: decoding (images), what every dataset knows about itself
(dataset_base), torchvision's datasets (torchvision_sets), folders and zips with their labels (folders), the generated
demo set and its score (demo), the choice among them by name (datasets), a dataset prepared once as a zip
(preparation), and the seeded batch stream (batch_stream)."""
