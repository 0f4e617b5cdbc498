"""Helpers that are not part of the model: ``atomic`` file writes, ``inference`` (a config's model with its
weights, test-time image preparation), ``visualization`` (salience maps, kept tokens) and ``dispatch_count``
(ATen calls and data-dependent host syncs of a piece of code)."""
