"""Differential privacy for aggregates that leave the system.

- `noisy_counts`: user-level contribution bounding of per-key counts and the OpenDP
  measurement that releases them with a stated (ε, δ);
- `ledger`: the append-only record of every release and the per-day budget it is
  charged against;
- `settings`: the `[privacy]` table (budget, default contribution bound).

The popularity export that uses them is `batch/popularity_release.py`.
"""
