"""Command-line tools, each run as ``python -m salience_detr.tools.<name>``."""
