"""Converters from the official Salience-DETR checkpoints to this project's state dicts (``official``)."""
