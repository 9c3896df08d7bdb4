"""Masking cost per entry (µs), flat and nested metadata, all detectors on.

    python benchmarks/masking_cost.py

Times ``KeyMasker.mask_entry`` over freshly decoded entries (decode time subtracted), best of
several repeats, with the default masking settings (baseline keys, partial rules, the four
built-in detectors).
"""

from __future__ import annotations

import json
import timeit
from typing import Any

import msgspec

from logstack._config import load_settings
from logstack._masking import Masker

BASE = {
    "timestamp": "2026-11-26T12:00:00Z",
    "level": "INFO",
    "service": "checkout",
    "env": "prod",
}
CASES: dict[str, dict[str, Any]] = {
    "flat, 10 keys, no secrets": {
        **BASE,
        "message": "order placed",
        "metadata": {f"field_{i}": f"value {i}" for i in range(10)},
    },
    "flat, 10 keys, 1 masked key": {
        **BASE,
        "message": "login ok",
        "metadata": {**{f"field_{i}": f"value {i}" for i in range(9)}, "password": "hunter2"},
    },
    "nested (depth 3), no secrets": {
        **BASE,
        "message": "order placed",
        "metadata": {"a": {"b": {"c": "d", "e": [1, 2, 3]}, "f": "g"}, "h": [{"i": "j"}]},
    },
    "nested, keys + e-mail + card hits": {
        **BASE,
        "message": "paid by jane@example.com with 4111 1111 1111 1111",
        "metadata": {
            "user": {"email": "jane@example.com", "apiKey": "ak_123456"},
            "auth": {"Authorization": "Bearer abc.def.ghi"},
            "cards": [{"card_number": "4111111111111111"}],
        },
    },
}


def main() -> None:
    masker = Masker(load_settings(env={}).masking).for_key("bench")
    decoder = msgspec.json.Decoder()
    n = 2000
    print(f"{'entry':<36} {'µs/entry':>9}")
    for name, entry in CASES.items():
        raw = json.dumps([entry] * n).encode()

        def decode_only(raw: bytes = raw) -> None:
            decoder.decode(raw)

        def decode_and_mask(raw: bytes = raw) -> None:
            counts: dict[str, int] = {}
            for item in decoder.decode(raw):
                masker.mask_entry(item, counts)

        base = min(timeit.repeat(decode_only, number=1, repeat=7))
        total = min(timeit.repeat(decode_and_mask, number=1, repeat=7))
        print(f"{name:<36} {(total - base) / n * 1e6:>9.2f}")


if __name__ == "__main__":
    main()
