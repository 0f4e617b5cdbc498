"""LazyConfig files of Salience DETR, installed with the package as ``salience_detr.configs``.

Load one by name with ``salience_detr.config.get_config`` (paths relative to this folder).
"""
