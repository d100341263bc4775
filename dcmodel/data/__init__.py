"""Input data: sources, cleaning and normalization, and the Grain pipeline to the devices."""
