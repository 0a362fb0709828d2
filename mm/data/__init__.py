"""The shared data layer: shard writers, the synthetic shapes world and the WebDataset loader."""
