"""Losses for part attention and metric learning."""
