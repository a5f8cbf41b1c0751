"""The images a run trains on and is evaluated against: decoding (images), datasets (torchvision ones, folders and
zips, subsets; datasets), the generated demo set and its score (demo), the seeded batch stream (batch_stream)."""
