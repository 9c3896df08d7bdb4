"""``python -m logstack.bench``: see ``logstack.bench._cli``."""
