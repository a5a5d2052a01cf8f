"""Datasets, DataModules, samplers and generators."""
