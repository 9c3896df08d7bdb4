"""LogStack stage plugin ``acme_mask_iban``: mask IBANs in log entries before they are stored.

Registered in this distribution's ``pyproject.toml`` under the entry-point group
``logstack.stages``; see the README for configuration and ``tests/`` for how it is tested.
"""

from ._iban import IBAN_LENGTHS, IbanMasker, is_valid_iban
from ._stage import METRIC_KEY, MaskIbanConfig, MaskIbanStage

__all__ = [
    "IBAN_LENGTHS",
    "METRIC_KEY",
    "IbanMasker",
    "MaskIbanConfig",
    "MaskIbanStage",
    "is_valid_iban",
]
__version__ = "0.1.0"
