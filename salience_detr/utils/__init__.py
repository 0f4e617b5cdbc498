"""Helpers that are not part of the model: ``atomic`` file writes, ``inference`` (a config's model with its
weights, test-time image preparation) and ``visualization`` (salience maps, kept tokens)."""
