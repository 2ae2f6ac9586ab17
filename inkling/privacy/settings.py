"""The `[privacy]` table of the settings file (also `INKLING_PRIVACY_<NAME>`).

```toml
[privacy]
epsilon_per_day = 1.0      # total ε any one day of the event log may be charged, all releases
delta_per_day = 1e-6       # total δ likewise
max_items_per_user = 10    # default contribution bound of a popularity release
```

The budget is configuration, not a flag of the command that spends it: whoever runs
an export cannot raise it on the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inkling.errors import ConfigurationError

SECTION = "privacy"


@dataclass(frozen=True)
class PrivacySettings:
    """The privacy budget and the default contribution bound."""

    epsilon_per_day: float = 1.0
    """The most ε that the releases covering any one UTC day of the event log may
    spend together (basic composition, `inkling.privacy.ledger`). 1.0 allows one
    ε = 1 release of each day: one weekly 7-day release at ε = 1, or a daily 7-day
    release at ε = 1/7 (each day lies in seven such windows)."""
    delta_per_day: float = 1e-6
    """The most δ those releases may spend together; Laplace releases spend none."""
    max_items_per_user: int = 10
    """Distinct items one user (or anonymous session) counts towards in a release,
    when the command does not say. Set from what a week of one user typically holds,
    not tuned on the data: choosing it from the private counts would itself leak."""

    def __post_init__(self) -> None:
        for name in ("epsilon_per_day", "delta_per_day"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigurationError(
                    f"[privacy] {name} must be a finite number >= 0, got {value}"
                )
        if self.delta_per_day >= 1:
            raise ConfigurationError(
                f"[privacy] delta_per_day must be below 1, got {self.delta_per_day}"
            )
        if self.max_items_per_user < 1:
            raise ConfigurationError(
                f"[privacy] max_items_per_user must be at least 1, got {self.max_items_per_user}"
            )


def load_privacy_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PrivacySettings:
    """The `[privacy]` table, `INKLING_PRIVACY_*` variables, then `overrides`."""
    from inkling.serving.settings import load_server_settings

    return load_server_settings(PrivacySettings, SECTION, config_file, overrides, environ)
