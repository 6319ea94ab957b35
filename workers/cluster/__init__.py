"""What the workers of a cluster share through Redis: blob ledger, leases, limits, quota pauses."""
